"""Pkcs11Hsm against SoftHSM2: object attributes, non-extractability, lifecycle of objects, errors."""

from __future__ import annotations

import os
import uuid

import pytest
from hsm_shared import SharedKeys
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import AttributeSensitive, KeyUnextractable
from pkcs11.types import Key, Object, Session, WrapMixin

from hsmkeys import keyspecs
from hsmkeys.errors import (
    AlreadyExistsException,
    InvalidCiphertextException,
    NotFoundException,
)
from hsmkeys.hsm.pkcs11 import Pkcs11Hsm
from hsmkeys.models import EncryptionAlgorithm, KeySpec, KeyUsage, KeyVersionRef

pytestmark = pytest.mark.hsm

# Every spec with every usage it allows (RSA_4096 comes from the shared session key).
SPEC_USAGES = [
    (spec, usage)
    for spec, usages in keyspecs.ALLOWED_USAGES.items()
    for usage in usages
    if (spec, usage) != (KeySpec.RSA_4096, KeyUsage.ENCRYPT_DECRYPT)  # one 4096 key per session
]
EXPECTED_CAPABILITIES = {
    KeyUsage.ENCRYPT_DECRYPT: {Attribute.ENCRYPT, Attribute.DECRYPT},
    KeyUsage.SIGN_VERIFY: {Attribute.SIGN, Attribute.VERIFY},
    KeyUsage.GENERATE_VERIFY_MAC: {Attribute.SIGN, Attribute.VERIFY},
    KeyUsage.KEY_AGREEMENT: {Attribute.DERIVE},
}
CAPABILITIES = (
    Attribute.ENCRYPT,
    Attribute.DECRYPT,
    Attribute.SIGN,
    Attribute.VERIFY,
    Attribute.WRAP,
    Attribute.UNWRAP,
    Attribute.DERIVE,
    Attribute.SIGN_RECOVER,
    Attribute.VERIFY_RECOVER,
)


def new_ref() -> KeyVersionRef:
    return KeyVersionRef(uuid.uuid4(), 1)


def objects_of(session: Session, ref: KeyVersionRef) -> list[Object]:
    return list(session.get_objects({Attribute.ID: ref.object_id}))


@pytest.fixture(scope="module")
def wrapping_key(raw_session: Session) -> Object:
    return raw_session.generate_key(
        KeyType.AES, 256, label="test-wrapper", capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP
    )


@pytest.mark.parametrize(("spec", "usage"), SPEC_USAGES, ids=lambda v: str(v))
def test_every_key_object_is_sensitive_and_never_extractable(
    spec: KeySpec, usage: KeyUsage, shared_keys: SharedKeys, raw_session: Session, wrapping_key: Object
) -> None:
    ref = shared_keys.ref(spec, usage)
    objects = objects_of(raw_session, ref)
    secret = [o for o in objects if o.object_class in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY)]
    public = [o for o in objects if o.object_class is ObjectClass.PUBLIC_KEY]
    assert len(secret) == 1
    assert len(public) == (0 if spec is KeySpec.SYMMETRIC_DEFAULT or spec.startswith("HMAC") else 1)
    key = secret[0]
    assert isinstance(key, Key)
    attrs = key.get_attributes(
        [
            Attribute.TOKEN,
            Attribute.PRIVATE,
            Attribute.SENSITIVE,
            Attribute.ALWAYS_SENSITIVE,
            Attribute.EXTRACTABLE,
            Attribute.NEVER_EXTRACTABLE,
            Attribute.MODIFIABLE,
            Attribute.LABEL,
            Attribute.ID,
        ]
    )
    assert attrs[Attribute.TOKEN] and attrs[Attribute.PRIVATE]
    assert attrs[Attribute.SENSITIVE] and attrs[Attribute.ALWAYS_SENSITIVE]
    assert attrs[Attribute.EXTRACTABLE] is False
    assert attrs[Attribute.NEVER_EXTRACTABLE] is True
    assert attrs[Attribute.MODIFIABLE] is False
    assert attrs[Attribute.LABEL] == ref.label and attrs[Attribute.ID] == ref.object_id

    enabled = {a for a in CAPABILITIES if _flag(key, a)}
    expected = EXPECTED_CAPABILITIES[usage]
    if key.object_class is ObjectClass.PRIVATE_KEY:
        expected = expected & {Attribute.DECRYPT, Attribute.SIGN, Attribute.DERIVE}
    assert enabled == expected

    secret_attr = {
        KeyType.RSA: Attribute.PRIVATE_EXPONENT,
        KeyType.EC: Attribute.VALUE,
    }.get(key.key_type, Attribute.VALUE)
    with pytest.raises(AttributeSensitive):
        key[secret_attr]
    assert isinstance(wrapping_key, WrapMixin)
    with pytest.raises(KeyUnextractable):
        wrapping_key.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)


def _flag(obj: Object, attribute: Attribute) -> bool:
    try:
        return bool(obj[attribute])
    except Exception:
        return False


def test_public_halves_are_readable_non_modifiable_token_objects(
    shared_keys: SharedKeys, raw_session: Session
) -> None:
    ref = shared_keys.ref(KeySpec.ECC_NIST_P256, KeyUsage.SIGN_VERIFY)
    (public,) = [o for o in objects_of(raw_session, ref) if o.object_class is ObjectClass.PUBLIC_KEY]
    assert public[Attribute.TOKEN] and public[Attribute.MODIFIABLE] is False
    assert public[Attribute.EC_POINT]


def test_create_list_has_destroy(hsm: Pkcs11Hsm, raw_session: Session) -> None:
    secret, pair = new_ref(), new_ref()
    hsm.create_key(secret, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
    hsm.create_key(pair, KeySpec.ECC_NIST_P256, KeyUsage.SIGN_VERIFY)
    assert hsm.has_key(secret) and hsm.has_key(pair)
    assert {secret, pair} <= hsm.list_key_refs()
    assert len(objects_of(raw_session, pair)) == 2

    hsm.destroy_key(pair)
    hsm.destroy_key(secret)
    assert objects_of(raw_session, pair) == [] and objects_of(raw_session, secret) == []
    assert not hsm.has_key(secret)
    assert not {secret, pair} & hsm.list_key_refs()
    hsm.destroy_key(secret)  # nothing left: not an error
    with pytest.raises(NotFoundException):
        hsm.encrypt_aes_gcm(secret, b"\0" * 12, b"", b"x")


def test_create_twice_is_already_exists(hsm: Pkcs11Hsm) -> None:
    ref = new_ref()
    hsm.create_key(ref, KeySpec.HMAC_256, KeyUsage.GENERATE_VERIFY_MAC)
    try:
        with pytest.raises(AlreadyExistsException):
            hsm.create_key(ref, KeySpec.HMAC_256, KeyUsage.GENERATE_VERIFY_MAC)
    finally:
        hsm.destroy_key(ref)


def test_list_ignores_objects_that_are_not_hsmkeys(hsm: Pkcs11Hsm, raw_session: Session) -> None:
    other = raw_session.generate_key(
        KeyType.AES, 256, id=b"x" * 20, label="someone-else", store=True,
        capabilities=MechanismFlag.ENCRYPT,
    )
    try:
        refs = hsm.list_key_refs()
        assert all(r.label.startswith("hsmkeys/") for r in refs)
        assert KeyVersionRef(uuid.UUID(bytes=b"x" * 16), int.from_bytes(b"xxxx", "big")) not in refs
    finally:
        other.destroy()


def test_random_counts_bytes(hsm: Pkcs11Hsm) -> None:
    assert hsm.random(0) == b""
    values = {hsm.random(32) for _ in range(4)}
    assert len(values) == 4 and all(len(v) == 32 for v in values)
    assert len(hsm.random(1024)) == 1024


def test_aes_gcm_round_trip_and_every_tampering_is_invalid_ciphertext(hsm: Pkcs11Hsm) -> None:
    ref = new_ref()
    hsm.create_key(ref, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
    try:
        iv, aad = os.urandom(12), b"header"
        body = hsm.encrypt_aes_gcm(ref, iv, aad, b"attack at dawn")
        assert len(body) == len(b"attack at dawn") + 16
        assert hsm.decrypt_aes_gcm(ref, iv, aad, body) == b"attack at dawn"
        assert hsm.decrypt_aes_gcm(ref, iv, aad, hsm.encrypt_aes_gcm(ref, iv, aad, b"")) == b""
        bad = [
            (iv, aad, body[:-1] + bytes([body[-1] ^ 1])),  # tag
            (iv, aad, bytes([body[0] ^ 1]) + body[1:]),  # ciphertext
            (iv, b"other", body),  # AAD
            (os.urandom(12), aad, body),  # IV
            (iv[:8], aad, body),  # short IV (SoftHSM2 would accept it)
            (iv, aad, body[:-12]),  # 32-bit tag
            (iv, aad, b""),
        ]
        messages = set()
        for bad_iv, bad_aad, bad_body in bad:
            with pytest.raises(InvalidCiphertextException) as caught:
                hsm.decrypt_aes_gcm(ref, bad_iv, bad_aad, bad_body)
            messages.add(str(caught.value))
        assert len(messages) == 1
    finally:
        hsm.destroy_key(ref)


def test_object_destroyed_behind_the_cache_is_not_found(hsm: Pkcs11Hsm, raw_session: Session) -> None:
    ref = new_ref()
    hsm.create_key(ref, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
    hsm.encrypt_aes_gcm(ref, b"\0" * 12, b"", b"warm the cache")
    for obj in objects_of(raw_session, ref):
        obj.destroy()
    with pytest.raises(NotFoundException):
        hsm.encrypt_aes_gcm(ref, b"\0" * 12, b"", b"x")


def test_status_names_the_token(hsm: Pkcs11Hsm) -> None:
    status = hsm.status()
    assert status.token_label.startswith("hsmkeys-test-")
    assert "SoftHSM" in status.manufacturer or "SoftHSM" in status.model


def test_rsa_oaep_backend_failures_are_one_invalid_ciphertext(hsm: Pkcs11Hsm, shared_keys: SharedKeys) -> None:
    ref = shared_keys.ref(KeySpec.RSA_2048, KeyUsage.ENCRYPT_DECRYPT)
    messages = set()
    for algorithm in (EncryptionAlgorithm.RSAES_OAEP_SHA_1, EncryptionAlgorithm.RSAES_OAEP_SHA_256):
        for ciphertext in (os.urandom(256), b"\x00" * 256, b"\xff" * 256, os.urandom(255), b""):
            with pytest.raises(InvalidCiphertextException) as caught:
                hsm.decrypt_rsa_oaep(ref, algorithm, ciphertext)
            messages.add(str(caught.value))
    assert len(messages) == 1


def test_signing_key_cannot_decrypt(hsm: Pkcs11Hsm, shared_keys: SharedKeys) -> None:
    ref = shared_keys.ref(KeySpec.RSA_2048, KeyUsage.SIGN_VERIFY)
    with pytest.raises(InvalidCiphertextException):
        hsm.decrypt_rsa_oaep(ref, EncryptionAlgorithm.RSAES_OAEP_SHA_256, os.urandom(256))
