"""Asymmetric, HMAC and ECDH operations through KeyStore on SoftHSM2, checked with pyca/cryptography.

Keys come from the session-wide ``shared_keys`` (one RSA-4096 key for the session).
"""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from hsm_shared import SharedKeys

from hsmkeys import keyspecs
from hsmkeys.errors import (
    InvalidCiphertextException,
    KMSInvalidMacException,
    KMSInvalidSignatureException,
)
from hsmkeys.models import EncryptionAlgorithm, KeySpec, KeyUsage, MacAlgorithm, SigningAlgorithm

pytestmark = pytest.mark.hsm

SIGNING_CASES = [
    (spec, algorithm)
    for spec in keyspecs.ALLOWED_USAGES
    for algorithm in keyspecs.signing_algorithms(spec, KeyUsage.SIGN_VERIFY)
]
# RSA_4096 is exercised by signing (one 4096 key per session); OAEP on 2048 and 3072.
OAEP_CASES = [
    (spec, algorithm)
    for spec in (KeySpec.RSA_2048, KeySpec.RSA_3072)
    for algorithm in (EncryptionAlgorithm.RSAES_OAEP_SHA_1, EncryptionAlgorithm.RSAES_OAEP_SHA_256)
]
OAEP_HASHES = {
    EncryptionAlgorithm.RSAES_OAEP_SHA_1: hashes.SHA1(),
    EncryptionAlgorithm.RSAES_OAEP_SHA_256: hashes.SHA256(),
}
HASHES = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}
CURVES = {
    KeySpec.ECC_NIST_P256: ec.SECP256R1(),
    KeySpec.ECC_NIST_P384: ec.SECP384R1(),
    KeySpec.ECC_NIST_P521: ec.SECP521R1(),
    KeySpec.ECC_SECG_P256K1: ec.SECP256K1(),
}


def public_key_of(shared_keys: SharedKeys, key_id: str) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    der = shared_keys.store.get_public_key(key_id=key_id).public_key
    loaded = serialization.load_der_public_key(der)
    assert isinstance(loaded, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    return loaded


def pyca_verify(
    public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    algorithm: SigningAlgorithm,
    signature: bytes,
    digest: bytes,
) -> None:
    hash_alg = HASHES[algorithm[-3:]]
    if isinstance(public, rsa.RSAPublicKey):
        pad: padding.AsymmetricPadding = (
            padding.PSS(padding.MGF1(hash_alg), hash_alg.digest_size)
            if "PSS" in algorithm
            else padding.PKCS1v15()
        )
        public.verify(signature, digest, pad, Prehashed(hash_alg))
    else:
        public.verify(signature, digest, ec.ECDSA(Prehashed(hash_alg)))


@pytest.mark.parametrize(("spec", "algorithm"), SIGNING_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("message_type", ["RAW", "DIGEST"])
def test_hsm_signature_verifies_with_pyca(
    shared_keys: SharedKeys, spec: KeySpec, algorithm: SigningAlgorithm, message_type: str
) -> None:
    store = shared_keys.store
    key_id = shared_keys.key_id(spec, KeyUsage.SIGN_VERIFY)
    message = os.urandom(100)
    digest = hashlib.new(HASHES[algorithm[-3:]].name, message).digest()
    signed = store.sign(
        key_id=key_id,
        message=message if message_type == "RAW" else digest,
        message_type=message_type,
        signing_algorithm=algorithm,
    )
    pyca_verify(public_key_of(shared_keys, key_id), algorithm, signed.signature, digest)
    assert store.verify(
        key_id=key_id, message=message, signature=signed.signature, signing_algorithm=algorithm
    ).signature_valid
    tampered = bytearray(signed.signature)
    tampered[len(tampered) // 2] ^= 1
    with pytest.raises(KMSInvalidSignatureException):
        store.verify(key_id=key_id, message=message, signature=bytes(tampered), signing_algorithm=algorithm)


@pytest.mark.parametrize(("spec", "algorithm"), OAEP_CASES, ids=lambda v: str(v))
def test_rsa_oaep_both_directions(shared_keys: SharedKeys, spec: KeySpec, algorithm: EncryptionAlgorithm) -> None:
    store = shared_keys.store
    key_id = shared_keys.key_id(spec, KeyUsage.ENCRYPT_DECRYPT)
    public = public_key_of(shared_keys, key_id)
    assert isinstance(public, rsa.RSAPublicKey)
    hash_alg = OAEP_HASHES[algorithm]
    longest = keyspecs.rsa_oaep_max_plaintext(spec, algorithm)
    # Zero and one bytes at the start are where a sloppy OAEP decoder goes wrong.
    for plaintext in (b"\x00", b"\x01\x00\x01", os.urandom(32), b"\x00" * longest, os.urandom(longest)):
        ciphertext = public.encrypt(plaintext, padding.OAEP(padding.MGF1(hash_alg), hash_alg, None))
        opened = store.decrypt(ciphertext_blob=ciphertext, key_id=key_id, encryption_algorithm=algorithm)
        assert opened.plaintext == plaintext
    blob = store.encrypt(key_id=key_id, plaintext=b"to the hsm", encryption_algorithm=algorithm).ciphertext_blob
    assert store.decrypt(ciphertext_blob=blob, key_id=key_id, encryption_algorithm=algorithm).plaintext == b"to the hsm"


@pytest.mark.parametrize("algorithm", list(OAEP_HASHES), ids=str)
def test_every_corrupted_rsa_ciphertext_gives_the_same_error(
    shared_keys: SharedKeys, algorithm: EncryptionAlgorithm
) -> None:
    store = shared_keys.store
    key_id = shared_keys.key_id(KeySpec.RSA_2048, KeyUsage.ENCRYPT_DECRYPT)
    other_id = shared_keys.key_id(KeySpec.RSA_3072, KeyUsage.ENCRYPT_DECRYPT)
    public = public_key_of(shared_keys, key_id)
    assert isinstance(public, rsa.RSAPublicKey)
    other_algorithm = next(a for a in OAEP_HASHES if a is not algorithm)
    good = store.encrypt(key_id=key_id, plaintext=b"payload", encryption_algorithm=algorithm).ciphertext_blob
    n = public.public_numbers().n
    corrupted = [
        good[:100] + bytes([good[100] ^ 0x40]) + good[101:],
        good[:-1] + bytes([good[-1] ^ 1]),
        good[:-1],
        os.urandom(len(good)),
        b"\x00" * len(good),
        (n - 1).to_bytes(len(good), "big"),
        (n + 1).to_bytes(len(good), "big"),  # >= modulus
        store.encrypt(key_id=key_id, plaintext=b"payload", encryption_algorithm=other_algorithm).ciphertext_blob,
        store.encrypt(key_id=other_id, plaintext=b"payload", encryption_algorithm=algorithm).ciphertext_blob,
    ]
    messages = set()
    for ciphertext in corrupted:
        with pytest.raises(InvalidCiphertextException) as caught:
            store.decrypt(ciphertext_blob=ciphertext, key_id=key_id, encryption_algorithm=algorithm)
        messages.add(str(caught.value))
    assert len(messages) == 1


@pytest.mark.parametrize("spec", [KeySpec.HMAC_224, KeySpec.HMAC_256, KeySpec.HMAC_384, KeySpec.HMAC_512], ids=str)
def test_hmac_generate_verify_and_a_flipped_bit_is_rejected(shared_keys: SharedKeys, spec: KeySpec) -> None:
    store = shared_keys.store
    key_id = shared_keys.key_id(spec, KeyUsage.GENERATE_VERIFY_MAC)
    (algorithm,) = keyspecs.mac_algorithms(spec, KeyUsage.GENERATE_VERIFY_MAC)
    mac = store.generate_mac(key_id=key_id, message=b"message", mac_algorithm=algorithm).mac
    assert len(mac) == {"224": 28, "256": 32, "384": 48, "512": 64}[algorithm[-3:]]
    assert store.generate_mac(key_id=key_id, message=b"message", mac_algorithm=algorithm).mac == mac
    assert store.verify_mac(key_id=key_id, message=b"message", mac_algorithm=algorithm, mac=mac).mac_valid
    flipped = bytes([mac[0] ^ 0x01]) + mac[1:]
    with pytest.raises(KMSInvalidMacException):
        store.verify_mac(key_id=key_id, message=b"message", mac_algorithm=algorithm, mac=flipped)
    with pytest.raises(KMSInvalidMacException):
        store.verify_mac(key_id=key_id, message=b"messagf", mac_algorithm=algorithm, mac=mac)


def test_hmac_keys_of_different_specs_differ(shared_keys: SharedKeys) -> None:
    store = shared_keys.store
    key_id = shared_keys.key_id(KeySpec.HMAC_256, KeyUsage.GENERATE_VERIFY_MAC)
    other = store.create_key(key_spec=KeySpec.HMAC_256, key_usage=KeyUsage.GENERATE_VERIFY_MAC).key_metadata.key_id
    algorithm = MacAlgorithm.HMAC_SHA_256
    assert (
        store.generate_mac(key_id=key_id, message=b"m", mac_algorithm=algorithm).mac
        != store.generate_mac(key_id=other, message=b"m", mac_algorithm=algorithm).mac
    )


@pytest.mark.parametrize("spec", [KeySpec.ECC_NIST_P256, KeySpec.ECC_NIST_P384, KeySpec.ECC_NIST_P521], ids=str)
def test_ecdh_shared_secret_matches_pyca(shared_keys: SharedKeys, spec: KeySpec) -> None:
    store = shared_keys.store
    key_id = shared_keys.key_id(spec, KeyUsage.KEY_AGREEMENT)
    hsm_public = public_key_of(shared_keys, key_id)
    assert isinstance(hsm_public, ec.EllipticCurvePublicKey)
    peer = ec.generate_private_key(CURVES[spec])
    peer_der = peer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    derived = store.derive_shared_secret(key_id=key_id, key_agreement_algorithm="ECDH", public_key=peer_der)
    assert derived.shared_secret == peer.exchange(ec.ECDH(), hsm_public)
    assert len(derived.shared_secret) == (CURVES[spec].key_size + 7) // 8


@pytest.mark.parametrize(
    "pair_spec",
    ["RSA_2048", "RSA_3072", "ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521", "ECC_SECG_P256K1"],
)
def test_data_key_pair_matches_and_its_ciphertext_decrypts(shared_keys: SharedKeys, pair_spec: str) -> None:
    store = shared_keys.store
    key_id = shared_keys.key_id(KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
    pair = store.generate_data_key_pair(key_id=key_id, key_pair_spec=pair_spec)
    private = serialization.load_der_private_key(pair.private_key_plaintext, password=None)
    public = serialization.load_der_public_key(pair.public_key)
    assert private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == pair.public_key
    if isinstance(private, rsa.RSAPrivateKey):
        assert isinstance(public, rsa.RSAPublicKey)
        assert private.key_size == int(pair_spec[-4:])
        signature = private.sign(b"data", padding.PKCS1v15(), hashes.SHA256())
        public.verify(signature, b"data", padding.PKCS1v15(), hashes.SHA256())
    else:
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
        assert private.curve.name == CURVES[KeySpec(pair_spec)].name
        signature = private.sign(b"data", ec.ECDSA(hashes.SHA256()))
        public.verify(signature, b"data", ec.ECDSA(hashes.SHA256()))
    opened = store.decrypt(ciphertext_blob=pair.private_key_ciphertext_blob)
    assert opened.plaintext == pair.private_key_plaintext


def test_data_key_pairs_are_fresh_and_leave_no_objects(shared_keys: SharedKeys) -> None:
    store = shared_keys.store
    key_id = shared_keys.key_id(KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
    before = store._hsm.list_key_refs()
    first = store.generate_data_key_pair(key_id=key_id, key_pair_spec="ECC_NIST_P256")
    second = store.generate_data_key_pair(key_id=key_id, key_pair_spec="ECC_NIST_P256")
    assert first.public_key != second.public_key
    assert store._hsm.list_key_refs() == before
