"""Asymmetric and HMAC keys through boto3: sign/verify, public keys, MACs, RSA-OAEP,
data key pairs and ECDH; results checked against pyca/cryptography."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

pytestmark = pytest.mark.server


def error_code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return str(excinfo.value.response["Error"]["Code"])


def make_key(kms: Any, spec: str, usage: str) -> dict[str, Any]:
    metadata: dict[str, Any] = kms.create_key(KeySpec=spec, KeyUsage=usage)["KeyMetadata"]
    return metadata


@pytest.fixture(scope="module")
def rsa_sign_key(kms: Any) -> dict[str, Any]:
    return make_key(kms, "RSA_2048", "SIGN_VERIFY")


@pytest.fixture(scope="module")
def rsa_encrypt_key(kms: Any) -> dict[str, Any]:
    return make_key(kms, "RSA_2048", "ENCRYPT_DECRYPT")


@pytest.fixture(scope="module")
def ec_sign_key(kms: Any) -> dict[str, Any]:
    return make_key(kms, "ECC_NIST_P256", "SIGN_VERIFY")


@pytest.fixture(scope="module")
def hmac_key(kms: Any) -> dict[str, Any]:
    return make_key(kms, "HMAC_256", "GENERATE_VERIFY_MAC")


@pytest.fixture(scope="module")
def ecdh_key(kms: Any) -> dict[str, Any]:
    return make_key(kms, "ECC_NIST_P256", "KEY_AGREEMENT")


def test_rsa_sign_key_metadata(rsa_sign_key: dict[str, Any]) -> None:
    assert rsa_sign_key["KeySpec"] == "RSA_2048"
    assert rsa_sign_key["KeyUsage"] == "SIGN_VERIFY"
    assert "RSASSA_PSS_SHA_256" in rsa_sign_key["SigningAlgorithms"]
    assert "EncryptionAlgorithms" not in rsa_sign_key


@pytest.mark.parametrize("algorithm", ["RSASSA_PSS_SHA_256", "RSASSA_PKCS1_V1_5_SHA_384"])
def test_rsa_sign_verifies_with_kms_and_locally(
    kms: Any, rsa_sign_key: dict[str, Any], algorithm: str
) -> None:
    key_id = rsa_sign_key["KeyId"]
    message = b"message to sign"
    out = kms.sign(KeyId=key_id, Message=message, SigningAlgorithm=algorithm)
    assert out["KeyId"] == rsa_sign_key["Arn"]
    assert out["SigningAlgorithm"] == algorithm
    verified = kms.verify(
        KeyId=key_id, Message=message, Signature=out["Signature"], SigningAlgorithm=algorithm
    )
    assert verified["SignatureValid"] is True
    assert verified["KeyId"] == rsa_sign_key["Arn"]

    public = serialization.load_der_public_key(kms.get_public_key(KeyId=key_id)["PublicKey"])
    assert isinstance(public, rsa.RSAPublicKey)
    if algorithm == "RSASSA_PSS_SHA_256":
        pad: padding.AsymmetricPadding = padding.PSS(
            mgf=padding.MGF1(hashes.SHA256()), salt_length=32
        )
        digest: hashes.HashAlgorithm = hashes.SHA256()
    else:
        pad, digest = padding.PKCS1v15(), hashes.SHA384()
    public.verify(out["Signature"], message, pad, digest)


def test_verify_of_a_wrong_signature_is_kms_invalid_signature(
    kms: Any, rsa_sign_key: dict[str, Any]
) -> None:
    signature = kms.sign(
        KeyId=rsa_sign_key["KeyId"], Message=b"a", SigningAlgorithm="RSASSA_PSS_SHA_256"
    )["Signature"]
    with pytest.raises(ClientError) as excinfo:
        kms.verify(
            KeyId=rsa_sign_key["KeyId"],
            Message=b"b",
            Signature=signature,
            SigningAlgorithm="RSASSA_PSS_SHA_256",
        )
    assert error_code(excinfo) == "KMSInvalidSignatureException"


def test_ecdsa_sign_digest_verifies_locally(kms: Any, ec_sign_key: dict[str, Any]) -> None:
    digest = hashlib.sha256(b"prehashed message").digest()
    out = kms.sign(
        KeyId=ec_sign_key["KeyId"],
        Message=digest,
        MessageType="DIGEST",
        SigningAlgorithm="ECDSA_SHA_256",
    )
    public_out = kms.get_public_key(KeyId=ec_sign_key["KeyId"])
    assert public_out["KeySpec"] == "ECC_NIST_P256"
    assert public_out["SigningAlgorithms"] == ["ECDSA_SHA_256"]
    assert public_out["KeyId"] == ec_sign_key["Arn"]
    public = serialization.load_der_public_key(public_out["PublicKey"])
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(out["Signature"], digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert kms.verify(
        KeyId=ec_sign_key["KeyId"],
        Message=b"prehashed message",
        Signature=out["Signature"],
        SigningAlgorithm="ECDSA_SHA_256",
    )["SignatureValid"]


def test_sign_with_an_algorithm_of_another_spec_is_invalid_key_usage(
    kms: Any, ec_sign_key: dict[str, Any]
) -> None:
    with pytest.raises(ClientError) as excinfo:
        kms.sign(KeyId=ec_sign_key["KeyId"], Message=b"m", SigningAlgorithm="RSASSA_PSS_SHA_256")
    assert error_code(excinfo) == "InvalidKeyUsageException"


def test_generate_and_verify_mac(kms: Any, hmac_key: dict[str, Any]) -> None:
    out = kms.generate_mac(KeyId=hmac_key["KeyId"], Message=b"data", MacAlgorithm="HMAC_SHA_256")
    assert len(out["Mac"]) == 32
    assert out["KeyId"] == hmac_key["Arn"]
    verified = kms.verify_mac(
        KeyId=hmac_key["KeyId"], Message=b"data", Mac=out["Mac"], MacAlgorithm="HMAC_SHA_256"
    )
    assert verified["MacValid"] is True
    with pytest.raises(ClientError) as excinfo:
        kms.verify_mac(
            KeyId=hmac_key["KeyId"], Message=b"other", Mac=out["Mac"], MacAlgorithm="HMAC_SHA_256"
        )
    assert error_code(excinfo) == "KMSInvalidMacException"


def test_hmac_key_cannot_encrypt_or_rotate(kms: Any, hmac_key: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as excinfo:
        kms.encrypt(KeyId=hmac_key["KeyId"], Plaintext=b"p")
    assert error_code(excinfo) == "InvalidKeyUsageException"
    with pytest.raises(ClientError) as excinfo:
        kms.rotate_key_on_demand(KeyId=hmac_key["KeyId"])
    assert error_code(excinfo) == "UnsupportedOperationException"


@pytest.mark.parametrize("algorithm", ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"])
def test_rsa_encrypt_decrypt(kms: Any, rsa_encrypt_key: dict[str, Any], algorithm: str) -> None:
    key_id = rsa_encrypt_key["KeyId"]
    out = kms.encrypt(KeyId=key_id, Plaintext=b"rsa secret", EncryptionAlgorithm=algorithm)
    assert out["EncryptionAlgorithm"] == algorithm
    assert len(out["CiphertextBlob"]) == 256
    back = kms.decrypt(
        CiphertextBlob=out["CiphertextBlob"], KeyId=key_id, EncryptionAlgorithm=algorithm
    )
    assert back["Plaintext"] == b"rsa secret"
    assert back["KeyId"] == rsa_encrypt_key["Arn"]


def test_rsa_ciphertext_made_locally_decrypts_in_kms(
    kms: Any, rsa_encrypt_key: dict[str, Any]
) -> None:
    der = kms.get_public_key(KeyId=rsa_encrypt_key["KeyId"])["PublicKey"]
    public = serialization.load_der_public_key(der)
    assert isinstance(public, rsa.RSAPublicKey)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    blob = public.encrypt(b"from outside", oaep)
    back = kms.decrypt(
        CiphertextBlob=blob,
        KeyId=rsa_encrypt_key["KeyId"],
        EncryptionAlgorithm="RSAES_OAEP_SHA_256",
    )
    assert back["Plaintext"] == b"from outside"


def test_rsa_decrypt_garbage_is_invalid_ciphertext(
    kms: Any, rsa_encrypt_key: dict[str, Any]
) -> None:
    with pytest.raises(ClientError) as excinfo:
        kms.decrypt(
            CiphertextBlob=b"\x00" * 256,
            KeyId=rsa_encrypt_key["KeyId"],
            EncryptionAlgorithm="RSAES_OAEP_SHA_256",
        )
    assert error_code(excinfo) == "InvalidCiphertextException"


def test_rsa_encrypt_with_a_context_is_validation_error(
    kms: Any, rsa_encrypt_key: dict[str, Any]
) -> None:
    with pytest.raises(ClientError) as excinfo:
        kms.encrypt(
            KeyId=rsa_encrypt_key["KeyId"],
            Plaintext=b"p",
            EncryptionAlgorithm="RSAES_OAEP_SHA_256",
            EncryptionContext={"a": "b"},
        )
    assert error_code(excinfo) == "ValidationException"


def test_generate_data_key_pair(kms: Any) -> None:
    wrapping = kms.create_key()["KeyMetadata"]
    context = {"pair": "1"}
    out = kms.generate_data_key_pair(
        KeyId=wrapping["KeyId"], KeyPairSpec="ECC_NIST_P256", EncryptionContext=context
    )
    assert out["KeyId"] == wrapping["Arn"]
    assert out["KeyPairSpec"] == "ECC_NIST_P256"
    private = serialization.load_der_private_key(out["PrivateKeyPlaintext"], password=None)
    public = serialization.load_der_public_key(out["PublicKey"])
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    sealed = kms.decrypt(CiphertextBlob=out["PrivateKeyCiphertextBlob"], EncryptionContext=context)
    assert sealed["Plaintext"] == out["PrivateKeyPlaintext"]

    bare = kms.generate_data_key_pair_without_plaintext(
        KeyId=wrapping["KeyId"], KeyPairSpec="ECC_NIST_P256"
    )
    assert "PrivateKeyPlaintext" not in bare
    assert bare["PublicKey"]


def test_generate_data_key_pair_under_an_asymmetric_key_is_invalid_key_usage(
    kms: Any, rsa_encrypt_key: dict[str, Any]
) -> None:
    with pytest.raises(ClientError) as excinfo:
        kms.generate_data_key_pair(KeyId=rsa_encrypt_key["KeyId"], KeyPairSpec="ECC_NIST_P256")
    assert error_code(excinfo) == "InvalidKeyUsageException"


def test_derive_shared_secret_matches_local_ecdh(kms: Any, ecdh_key: dict[str, Any]) -> None:
    peer = ec.generate_private_key(ec.SECP256R1())
    peer_der = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    out = kms.derive_shared_secret(
        KeyId=ecdh_key["KeyId"], KeyAgreementAlgorithm="ECDH", PublicKey=peer_der
    )
    assert out["KeyId"] == ecdh_key["Arn"]
    ours = serialization.load_der_public_key(
        kms.get_public_key(KeyId=ecdh_key["KeyId"])["PublicKey"]
    )
    assert isinstance(ours, ec.EllipticCurvePublicKey)
    assert out["SharedSecret"] == peer.exchange(ec.ECDH(), ours)


def test_derive_shared_secret_with_a_peer_on_another_curve_is_validation_error(
    kms: Any, ecdh_key: dict[str, Any]
) -> None:
    peer_der = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ClientError) as excinfo:
        kms.derive_shared_secret(
            KeyId=ecdh_key["KeyId"], KeyAgreementAlgorithm="ECDH", PublicKey=peer_der
        )
    assert error_code(excinfo) == "ValidationException"


def test_get_public_key_of_a_symmetric_key_is_refused(kms: Any) -> None:
    key = kms.create_key()["KeyMetadata"]
    with pytest.raises(ClientError) as excinfo:
        kms.get_public_key(KeyId=key["KeyId"])
    assert error_code(excinfo) in {"UnsupportedOperationException", "InvalidKeyUsageException"}


def test_disabled_signing_key_refuses_sign(kms: Any) -> None:
    key = make_key(kms, "ECC_NIST_P256", "SIGN_VERIFY")
    kms.disable_key(KeyId=key["KeyId"])
    with pytest.raises(ClientError) as excinfo:
        kms.sign(KeyId=key["KeyId"], Message=b"m", SigningAlgorithm="ECDSA_SHA_256")
    assert error_code(excinfo) == "DisabledException"
