"""Asymmetric and HMAC KeyStore operations (hsmkeys/asymmetric.py) on the in-memory HSM.

Expected values come from tests/vectors/asymmetric/ (AWS KMS's tables) and results are
checked with pyca/cryptography on the public key the store returns, never with the
code under test. RSA keys are slow to make, so one module-scoped store holds a key
for every allowed (spec, usage) pair; tests that change a key's state make their
own cheap keys on the function-scoped ``store``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.clock import FakeClock
from hsmkeys.errors import (
    DisabledException,
    DryRunOperationException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    KMSError,
    KMSInvalidMacException,
    KMSInvalidSignatureException,
    KMSInvalidStateException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.keystore import KeyStore
from hsmkeys.models import KeyMetadata, Origin

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "asymmetric"
SPECS: dict[str, Any] = json.loads((VECTORS / "kms_key_specs.json").read_text(encoding="utf-8"))
USAGES: dict[str, Any] = json.loads((VECTORS / "kms_key_usages.json").read_text(encoding="utf-8"))

ALLOWED_PAIRS = [
    (spec, usage) for spec, usages in USAGES["allowed_usages"].items() for usage in usages
]
DISALLOWED_PAIRS = [
    (spec, usage)
    for spec, usages in USAGES["allowed_usages"].items()
    for usage in USAGES["all_usages"]
    if usage not in usages
]
SIGNING_CASES = [(spec, alg) for spec, algs in SPECS["signing_algorithms"].items() for alg in algs]
RSA_SPECS = list(SPECS["rsa_modulus_bits"])
OAEP_CASES = [
    (spec, alg, limit)
    for spec, limits in SPECS["rsa_oaep_max_plaintext_bytes"].items()
    for alg, limit in limits.items()
]
HMAC_CASES = [
    (spec, facts["algorithm"], facts["mac_bytes"]) for spec, facts in SPECS["hmac"].items()
]
MAX_MESSAGE = SPECS["limits"]["message_bytes"][1]
INVALID_CIPHERTEXT_MESSAGE = "The ciphertext is invalid."

_HASHES: dict[str, hashes.HashAlgorithm] = {
    "SHA_1": hashes.SHA1(),
    "SHA_256": hashes.SHA256(),
    "SHA_384": hashes.SHA384(),
    "SHA_512": hashes.SHA512(),
}
_CURVES: dict[str, ec.EllipticCurve] = {
    "secp256r1": ec.SECP256R1(),
    "secp384r1": ec.SECP384R1(),
    "secp521r1": ec.SECP521R1(),
    "secp256k1": ec.SECP256K1(),
}


def hash_of(algorithm: str) -> hashes.HashAlgorithm:
    """The hash an algorithm name ends with (RSASSA_PSS_SHA_384 -> SHA384, RSAES_OAEP_SHA_1 -> SHA1)."""
    return next(h for suffix, h in _HASHES.items() if algorithm.endswith(suffix))


def curve_of(spec: str) -> ec.EllipticCurve:
    return _CURVES[SPECS["curves"][spec]]


def public_key_of(store: KeyStore, key_id: str) -> Any:
    return serialization.load_der_public_key(store.get_public_key(key_id=key_id).public_key)


def pyca_verify(public: Any, algorithm: str, signature: bytes, message: bytes) -> None:
    """Verify a KMS signature over ``message`` independently of hsmkeys (InvalidSignature if wrong)."""
    h = hash_of(algorithm)
    if isinstance(public, rsa.RSAPublicKey):
        pad: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)
            if algorithm.startswith("RSASSA_PSS")
            else padding.PKCS1v15()
        )
        public.verify(signature, message, pad, h)
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, message, ec.ECDSA(h))


def oaep(algorithm: str) -> padding.OAEP:
    h = hash_of(algorithm)
    return padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None)


# ------------------------------------------------------------------ module-scoped keys


class Keys:
    """One key per allowed (spec, usage) pair in one store, plus spares for "other key" cases."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.created: dict[tuple[str, str], KeyMetadata] = {
            (spec, usage): store.create_key(key_spec=spec, key_usage=usage).key_metadata
            for spec, usage in ALLOWED_PAIRS
        }
        self.other_rsa_2048 = self.create("RSA_2048", "ENCRYPT_DECRYPT")
        self.other_hmac = {spec: self.create(spec, "GENERATE_VERIFY_MAC") for spec in SPECS["hmac"]}

    def create(self, spec: str, usage: str) -> str:
        return self.store.create_key(key_spec=spec, key_usage=usage).key_metadata.key_id

    def __call__(self, spec: str, usage: str) -> str:
        return self.created[(spec, usage)].key_id


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    catalog = SqliteCatalog(tmp_path_factory.mktemp("asym") / "catalog.db")
    yield Keys(KeyStore(hsm=MemoryHsm(), catalog=catalog, clock=FakeClock()))
    catalog.close()


# ------------------------------------------------------------------ CreateKey matrix


@pytest.mark.parametrize("spec, usage", ALLOWED_PAIRS)
def test_create_key_accepts_allowed_pair_with_kms_algorithm_lists(
    keys: Keys, spec: str, usage: str
) -> None:
    created = keys.created[(spec, usage)]
    expected = USAGES["metadata_algorithms"][f"{spec}/{usage}"]
    assert (created.key_spec, created.customer_master_key_spec, created.key_usage) == (
        spec,
        spec,
        usage,
    )
    assert list(created.encryption_algorithms) == expected.get("encryption", [])
    assert list(created.signing_algorithms) == expected.get("signing", [])
    assert list(created.mac_algorithms) == expected.get("mac", [])
    assert list(created.key_agreement_algorithms) == expected.get("key_agreement", [])
    assert keys.store.describe_key(key_id=created.key_id).key_metadata == created


@pytest.mark.parametrize("spec, usage", DISALLOWED_PAIRS)
def test_create_key_with_disallowed_usage_for_spec_is_validation_error(
    store: KeyStore, memory_hsm_backend: MemoryHsm, spec: str, usage: str
) -> None:
    with pytest.raises(ValidationException):
        store.create_key(key_spec=spec, key_usage=usage)
    assert memory_hsm_backend.list_key_refs() == set()


@pytest.mark.parametrize("spec", ["ECC_NIST_P256", "ECC_SECG_P256K1", "HMAC_256"])
def test_create_key_without_usage_defaults_to_encrypt_decrypt_and_fails_where_not_allowed(
    store: KeyStore, spec: str
) -> None:
    with pytest.raises(ValidationException):
        store.create_key(key_spec=spec)


def test_create_rsa_key_without_usage_is_encrypt_decrypt(store: KeyStore) -> None:
    assert store.create_key(key_spec="RSA_2048").key_metadata.key_usage == "ENCRYPT_DECRYPT"


# ------------------------------------------------------------------ GetPublicKey


@pytest.mark.parametrize(
    "spec, usage", [p for p in ALLOWED_PAIRS if not p[0].startswith(("HMAC", "SYM"))]
)
def test_get_public_key_returns_spki_of_the_spec_with_usage_and_algorithms(
    keys: Keys, spec: str, usage: str
) -> None:
    res = keys.store.get_public_key(key_id=keys(spec, usage))
    public = serialization.load_der_public_key(res.public_key)
    if spec in SPECS["rsa_modulus_bits"]:
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.key_size == SPECS["rsa_modulus_bits"][spec]
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.name == SPECS["curves"][spec]
    expected = USAGES["metadata_algorithms"][f"{spec}/{usage}"]
    assert (res.key_spec, res.customer_master_key_spec, res.key_usage) == (spec, spec, usage)
    assert list(res.encryption_algorithms) == expected.get("encryption", [])
    assert list(res.signing_algorithms) == expected.get("signing", [])
    assert list(res.key_agreement_algorithms) == expected.get("key_agreement", [])


@pytest.mark.parametrize(
    "spec, usage", [("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT"), ("HMAC_256", "GENERATE_VERIFY_MAC")]
)
def test_get_public_key_of_symmetric_or_hmac_key_is_unsupported_operation(
    keys: Keys, spec: str, usage: str
) -> None:
    with pytest.raises(UnsupportedOperationException):
        keys.store.get_public_key(key_id=keys(spec, usage))


# ------------------------------------------------------------------ Sign / Verify


@pytest.mark.parametrize("spec, algorithm", SIGNING_CASES)
def test_raw_signature_verifies_with_pyca_and_with_verify(
    keys: Keys, spec: str, algorithm: str
) -> None:
    key_id = keys(spec, "SIGN_VERIFY")
    message = b"the quick brown fox"
    res = keys.store.sign(key_id=key_id, message=message, signing_algorithm=algorithm)
    assert res.signing_algorithm == algorithm
    assert res.key_id == keys.created[(spec, "SIGN_VERIFY")].arn
    pyca_verify(public_key_of(keys.store, key_id), algorithm, res.signature, message)
    ok = keys.store.verify(
        key_id=key_id, message=message, signature=res.signature, signing_algorithm=algorithm
    )
    assert ok.signature_valid and ok.signing_algorithm == algorithm


@pytest.mark.parametrize("spec, algorithm", SIGNING_CASES)
def test_digest_signature_equals_signing_the_raw_message(
    keys: Keys, spec: str, algorithm: str
) -> None:
    key_id = keys(spec, "SIGN_VERIFY")
    message = b"m" * MAX_MESSAGE
    h = hash_of(algorithm)
    digest = hashlib.new(h.name, message).digest()
    assert len(digest) == SPECS["digest_bytes"][algorithm]
    sig = keys.store.sign(
        key_id=key_id, message=digest, message_type="DIGEST", signing_algorithm=algorithm
    ).signature
    pyca_verify(public_key_of(keys.store, key_id), algorithm, sig, message)
    keys.store.verify(key_id=key_id, message=message, signature=sig, signing_algorithm=algorithm)
    keys.store.verify(
        key_id=key_id,
        message=digest,
        message_type="DIGEST",
        signature=sig,
        signing_algorithm=algorithm,
    )
    public = public_key_of(keys.store, key_id)
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(sig, digest, ec.ECDSA(Prehashed(h)))


@pytest.mark.parametrize("spec, algorithm", SIGNING_CASES)
def test_verify_of_a_changed_message_is_invalid_signature(
    keys: Keys, spec: str, algorithm: str
) -> None:
    key_id = keys(spec, "SIGN_VERIFY")
    sig = keys.store.sign(key_id=key_id, message=b"original", signing_algorithm=algorithm).signature
    with pytest.raises(KMSInvalidSignatureException):
        keys.store.verify(
            key_id=key_id, message=b"originaL", signature=sig, signing_algorithm=algorithm
        )
    with pytest.raises(InvalidSignature):
        pyca_verify(public_key_of(keys.store, key_id), algorithm, sig, b"originaL")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda s: s[:-1],
        lambda s: s + b"\x00",
        lambda s: bytes([s[0] ^ 1]) + s[1:],
        lambda s: b"\x00",
    ],
)
def test_verify_of_a_malformed_signature_is_invalid_signature(
    keys: Keys, mangle: Callable[[bytes], bytes]
) -> None:
    for spec, algorithm in [("RSA_2048", "RSASSA_PSS_SHA_256"), ("ECC_NIST_P256", "ECDSA_SHA_256")]:
        key_id = keys(spec, "SIGN_VERIFY")
        sig = keys.store.sign(key_id=key_id, message=b"m", signing_algorithm=algorithm).signature
        with pytest.raises(KMSInvalidSignatureException):
            keys.store.verify(
                key_id=key_id, message=b"m", signature=mangle(sig), signing_algorithm=algorithm
            )


def test_verify_with_another_rsa_padding_is_invalid_signature(keys: Keys) -> None:
    key_id = keys("RSA_2048", "SIGN_VERIFY")
    sig = keys.store.sign(
        key_id=key_id, message=b"m", signing_algorithm="RSASSA_PSS_SHA_256"
    ).signature
    with pytest.raises(KMSInvalidSignatureException):
        keys.store.verify(
            key_id=key_id,
            message=b"m",
            signature=sig,
            signing_algorithm="RSASSA_PKCS1_V1_5_SHA_256",
        )


def test_verify_with_another_keys_signature_is_invalid_signature(keys: Keys) -> None:
    sig = keys.store.sign(
        key_id=keys("ECC_NIST_P384", "SIGN_VERIFY"), message=b"m", signing_algorithm="ECDSA_SHA_384"
    ).signature
    with pytest.raises(KMSInvalidSignatureException):
        keys.store.verify(
            key_id=keys("RSA_3072", "SIGN_VERIFY"),
            message=b"m",
            signature=sig,
            signing_algorithm="RSASSA_PSS_SHA_384",
        )


def test_pss_signatures_are_randomised_and_pkcs1_signatures_deterministic(keys: Keys) -> None:
    key_id = keys("RSA_2048", "SIGN_VERIFY")

    def sign(alg: str) -> bytes:
        return keys.store.sign(key_id=key_id, message=b"m", signing_algorithm=alg).signature

    assert sign("RSASSA_PSS_SHA_256") != sign("RSASSA_PSS_SHA_256")
    assert sign("RSASSA_PKCS1_V1_5_SHA_256") == sign("RSASSA_PKCS1_V1_5_SHA_256")


@pytest.mark.parametrize("message", [b"", b"x" * (MAX_MESSAGE + 1)])
def test_sign_raw_message_outside_1_to_4096_bytes_is_validation_error(
    keys: Keys, message: bytes
) -> None:
    with pytest.raises(ValidationException):
        keys.store.sign(
            key_id=keys("ECC_NIST_P256", "SIGN_VERIFY"),
            message=message,
            signing_algorithm="ECDSA_SHA_256",
        )


@pytest.mark.parametrize("spec, algorithm", SIGNING_CASES)
def test_digest_of_the_wrong_length_is_validation_error(
    keys: Keys, spec: str, algorithm: str
) -> None:
    key_id = keys(spec, "SIGN_VERIFY")
    size = SPECS["digest_bytes"][algorithm]
    for wrong in (size - 1, size + 1, 20):
        with pytest.raises(ValidationException):
            keys.store.sign(
                key_id=key_id,
                message=b"d" * wrong,
                message_type="DIGEST",
                signing_algorithm=algorithm,
            )
        with pytest.raises(ValidationException):
            keys.store.verify(
                key_id=key_id,
                message=b"d" * wrong,
                message_type="DIGEST",
                signature=b"s",
                signing_algorithm=algorithm,
            )


@pytest.mark.parametrize("spec", list(SPECS["curves"]))
def test_ecdsa_algorithm_not_matching_the_curve_is_invalid_key_usage(keys: Keys, spec: str) -> None:
    key_id = keys(spec, "SIGN_VERIFY")
    for algorithm in ("ECDSA_SHA_256", "ECDSA_SHA_384", "ECDSA_SHA_512", "RSASSA_PSS_SHA_256"):
        if algorithm in SPECS["signing_algorithms"][spec]:
            continue
        with pytest.raises(InvalidKeyUsageException):
            keys.store.sign(key_id=key_id, message=b"m", signing_algorithm=algorithm)


def test_ecdsa_algorithm_on_rsa_key_is_invalid_key_usage(keys: Keys) -> None:
    with pytest.raises(InvalidKeyUsageException):
        keys.store.sign(
            key_id=keys("RSA_2048", "SIGN_VERIFY"), message=b"m", signing_algorithm="ECDSA_SHA_256"
        )


def test_unknown_signing_algorithm_is_validation_error_and_unimplemented_kms_one_invalid_key_usage(
    keys: Keys,
) -> None:
    key_id = keys("RSA_2048", "SIGN_VERIFY")
    with pytest.raises(ValidationException):
        keys.store.sign(key_id=key_id, message=b"m", signing_algorithm="RSASSA_PSS_SHA_1")
    with pytest.raises(InvalidKeyUsageException):
        keys.store.sign(key_id=key_id, message=b"m", signing_algorithm="ED25519_SHA_512")


def test_unknown_message_type_is_validation_error(keys: Keys) -> None:
    with pytest.raises(ValidationException):
        keys.store.sign(
            key_id=keys("ECC_NIST_P256", "SIGN_VERIFY"),
            message=b"m",
            message_type="HASH",
            signing_algorithm="ECDSA_SHA_256",
        )


@pytest.mark.parametrize(
    "spec, usage",
    [
        ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT"),
        ("RSA_2048", "ENCRYPT_DECRYPT"),
        ("ECC_NIST_P256", "KEY_AGREEMENT"),
        ("HMAC_256", "GENERATE_VERIFY_MAC"),
    ],
)
def test_sign_and_verify_with_a_key_not_for_signing_is_invalid_key_usage(
    keys: Keys, spec: str, usage: str
) -> None:
    key_id = keys(spec, usage)
    algorithm = "ECDSA_SHA_256" if spec.startswith("ECC") else "RSASSA_PSS_SHA_256"
    with pytest.raises(InvalidKeyUsageException):
        keys.store.sign(key_id=key_id, message=b"m", signing_algorithm=algorithm)
    with pytest.raises(InvalidKeyUsageException):
        keys.store.verify(key_id=key_id, message=b"m", signature=b"s", signing_algorithm=algorithm)


def test_sign_with_dry_run_is_dry_run_and_after_validation(keys: Keys) -> None:
    key_id = keys("ECC_NIST_P256", "SIGN_VERIFY")
    with pytest.raises(DryRunOperationException):
        keys.store.sign(
            key_id=key_id, message=b"m", signing_algorithm="ECDSA_SHA_256", dry_run=True
        )
    with pytest.raises(InvalidKeyUsageException):
        keys.store.sign(
            key_id=key_id, message=b"m", signing_algorithm="ECDSA_SHA_384", dry_run=True
        )


# ------------------------------------------------------------------ RSA Encrypt / Decrypt


@pytest.mark.parametrize("spec, algorithm, limit", OAEP_CASES)
def test_rsa_encrypt_accepts_up_to_the_kms_limit_and_decrypt_round_trips(
    keys: Keys, spec: str, algorithm: str, limit: int
) -> None:
    key_id = keys(spec, "ENCRYPT_DECRYPT")
    plaintext = bytes(range(256)) * (limit // 256) + b"p" * (limit % 256)
    enc = keys.store.encrypt(key_id=key_id, plaintext=plaintext, encryption_algorithm=algorithm)
    assert enc.encryption_algorithm == algorithm
    assert len(enc.ciphertext_blob) == SPECS["rsa_modulus_bits"][spec] // 8
    dec = keys.store.decrypt(
        ciphertext_blob=enc.ciphertext_blob, key_id=key_id, encryption_algorithm=algorithm
    )
    assert dec.plaintext == plaintext and dec.encryption_algorithm == algorithm
    with pytest.raises(ValidationException):
        keys.store.encrypt(
            key_id=key_id, plaintext=plaintext + b"!", encryption_algorithm=algorithm
        )


@pytest.mark.parametrize("spec, algorithm, limit", OAEP_CASES)
def test_pyca_oaep_ciphertext_decrypts_with_the_store(
    keys: Keys, spec: str, algorithm: str, limit: int
) -> None:
    key_id = keys(spec, "ENCRYPT_DECRYPT")
    public = public_key_of(keys.store, key_id)
    assert isinstance(public, rsa.RSAPublicKey)
    ct = public.encrypt(b"from outside", oaep(algorithm))
    assert (
        keys.store.decrypt(
            ciphertext_blob=ct, key_id=key_id, encryption_algorithm=algorithm
        ).plaintext
        == b"from outside"
    )


def corrupted_ciphertexts(keys: Keys) -> dict[str, tuple[bytes, str]]:
    """Ways an RSA_2048 ciphertext can be wrong: name -> (ciphertext, algorithm to decrypt with)."""
    key_id = keys("RSA_2048", "ENCRYPT_DECRYPT")
    good = keys.store.encrypt(
        key_id=key_id, plaintext=b"secret", encryption_algorithm="RSAES_OAEP_SHA_256"
    )
    ct = good.ciphertext_blob
    other = keys.store.encrypt(
        key_id=keys.other_rsa_2048, plaintext=b"secret", encryption_algorithm="RSAES_OAEP_SHA_256"
    ).ciphertext_blob
    return {
        "first bit flipped": (bytes([ct[0] ^ 0x80]) + ct[1:], "RSAES_OAEP_SHA_256"),
        "last bit flipped": (ct[:-1] + bytes([ct[-1] ^ 1]), "RSAES_OAEP_SHA_256"),
        "one byte short": (ct[:-1], "RSAES_OAEP_SHA_256"),
        "one byte long": (ct + b"\x00", "RSAES_OAEP_SHA_256"),
        "all zero": (b"\x00" * len(ct), "RSAES_OAEP_SHA_256"),
        "all ones (above the modulus)": (b"\xff" * len(ct), "RSAES_OAEP_SHA_256"),
        "other OAEP hash": (ct, "RSAES_OAEP_SHA_1"),
        "other key's ciphertext": (other, "RSAES_OAEP_SHA_256"),
        "symmetric algorithm": (ct, "SYMMETRIC_DEFAULT"),
        "no algorithm": (ct, ""),
    }


def test_every_corrupted_rsa_ciphertext_is_the_same_invalid_ciphertext(keys: Keys) -> None:
    key_id = keys("RSA_2048", "ENCRYPT_DECRYPT")
    messages = {}
    for name, (ct, algorithm) in corrupted_ciphertexts(keys).items():
        with pytest.raises(InvalidCiphertextException) as caught:
            keys.store.decrypt(
                ciphertext_blob=ct, key_id=key_id, encryption_algorithm=algorithm or None
            )
        messages[name] = caught.value.message
    assert set(messages.values()) == {INVALID_CIPHERTEXT_MESSAGE}, messages


def test_rsa_ciphertext_without_key_id_is_invalid_ciphertext(keys: Keys) -> None:
    key_id = keys("RSA_2048", "ENCRYPT_DECRYPT")
    ct = keys.store.encrypt(
        key_id=key_id, plaintext=b"p", encryption_algorithm="RSAES_OAEP_SHA_1"
    ).ciphertext_blob
    with pytest.raises(InvalidCiphertextException):
        keys.store.decrypt(ciphertext_blob=ct)


@pytest.mark.parametrize("spec", RSA_SPECS)
def test_rsa_encrypt_without_algorithm_or_with_symmetric_default_is_invalid_key_usage(
    keys: Keys, spec: str
) -> None:
    key_id = keys(spec, "ENCRYPT_DECRYPT")
    with pytest.raises(InvalidKeyUsageException):
        keys.store.encrypt(key_id=key_id, plaintext=b"p")
    with pytest.raises(InvalidKeyUsageException):
        keys.store.encrypt(key_id=key_id, plaintext=b"p", encryption_algorithm="SYMMETRIC_DEFAULT")


def test_rsa_encrypt_with_unknown_algorithm_is_validation_error(keys: Keys) -> None:
    with pytest.raises(ValidationException):
        keys.store.encrypt(
            key_id=keys("RSA_2048", "ENCRYPT_DECRYPT"),
            plaintext=b"p",
            encryption_algorithm="RSAES_PKCS1",
        )


def test_encrypt_with_signing_rsa_key_is_invalid_key_usage(keys: Keys) -> None:
    key_id = keys("RSA_2048", "SIGN_VERIFY")
    with pytest.raises(InvalidKeyUsageException):
        keys.store.encrypt(key_id=key_id, plaintext=b"p", encryption_algorithm="RSAES_OAEP_SHA_256")
    with pytest.raises(InvalidKeyUsageException):
        keys.store.decrypt(
            ciphertext_blob=b"c" * 256, key_id=key_id, encryption_algorithm="RSAES_OAEP_SHA_256"
        )


def test_encryption_context_with_rsa_key_is_validation_error(keys: Keys) -> None:
    # KMS: "An encryption context is valid only for cryptographic operations with a symmetric
    # encryption KMS key"; an empty context is the same as none.
    key_id = keys("RSA_2048", "ENCRYPT_DECRYPT")
    with pytest.raises(ValidationException):
        keys.store.encrypt(
            key_id=key_id,
            plaintext=b"p",
            encryption_algorithm="RSAES_OAEP_SHA_256",
            encryption_context={"a": "b"},
        )
    ct = keys.store.encrypt(
        key_id=key_id,
        plaintext=b"p",
        encryption_algorithm="RSAES_OAEP_SHA_256",
        encryption_context={},
    ).ciphertext_blob
    with pytest.raises(ValidationException):
        keys.store.decrypt(
            ciphertext_blob=ct,
            key_id=key_id,
            encryption_algorithm="RSAES_OAEP_SHA_256",
            encryption_context={"a": "b"},
        )


def test_rsa_encrypt_with_dry_run_reports_limit_errors_before_dry_run(keys: Keys) -> None:
    key_id = keys("RSA_2048", "ENCRYPT_DECRYPT")
    limit = SPECS["rsa_oaep_max_plaintext_bytes"]["RSA_2048"]["RSAES_OAEP_SHA_256"]
    with pytest.raises(ValidationException):
        keys.store.encrypt(
            key_id=key_id,
            plaintext=b"p" * (limit + 1),
            encryption_algorithm="RSAES_OAEP_SHA_256",
            dry_run=True,
        )
    with pytest.raises(InvalidKeyUsageException):
        keys.store.encrypt(key_id=key_id, plaintext=b"p", dry_run=True)
    with pytest.raises(DryRunOperationException):
        keys.store.encrypt(
            key_id=key_id, plaintext=b"p", encryption_algorithm="RSAES_OAEP_SHA_256", dry_run=True
        )


# ------------------------------------------------------------------ GenerateMac / VerifyMac


@pytest.mark.parametrize("spec, algorithm, size", HMAC_CASES)
def test_generate_mac_has_the_algorithm_size_and_verifies(
    keys: Keys, spec: str, algorithm: str, size: int
) -> None:
    key_id = keys(spec, "GENERATE_VERIFY_MAC")
    res = keys.store.generate_mac(key_id=key_id, message=b"hello", mac_algorithm=algorithm)
    assert len(res.mac) == size and res.mac_algorithm == algorithm
    assert (
        keys.store.generate_mac(key_id=key_id, message=b"hello", mac_algorithm=algorithm).mac
        == res.mac
    )
    ok = keys.store.verify_mac(
        key_id=key_id, message=b"hello", mac_algorithm=algorithm, mac=res.mac
    )
    assert ok.mac_valid and ok.mac_algorithm == algorithm


@pytest.mark.parametrize("spec, algorithm, size", HMAC_CASES)
def test_verify_mac_with_flipped_bit_or_other_message_is_invalid_mac(
    keys: Keys, spec: str, algorithm: str, size: int
) -> None:
    key_id = keys(spec, "GENERATE_VERIFY_MAC")
    mac = keys.store.generate_mac(key_id=key_id, message=b"hello", mac_algorithm=algorithm).mac
    for wrong in (
        bytes([mac[0] ^ 1]) + mac[1:],
        mac[:-1] + bytes([mac[-1] ^ 0x80]),
        mac[:-1],
        mac + b"\x00",
    ):
        with pytest.raises(KMSInvalidMacException):
            keys.store.verify_mac(
                key_id=key_id, message=b"hello", mac_algorithm=algorithm, mac=wrong
            )
    with pytest.raises(KMSInvalidMacException):
        keys.store.verify_mac(key_id=key_id, message=b"hellO", mac_algorithm=algorithm, mac=mac)


@pytest.mark.parametrize("spec, algorithm, size", HMAC_CASES)
def test_verify_mac_with_another_keys_mac_is_invalid_mac(
    keys: Keys, spec: str, algorithm: str, size: int
) -> None:
    mac = keys.store.generate_mac(
        key_id=keys.other_hmac[spec], message=b"hello", mac_algorithm=algorithm
    ).mac
    with pytest.raises(KMSInvalidMacException):
        keys.store.verify_mac(
            key_id=keys(spec, "GENERATE_VERIFY_MAC"),
            message=b"hello",
            mac_algorithm=algorithm,
            mac=mac,
        )


@pytest.mark.parametrize("spec, algorithm, size", HMAC_CASES)
def test_mac_algorithm_other_than_the_key_specs_is_invalid_key_usage(
    keys: Keys, spec: str, algorithm: str, size: int
) -> None:
    key_id = keys(spec, "GENERATE_VERIFY_MAC")
    for other in {facts["algorithm"] for facts in SPECS["hmac"].values()} - {algorithm}:
        with pytest.raises(InvalidKeyUsageException):
            keys.store.generate_mac(key_id=key_id, message=b"m", mac_algorithm=other)
        with pytest.raises(InvalidKeyUsageException):
            keys.store.verify_mac(
                key_id=key_id, message=b"m", mac_algorithm=other, mac=b"\x00" * size
            )


def test_mac_message_limits_are_1_to_4096_bytes(keys: Keys) -> None:
    key_id = keys("HMAC_256", "GENERATE_VERIFY_MAC")
    mac = keys.store.generate_mac(
        key_id=key_id, message=b"x" * MAX_MESSAGE, mac_algorithm="HMAC_SHA_256"
    ).mac
    keys.store.verify_mac(
        key_id=key_id, message=b"x" * MAX_MESSAGE, mac_algorithm="HMAC_SHA_256", mac=mac
    )
    for bad in (b"", b"x" * (MAX_MESSAGE + 1)):
        with pytest.raises(ValidationException):
            keys.store.generate_mac(key_id=key_id, message=bad, mac_algorithm="HMAC_SHA_256")
        with pytest.raises(ValidationException):
            keys.store.verify_mac(key_id=key_id, message=bad, mac_algorithm="HMAC_SHA_256", mac=mac)


def test_unknown_mac_algorithm_is_validation_error(keys: Keys) -> None:
    with pytest.raises(ValidationException):
        keys.store.generate_mac(
            key_id=keys("HMAC_256", "GENERATE_VERIFY_MAC"), message=b"m", mac_algorithm="HMAC_SHA_1"
        )


@pytest.mark.parametrize(
    "spec, usage",
    [
        ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT"),
        ("RSA_2048", "SIGN_VERIFY"),
        ("ECC_NIST_P256", "KEY_AGREEMENT"),
    ],
)
def test_mac_with_a_key_not_for_macs_is_invalid_key_usage(
    keys: Keys, spec: str, usage: str
) -> None:
    with pytest.raises(InvalidKeyUsageException):
        keys.store.generate_mac(
            key_id=keys(spec, usage), message=b"m", mac_algorithm="HMAC_SHA_256"
        )
    with pytest.raises(InvalidKeyUsageException):
        keys.store.verify_mac(
            key_id=keys(spec, usage), message=b"m", mac_algorithm="HMAC_SHA_256", mac=b"\x00" * 32
        )


def test_hmac_key_cannot_encrypt(keys: Keys) -> None:
    with pytest.raises(InvalidKeyUsageException):
        keys.store.encrypt(key_id=keys("HMAC_256", "GENERATE_VERIFY_MAC"), plaintext=b"p")


# ------------------------------------------------------------------ GenerateDataKeyPair


def assert_pair_matches(private_der: bytes, public_der: bytes, spec: str) -> None:
    private = serialization.load_der_private_key(private_der, password=None)
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert spki == public_der
    if spec in SPECS["rsa_modulus_bits"]:
        assert isinstance(private, rsa.RSAPrivateKey)
        assert private.key_size == SPECS["rsa_modulus_bits"][spec]
    else:
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == SPECS["curves"][spec]


@pytest.mark.parametrize("spec", SPECS["data_key_pair_specs"])
def test_generate_data_key_pair_returns_matching_pkcs8_and_spki_and_a_decryptable_private_key(
    keys: Keys, spec: str
) -> None:
    key_id = keys("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
    res = keys.store.generate_data_key_pair(
        key_id=key_id, key_pair_spec=spec, encryption_context={"use": "pair"}
    )
    assert (
        res.key_pair_spec == spec
        and res.key_id == keys.created[("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")].arn
    )
    assert_pair_matches(res.private_key_plaintext, res.public_key, spec)
    dec = keys.store.decrypt(
        ciphertext_blob=res.private_key_ciphertext_blob, encryption_context={"use": "pair"}
    )
    assert dec.plaintext == res.private_key_plaintext
    with pytest.raises(InvalidCiphertextException):
        keys.store.decrypt(ciphertext_blob=res.private_key_ciphertext_blob)


@pytest.mark.parametrize("spec", SPECS["data_key_pair_specs"])
def test_generate_data_key_pair_without_plaintext_ciphertext_decrypts_to_the_matching_private_key(
    keys: Keys, spec: str
) -> None:
    key_id = keys("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
    res = keys.store.generate_data_key_pair_without_plaintext(key_id=key_id, key_pair_spec=spec)
    assert not hasattr(res, "private_key_plaintext")
    private_der = keys.store.decrypt(ciphertext_blob=res.private_key_ciphertext_blob).plaintext
    assert_pair_matches(private_der, res.public_key, spec)


def test_generate_data_key_pair_gives_a_fresh_pair_each_call(keys: Keys) -> None:
    key_id = keys("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
    a = keys.store.generate_data_key_pair(key_id=key_id, key_pair_spec="ECC_NIST_P256")
    b = keys.store.generate_data_key_pair(key_id=key_id, key_pair_spec="ECC_NIST_P256")
    assert a.public_key != b.public_key


@pytest.mark.parametrize(
    "spec, usage",
    [
        ("RSA_2048", "ENCRYPT_DECRYPT"),
        ("RSA_2048", "SIGN_VERIFY"),
        ("HMAC_256", "GENERATE_VERIFY_MAC"),
        ("ECC_NIST_P256", "KEY_AGREEMENT"),
    ],
)
def test_generate_data_key_pair_under_a_non_symmetric_key_is_invalid_key_usage(
    keys: Keys, spec: str, usage: str
) -> None:
    for operation in (
        keys.store.generate_data_key_pair,
        keys.store.generate_data_key_pair_without_plaintext,
    ):
        with pytest.raises(InvalidKeyUsageException):
            operation(key_id=keys(spec, usage), key_pair_spec="ECC_NIST_P256")


def test_generate_data_key_pair_with_unknown_spec_is_validation_error_and_kms_only_spec_unsupported(
    keys: Keys,
) -> None:
    key_id = keys("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
    with pytest.raises(ValidationException):
        keys.store.generate_data_key_pair(key_id=key_id, key_pair_spec="RSA_1024")
    with pytest.raises(UnsupportedOperationException):
        keys.store.generate_data_key_pair(key_id=key_id, key_pair_spec="ECC_NIST_EDWARDS25519")


# ------------------------------------------------------------------ DeriveSharedSecret


def spki(public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("spec", SPECS["key_agreement_specs"])
def test_derive_shared_secret_equals_the_peers_ecdh(keys: Keys, spec: str) -> None:
    key_id = keys(spec, "KEY_AGREEMENT")
    peer = ec.generate_private_key(curve_of(spec))
    res = keys.store.derive_shared_secret(
        key_id=key_id, key_agreement_algorithm="ECDH", public_key=spki(peer.public_key())
    )
    ours = public_key_of(keys.store, key_id)
    assert isinstance(ours, ec.EllipticCurvePublicKey)
    assert res.shared_secret == peer.exchange(ec.ECDH(), ours)
    assert (res.key_agreement_algorithm, res.key_origin) == ("ECDH", Origin.AWS_KMS)
    assert res.key_id == keys.created[(spec, "KEY_AGREEMENT")].arn


@pytest.mark.parametrize("spec", SPECS["key_agreement_specs"])
def test_derive_shared_secret_with_peer_on_another_curve_or_not_ec_is_validation_error(
    keys: Keys, spec: str
) -> None:
    key_id = keys(spec, "KEY_AGREEMENT")
    other_curves = [name for name in _CURVES if name != SPECS["curves"][spec]]
    rsa_peer = keys.store.get_public_key(key_id=keys("RSA_2048", "ENCRYPT_DECRYPT")).public_key
    bad = [spki(ec.generate_private_key(_CURVES[name]).public_key()) for name in other_curves]
    for peer in [*bad, rsa_peer, b"\x30\x03garbage", b"\x00"]:
        with pytest.raises(ValidationException):
            keys.store.derive_shared_secret(
                key_id=key_id, key_agreement_algorithm="ECDH", public_key=peer
            )


def test_derive_shared_secret_with_unknown_algorithm_or_empty_key_is_validation_error(
    keys: Keys,
) -> None:
    key_id = keys("ECC_NIST_P256", "KEY_AGREEMENT")
    peer = spki(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(ValidationException):
        keys.store.derive_shared_secret(
            key_id=key_id, key_agreement_algorithm="ECDHE", public_key=peer
        )
    with pytest.raises(ValidationException):
        keys.store.derive_shared_secret(
            key_id=key_id, key_agreement_algorithm="ECDH", public_key=b""
        )


@pytest.mark.parametrize(
    "spec, usage",
    [
        ("ECC_NIST_P256", "SIGN_VERIFY"),
        ("ECC_SECG_P256K1", "SIGN_VERIFY"),
        ("RSA_2048", "ENCRYPT_DECRYPT"),
        ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT"),
    ],
)
def test_derive_shared_secret_with_a_key_not_for_agreement_is_invalid_key_usage(
    keys: Keys, spec: str, usage: str
) -> None:
    peer = spki(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(InvalidKeyUsageException):
        keys.store.derive_shared_secret(
            key_id=keys(spec, usage), key_agreement_algorithm="ECDH", public_key=peer
        )


def test_key_agreement_key_cannot_sign(keys: Keys) -> None:
    with pytest.raises(InvalidKeyUsageException):
        keys.store.sign(
            key_id=keys("ECC_NIST_P256", "KEY_AGREEMENT"),
            message=b"m",
            signing_algorithm="ECDSA_SHA_256",
        )


# ------------------------------------------------------------------ rotation and key state


@pytest.mark.parametrize(
    "spec, usage",
    [p for p in ALLOWED_PAIRS if p[0] != "SYMMETRIC_DEFAULT"],
)
def test_rotation_of_asymmetric_or_hmac_key_is_unsupported_operation(
    keys: Keys, spec: str, usage: str
) -> None:
    key_id = keys(spec, usage)
    with pytest.raises(UnsupportedOperationException):
        keys.store.rotate_key_on_demand(key_id=key_id)
    with pytest.raises(UnsupportedOperationException):
        keys.store.enable_key_rotation(key_id=key_id)
    with pytest.raises(UnsupportedOperationException):
        keys.store.get_key_rotation_status(key_id=key_id)
    assert keys.store.describe_key(key_id=key_id).key_metadata.current_version == 1


def every_asymmetric_call(store: KeyStore) -> dict[str, Callable[[], object]]:
    """One call per asymmetric/HMAC operation, on fresh keys (all valid while the keys are enabled)."""
    signer = store.create_key(key_spec="ECC_NIST_P256", key_usage="SIGN_VERIFY").key_metadata.key_id
    agreer = store.create_key(
        key_spec="ECC_NIST_P256", key_usage="KEY_AGREEMENT"
    ).key_metadata.key_id
    macer = store.create_key(
        key_spec="HMAC_256", key_usage="GENERATE_VERIFY_MAC"
    ).key_metadata.key_id
    rsa_key = store.create_key(key_spec="RSA_2048", key_usage="ENCRYPT_DECRYPT").key_metadata.key_id
    sym = store.create_key().key_metadata.key_id
    sig = store.sign(key_id=signer, message=b"m", signing_algorithm="ECDSA_SHA_256").signature
    mac = store.generate_mac(key_id=macer, message=b"m", mac_algorithm="HMAC_SHA_256").mac
    ct = store.encrypt(
        key_id=rsa_key, plaintext=b"p", encryption_algorithm="RSAES_OAEP_SHA_256"
    ).ciphertext_blob
    peer = spki(ec.generate_private_key(ec.SECP256R1()).public_key())
    return {
        signer: lambda: store.sign(key_id=signer, message=b"m", signing_algorithm="ECDSA_SHA_256"),
        signer + " verify": lambda: store.verify(
            key_id=signer, message=b"m", signature=sig, signing_algorithm="ECDSA_SHA_256"
        ),
        signer + " public key": lambda: store.get_public_key(key_id=signer),
        macer: lambda: store.generate_mac(key_id=macer, message=b"m", mac_algorithm="HMAC_SHA_256"),
        macer + " verify": lambda: store.verify_mac(
            key_id=macer, message=b"m", mac_algorithm="HMAC_SHA_256", mac=mac
        ),
        rsa_key: lambda: store.encrypt(
            key_id=rsa_key, plaintext=b"p", encryption_algorithm="RSAES_OAEP_SHA_256"
        ),
        rsa_key + " decrypt": lambda: store.decrypt(
            ciphertext_blob=ct, key_id=rsa_key, encryption_algorithm="RSAES_OAEP_SHA_256"
        ),
        agreer: lambda: store.derive_shared_secret(
            key_id=agreer, key_agreement_algorithm="ECDH", public_key=peer
        ),
        sym: lambda: store.generate_data_key_pair(key_id=sym, key_pair_spec="ECC_NIST_P256"),
        sym + " without plaintext": lambda: store.generate_data_key_pair_without_plaintext(
            key_id=sym, key_pair_spec="ECC_NIST_P256"
        ),
    }


def outcomes(calls: dict[str, Callable[[], object]]) -> dict[str, str]:
    """Each call's KMS error code, or "Success"."""
    result: dict[str, str] = {}
    for name, call in calls.items():
        try:
            call()
            result[name] = "Success"
        except KMSError as exc:
            result[name] = exc.code
    return result


def test_disabled_keys_refuse_every_asymmetric_operation_until_enabled(store: KeyStore) -> None:
    calls = every_asymmetric_call(store)
    key_ids = {name.split(" ")[0] for name in calls}
    for key_id in key_ids:
        store.disable_key(key_id=key_id)
    assert outcomes(calls) == dict.fromkeys(calls, DisabledException.code)
    for key_id in key_ids:
        store.enable_key(key_id=key_id)
    for call in calls.values():
        call()


def test_keys_pending_deletion_refuse_every_asymmetric_operation(store: KeyStore) -> None:
    calls = every_asymmetric_call(store)
    for key_id in {name.split(" ")[0] for name in calls}:
        store.schedule_key_deletion(key_id=key_id, pending_window_in_days=7)
    assert outcomes(calls) == dict.fromkeys(calls, KMSInvalidStateException.code)


def test_verify_checks_the_signature_against_the_public_key_not_a_stored_copy(keys: Keys) -> None:
    # A signature made outside KMS by another key must not verify: the check is real.
    key_id = keys("ECC_NIST_P256", "SIGN_VERIFY")
    outsider = ec.generate_private_key(ec.SECP256R1())
    sig = outsider.sign(b"m", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(KMSInvalidSignatureException):
        keys.store.verify(
            key_id=key_id, message=b"m", signature=sig, signing_algorithm="ECDSA_SHA_256"
        )
    # ... and the KMS signature is an ordinary ECDSA one any verifier accepts.
    kms_sig = keys.store.sign(
        key_id=key_id, message=b"m", signing_algorithm="ECDSA_SHA_256"
    ).signature
    public = public_key_of(keys.store, key_id)
    public.verify(kms_sig, b"m", ec.ECDSA(hashes.SHA256()))
