"""BYOK import on both backends (MemoryHsm and Pkcs11Hsm over SoftHSM2): one contract."""

from __future__ import annotations

import hashlib
import hmac
import os
import uuid
from collections.abc import Iterator

import pytest
from byok import pkcs8, spki, wrap
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import AttributeSensitive, KeyUnextractable
from pkcs11.types import Object, Session, WrapMixin

from hsmkeys.errors import (
    IncorrectKeyMaterialException,
    InvalidCiphertextException,
    NotFoundException,
    UnsupportedOperationException,
)
from hsmkeys.hsm.base import (
    FINGERPRINT_AAD,
    FINGERPRINT_BLOCK,
    FINGERPRINT_IV,
    WRAPPING_ALGORITHMS,
    Hsm,
    fingerprint,
    wrapping_label,
)
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.hsm.pkcs11 import Pkcs11Hsm
from hsmkeys.models import KeySpec, KeyUsage, KeyVersionRef, MacAlgorithm, SigningAlgorithm

ALGORITHMS = sorted(WRAPPING_ALGORITHMS)
AES_KEY = bytes(range(32))


def new_ref() -> KeyVersionRef:
    return KeyVersionRef(uuid.uuid4(), 1)


@pytest.fixture(scope="module", params=["memory", "pkcs11"])
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[Hsm, KeyVersionRef, bytes]]:
    """(hsm, wrapping ref, wrapping public key) per backend."""
    hsm: Hsm = MemoryHsm() if request.param == "memory" else request.getfixturevalue("hsm")
    wrapping = new_ref()
    public = hsm.create_wrapping_key(wrapping, "RSA_2048")
    try:
        yield hsm, wrapping, public
    finally:
        hsm.destroy_wrapping_key(wrapping)


def aes_fingerprint(key: bytes) -> bytes:
    return fingerprint("aes", AESGCM(key).encrypt(FINGERPRINT_IV, FINGERPRINT_BLOCK, FINGERPRINT_AAD))


def import_or_unsupported(
    backend: tuple[Hsm, KeyVersionRef, bytes], spec: KeySpec, usage: KeyUsage, algorithm: str, material: bytes
) -> KeyVersionRef | None:
    hsm, wrapping, public = backend
    ref = new_ref()
    if algorithm not in hsm.wrapping_algorithms():
        # SoftHSM2 cannot RSA-OAEP-SHA-256 unwrap in the HSM: refused, never decoded outside.
        assert isinstance(hsm, Pkcs11Hsm) and algorithm.endswith("SHA_256")
        with pytest.raises(UnsupportedOperationException, match="SHA-256"):
            hsm.import_key(ref, spec, usage, wrapping, algorithm, wrap(public, algorithm, material))
        assert not hsm.has_key(ref)
        return None
    hsm.import_key(ref, spec, usage, wrapping, algorithm, wrap(public, algorithm, material))
    return ref


def test_memory_hsm_supports_every_algorithm_and_softhsm_the_sha1_ones(backend: tuple[Hsm, KeyVersionRef, bytes]) -> None:
    hsm = backend[0]
    expected = WRAPPING_ALGORITHMS if isinstance(hsm, MemoryHsm) else {"RSAES_OAEP_SHA_1", "RSA_AES_KEY_WRAP_SHA_1"}
    assert hsm.wrapping_algorithms() == expected


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_imported_aes_key_is_exactly_the_known_key(backend: tuple[Hsm, KeyVersionRef, bytes], algorithm: str) -> None:
    hsm = backend[0]
    ref = import_or_unsupported(backend, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT, algorithm, AES_KEY)
    if ref is None:
        return
    try:
        iv = os.urandom(12)
        sealed = hsm.encrypt_aes_gcm(ref, iv, b"aad", b"imported plaintext")
        assert AESGCM(AES_KEY).decrypt(iv, sealed, b"aad") == b"imported plaintext"
        assert hsm.key_fingerprint(ref) == aes_fingerprint(AES_KEY)
        assert ref in hsm.list_key_refs()
    finally:
        hsm.destroy_key(ref)


@pytest.mark.parametrize(
    ("spec", "algorithm", "length"),
    [(KeySpec.HMAC_256, MacAlgorithm.HMAC_SHA_256, 32), (KeySpec.HMAC_224, MacAlgorithm.HMAC_SHA_224, 28),
     (KeySpec.HMAC_512, MacAlgorithm.HMAC_SHA_512, 100)],
)
@pytest.mark.parametrize("wrapping", ["RSAES_OAEP_SHA_1", "RSA_AES_KEY_WRAP_SHA_1"])
def test_imported_hmac_key_gives_pythons_tag(
    backend: tuple[Hsm, KeyVersionRef, bytes], spec: KeySpec, algorithm: MacAlgorithm, length: int, wrapping: str
) -> None:
    hsm = backend[0]
    key = hashlib.sha512(b"hmac key").digest() * 2
    key = key[:length]
    ref = import_or_unsupported(backend, spec, KeyUsage.GENERATE_VERIFY_MAC, wrapping, key)
    assert ref is not None
    try:
        digest = {MacAlgorithm.HMAC_SHA_256: "sha256", MacAlgorithm.HMAC_SHA_224: "sha224"}.get(algorithm, "sha512")
        assert hsm.mac(ref, algorithm, b"message") == hmac.new(key, b"message", digest).digest()
        assert hsm.key_fingerprint(ref) == fingerprint(
            "hmac", hmac.new(key, b"hsmkeys key fingerprint v1", "sha224").digest()
        )
    finally:
        hsm.destroy_key(ref)


@pytest.mark.parametrize("curve", [ec.SECP256K1(), ec.SECP256R1()], ids=lambda c: c.name)
def test_imported_ec_key_signs_for_the_known_public_key(
    backend: tuple[Hsm, KeyVersionRef, bytes], curve: ec.EllipticCurve
) -> None:
    hsm = backend[0]
    spec = KeySpec.ECC_SECG_P256K1 if curve.name == "secp256k1" else KeySpec.ECC_NIST_P256
    private = ec.derive_private_key(0x1234567890ABCDEF1234567890ABCDEF, curve)
    public_der = spki(private.public_key())
    ref = new_ref()
    wrapped = wrap(backend[2], "RSA_AES_KEY_WRAP_SHA_1", pkcs8(private))
    hsm.import_key(ref, spec, KeyUsage.SIGN_VERIFY, backend[1], "RSA_AES_KEY_WRAP_SHA_1", wrapped, public_der)
    try:
        digest = hashlib.sha256(b"to sign").digest()
        signature = hsm.sign_digest(ref, SigningAlgorithm.ECDSA_SHA_256, digest)
        private.public_key().verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        assert hsm.public_key(ref) == public_der
        assert hsm.key_fingerprint(ref) == fingerprint("spki", public_der)
    finally:
        hsm.destroy_key(ref)


def test_imported_rsa_key_signs_and_has_its_public_key(backend: tuple[Hsm, KeyVersionRef, bytes]) -> None:
    hsm = backend[0]
    private = rsa.generate_private_key(65537, 2048)
    ref = new_ref()
    wrapped = wrap(backend[2], "RSA_AES_KEY_WRAP_SHA_1", pkcs8(private))
    hsm.import_key(ref, KeySpec.RSA_2048, KeyUsage.SIGN_VERIFY, backend[1], "RSA_AES_KEY_WRAP_SHA_1", wrapped)
    try:
        digest = hashlib.sha256(b"to sign").digest()
        signature = hsm.sign_digest(ref, SigningAlgorithm.RSASSA_PSS_SHA_256, digest)
        private.public_key().verify(
            signature,
            digest,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
            Prehashed(hashes.SHA256()),
        )
        assert hsm.public_key(ref) == spki(private.public_key())
    finally:
        hsm.destroy_key(ref)


@pytest.mark.parametrize("algorithm", ["RSAES_OAEP_SHA_1", "RSA_AES_KEY_WRAP_SHA_1"])
def test_tampered_blob_is_invalid_ciphertext(backend: tuple[Hsm, KeyVersionRef, bytes], algorithm: str) -> None:
    hsm, wrapping, public = backend
    wrapped = bytearray(wrap(public, algorithm, AES_KEY))
    for index in (0, len(wrapped) - 1):
        bad = bytearray(wrapped)
        bad[index] ^= 0x01
        ref = new_ref()
        with pytest.raises(InvalidCiphertextException):
            hsm.import_key(ref, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT, wrapping, algorithm, bytes(bad))
        assert not hsm.has_key(ref)
    with pytest.raises(InvalidCiphertextException):
        hsm.import_key(new_ref(), KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT, wrapping, algorithm, b"")


@pytest.mark.parametrize("algorithm", ["RSAES_OAEP_SHA_1", "RSA_AES_KEY_WRAP_SHA_1"])
@pytest.mark.parametrize(
    ("spec", "material"),
    [
        (KeySpec.SYMMETRIC_DEFAULT, os.urandom(16)),
        (KeySpec.SYMMETRIC_DEFAULT, os.urandom(31)),
        (KeySpec.SYMMETRIC_DEFAULT, os.urandom(33)),
        (KeySpec.HMAC_256, os.urandom(24)),
        (KeySpec.HMAC_224, os.urandom(65)),
    ],
    ids=["aes16", "aes31", "aes33", "hmac256-24", "hmac224-65"],
)
def test_wrong_length_is_incorrect_key_material(
    backend: tuple[Hsm, KeyVersionRef, bytes], algorithm: str, spec: KeySpec, material: bytes
) -> None:
    hsm, wrapping, public = backend
    usage = KeyUsage.ENCRYPT_DECRYPT if spec is KeySpec.SYMMETRIC_DEFAULT else KeyUsage.GENERATE_VERIFY_MAC
    ref = new_ref()
    with pytest.raises(IncorrectKeyMaterialException):
        hsm.import_key(ref, spec, usage, wrapping, algorithm, wrap(public, algorithm, material))
    assert not hsm.has_key(ref)


def test_private_key_of_another_type_or_public_key_is_incorrect_key_material(
    backend: tuple[Hsm, KeyVersionRef, bytes],
) -> None:
    hsm, wrapping, public = backend
    p256 = ec.generate_private_key(ec.SECP256R1())
    cases = [
        (KeySpec.ECC_SECG_P256K1, pkcs8(p256), spki(p256.public_key())),  # other curve
        (KeySpec.ECC_NIST_P256, pkcs8(p256), spki(ec.generate_private_key(ec.SECP256R1()).public_key())),
        (KeySpec.RSA_2048, pkcs8(p256), None),  # EC material for an RSA spec
        (KeySpec.ECC_NIST_P256, os.urandom(100), spki(p256.public_key())),  # not PKCS#8
    ]
    for spec, material, public_der in cases:
        ref = new_ref()
        wrapped = wrap(public, "RSA_AES_KEY_WRAP_SHA_1", material)
        with pytest.raises(IncorrectKeyMaterialException):
            hsm.import_key(ref, spec, KeyUsage.SIGN_VERIFY, wrapping, "RSA_AES_KEY_WRAP_SHA_1", wrapped, public_der)
        assert not hsm.has_key(ref), spec


def test_oaep_cannot_carry_a_private_key(backend: tuple[Hsm, KeyVersionRef, bytes]) -> None:
    hsm, wrapping, _ = backend
    with pytest.raises(UnsupportedOperationException):
        hsm.import_key(
            new_ref(), KeySpec.ECC_NIST_P256, KeyUsage.SIGN_VERIFY, wrapping, "RSAES_OAEP_SHA_1", b"\0" * 256
        )


def test_same_material_same_fingerprint_other_material_another(backend: tuple[Hsm, KeyVersionRef, bytes]) -> None:
    hsm, wrapping, public = backend
    refs = [new_ref() for _ in range(3)]
    materials = [AES_KEY, AES_KEY, bytes(32)]
    for ref, material in zip(refs, materials, strict=True):
        hsm.import_key(
            ref, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT, wrapping, "RSA_AES_KEY_WRAP_SHA_1",
            wrap(public, "RSA_AES_KEY_WRAP_SHA_1", material),
        )
    try:
        prints = [hsm.key_fingerprint(ref) for ref in refs]
        assert prints[0] == prints[1] != prints[2] and len(prints[0]) == 32
    finally:
        for ref in refs:
            hsm.destroy_key(ref)


def test_wrapping_keys_are_not_key_versions_and_can_be_destroyed(backend: tuple[Hsm, KeyVersionRef, bytes]) -> None:
    hsm = backend[0]
    ref = new_ref()
    public = hsm.create_wrapping_key(ref, "RSA_3072")
    loaded = serialization_public(public)
    assert loaded.key_size == 3072
    assert ref not in hsm.list_key_refs()
    hsm.destroy_wrapping_key(ref)
    hsm.destroy_wrapping_key(ref)  # nothing left: not an error
    with pytest.raises(NotFoundException):
        hsm.import_key(
            new_ref(), KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT, ref, "RSA_AES_KEY_WRAP_SHA_1",
            wrap(public, "RSA_AES_KEY_WRAP_SHA_1", AES_KEY),
        )


def serialization_public(der: bytes) -> rsa.RSAPublicKey:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_der_public_key(der)
    assert isinstance(key, rsa.RSAPublicKey)
    return key


# ------------------------------------------------------------- SoftHSM2 objects


@pytest.mark.hsm
def test_wrapping_private_key_can_only_unwrap_and_never_leaves(hsm: Pkcs11Hsm, raw_session: Session) -> None:
    ref = new_ref()
    hsm.create_wrapping_key(ref, "RSA_2048")
    try:
        objects = list(raw_session.get_objects({Attribute.LABEL: wrapping_label(ref)}))
        (private,) = [o for o in objects if o.object_class is ObjectClass.PRIVATE_KEY]
        attrs = private.get_attributes(
            [Attribute.UNWRAP, Attribute.DECRYPT, Attribute.SIGN, Attribute.SIGN_RECOVER, Attribute.DERIVE,
             Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.TOKEN]
        )
        assert attrs[Attribute.UNWRAP] and attrs[Attribute.SENSITIVE] and attrs[Attribute.TOKEN]
        assert not any(attrs[a] for a in (Attribute.DECRYPT, Attribute.SIGN, Attribute.SIGN_RECOVER,
                                          Attribute.DERIVE, Attribute.EXTRACTABLE))
        with pytest.raises(AttributeSensitive):
            private[Attribute.PRIVATE_EXPONENT]
    finally:
        hsm.destroy_wrapping_key(ref)
    assert list(raw_session.get_objects({Attribute.LABEL: wrapping_label(ref)})) == []


@pytest.fixture(scope="module")
def extractor(raw_session: Session) -> Object:
    return raw_session.generate_key(
        KeyType.AES, 256, label="test-extractor", capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP
    )


@pytest.mark.hsm
@pytest.mark.parametrize("kind", ["aes", "hmac", "ec", "rsa"])
def test_imported_objects_have_generated_key_attributes_and_never_leave(
    hsm: Pkcs11Hsm, raw_session: Session, extractor: Object, kind: str
) -> None:
    wrapping = new_ref()
    public = hsm.create_wrapping_key(wrapping, "RSA_2048")
    ref = new_ref()
    algorithm = "RSA_AES_KEY_WRAP_SHA_1"
    if kind == "aes":
        spec, usage, material, public_der = KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT, AES_KEY, None
        algorithm = "RSAES_OAEP_SHA_1"
        expected = {Attribute.ENCRYPT, Attribute.DECRYPT}
    elif kind == "hmac":
        spec, usage, material, public_der = KeySpec.HMAC_384, KeyUsage.GENERATE_VERIFY_MAC, os.urandom(48), None
        expected = {Attribute.SIGN, Attribute.VERIFY}
    elif kind == "ec":
        key = ec.generate_private_key(ec.SECP384R1())
        spec, usage, material, public_der = (
            KeySpec.ECC_NIST_P384, KeyUsage.KEY_AGREEMENT, pkcs8(key), spki(key.public_key()),
        )
        expected = {Attribute.DERIVE}
    else:
        key2 = rsa.generate_private_key(65537, 2048)
        spec, usage, material, public_der = KeySpec.RSA_2048, KeyUsage.ENCRYPT_DECRYPT, pkcs8(key2), None
        expected = {Attribute.DECRYPT}
    hsm.import_key(ref, spec, usage, wrapping, algorithm, wrap(public, algorithm, material), public_der)
    try:
        objects = list(raw_session.get_objects({Attribute.ID: ref.object_id}))
        secret = [o for o in objects if o.object_class in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY)]
        publics = [o for o in objects if o.object_class is ObjectClass.PUBLIC_KEY]
        assert len(secret) == 1 and len(publics) == (1 if kind in ("ec", "rsa") else 0)
        obj = secret[0]
        attrs = obj.get_attributes(
            [Attribute.TOKEN, Attribute.PRIVATE, Attribute.SENSITIVE, Attribute.EXTRACTABLE,
             Attribute.MODIFIABLE, Attribute.LABEL]
        )
        assert attrs[Attribute.TOKEN] and attrs[Attribute.PRIVATE] and attrs[Attribute.SENSITIVE]
        assert attrs[Attribute.EXTRACTABLE] is False and attrs[Attribute.MODIFIABLE] is False
        assert attrs[Attribute.LABEL] == ref.label
        capabilities = (Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.SIGN, Attribute.VERIFY, Attribute.WRAP,
                        Attribute.UNWRAP, Attribute.DERIVE, Attribute.SIGN_RECOVER, Attribute.VERIFY_RECOVER)
        assert {a for a in capabilities if _flag(obj, a)} == expected
        with pytest.raises(AttributeSensitive):
            obj[Attribute.PRIVATE_EXPONENT if kind == "rsa" else Attribute.VALUE]
        assert isinstance(extractor, WrapMixin)
        with pytest.raises(KeyUnextractable):
            extractor.wrap_key(obj, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        if publics:
            assert publics[0][Attribute.MODIFIABLE] is False
            assert hsm.public_key(ref) == (public_der or spki(key2.public_key()))
        # No transient object (staging, ephemeral AES key) is left in the session.
        assert [o for o in raw_session.get_objects({Attribute.TOKEN: False})
                if o.object_class is ObjectClass.SECRET_KEY and o[Attribute.LABEL] != "test-extractor"] == []
    finally:
        hsm.destroy_key(ref)
        hsm.destroy_wrapping_key(wrapping)


def _flag(obj: Object, attribute: Attribute) -> bool:
    try:
        return bool(obj[attribute])
    except Exception:
        return False
