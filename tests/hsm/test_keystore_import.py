"""BYOK through the KeyStore (Origin EXTERNAL), on SoftHSM2 and on the in-memory HSM.

Known-answer proofs: material imported through GetParametersForImport/ImportKeyMaterial
is exactly the material the HSM then uses (AES blobs open with pyca's AESGCM and the
known key; HMAC tags equal Python's hmac; signatures verify with the known public key).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from byok import pkcs8, spki, wrap
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hsmkeys import ciphertext
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.clock import FakeClock
from hsmkeys.errors import (
    ExpiredImportTokenException,
    IncorrectKeyMaterialException,
    InvalidCiphertextException,
    InvalidImportTokenException,
    KMSInvalidStateException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.hsm.pkcs11 import Pkcs11Hsm
from hsmkeys.keystore import KeyStore
from hsmkeys.models import KeyState

AES_KEY = bytes(range(32))


@pytest.fixture(params=["softhsm", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    hsm = request.getfixturevalue("hsm") if request.param == "softhsm" else MemoryHsm()
    catalog = SqliteCatalog(tmp_path / "catalog.db")
    yield KeyStore(hsm=hsm, catalog=catalog, clock=FakeClock())
    catalog.close()


def _algorithm(store: KeyStore, *, private_key: bool = False) -> str:
    """The strongest algorithm this HSM unwraps (SoftHSM2 lacks the SHA-256 OAEP ones)."""
    offered = store._hsm.wrapping_algorithms()
    order = ["RSA_AES_KEY_WRAP_SHA_256", "RSA_AES_KEY_WRAP_SHA_1"]
    if not private_key:
        order = ["RSAES_OAEP_SHA_256", *order, "RSAES_OAEP_SHA_1"]
    return next(a for a in order if a in offered)


def _import(store: KeyStore, key_id: str, material: bytes, *, private_key: bool = False, **kwargs: object) -> None:
    algorithm = _algorithm(store, private_key=private_key)
    params = store.get_parameters_for_import(key_id=key_id, wrapping_algorithm=algorithm, wrapping_key_spec="RSA_2048")
    store.import_key_material(
        key_id=key_id,
        import_token=params.import_token,
        encrypted_key_material=wrap(params.public_key, algorithm, material),
        **kwargs,  # type: ignore[arg-type]
    )


def test_an_external_key_waits_for_material_then_holds_exactly_it(store: KeyStore) -> None:
    key = store.create_key(origin="EXTERNAL").key_metadata
    assert key.key_state is KeyState.PENDING_IMPORT and key.origin == "EXTERNAL"
    with pytest.raises(KMSInvalidStateException):
        store.encrypt(key_id=key.key_id, plaintext=b"x")
    _import(store, key.key_id, AES_KEY)
    assert store.describe_key(key_id=key.key_id).key_metadata.key_state is KeyState.ENABLED
    context = {"purpose": "kat"}
    blob = store.encrypt(key_id=key.key_id, plaintext=b"known answer", encryption_context=context).ciphertext_blob
    parsed = ciphertext.unpack(blob)
    aad = parsed.header + ciphertext.canonical_context(context)
    assert AESGCM(AES_KEY).decrypt(parsed.iv, parsed.body, aad) == b"known answer"
    assert store.decrypt(ciphertext_blob=blob, encryption_context=context).plaintext == b"known answer"


def test_deleted_material_comes_back_only_as_the_same_material(store: KeyStore) -> None:
    before = store._hsm.list_key_refs()
    key_id = store.create_key(origin="EXTERNAL").key_metadata.key_id
    _import(store, key_id, AES_KEY)
    blob = store.encrypt(key_id=key_id, plaintext=b"x").ciphertext_blob
    store.delete_imported_key_material(key_id=key_id)
    assert store.describe_key(key_id=key_id).key_metadata.key_state is KeyState.PENDING_IMPORT
    with pytest.raises(KMSInvalidStateException):
        store.decrypt(ciphertext_blob=blob)
    with pytest.raises(IncorrectKeyMaterialException):
        _import(store, key_id, os.urandom(32))
    assert store.describe_key(key_id=key_id).key_metadata.key_state is KeyState.PENDING_IMPORT
    _import(store, key_id, AES_KEY)
    assert store.decrypt(ciphertext_blob=blob).plaintext == b"x"
    with pytest.raises(IncorrectKeyMaterialException):  # re-import over live material
        _import(store, key_id, os.urandom(32))
    assert store.decrypt(ciphertext_blob=blob).plaintext == b"x"
    # Scratch and refused objects are gone: the key's one object is all this test added.
    added = {str(r.key_uuid) for r in store._hsm.list_key_refs() - before if r.key_uuid.int != 0}
    assert added == {key_id}  # (uuid 0 holds the service's own keys, e.g. the import-token key)


def test_import_tokens_are_bound_authenticated_and_expire(store: KeyStore) -> None:
    first = store.create_key(origin="EXTERNAL").key_metadata.key_id
    second = store.create_key(origin="EXTERNAL").key_metadata.key_id
    algorithm = _algorithm(store)
    params = store.get_parameters_for_import(key_id=first, wrapping_algorithm=algorithm, wrapping_key_spec="RSA_2048")
    wrapped = wrap(params.public_key, algorithm, AES_KEY)
    with pytest.raises(InvalidImportTokenException):
        store.import_key_material(key_id=second, import_token=params.import_token, encrypted_key_material=wrapped)
    forged = bytearray(params.import_token)
    forged[-40] ^= 1
    with pytest.raises(InvalidImportTokenException):
        store.import_key_material(key_id=first, import_token=bytes(forged), encrypted_key_material=wrapped)
    with pytest.raises(InvalidImportTokenException):
        store.import_key_material(key_id=first, import_token=b"junk", encrypted_key_material=wrapped)
    store._clock.advance(hours=24)  # type: ignore[attr-defined]
    with pytest.raises(ExpiredImportTokenException):
        store.import_key_material(key_id=first, import_token=params.import_token, encrypted_key_material=wrapped)


def test_material_that_does_not_unwrap_or_has_the_wrong_length_is_refused(store: KeyStore) -> None:
    key_id = store.create_key(origin="EXTERNAL").key_metadata.key_id
    algorithm = _algorithm(store)
    params = store.get_parameters_for_import(key_id=key_id, wrapping_algorithm=algorithm, wrapping_key_spec="RSA_2048")
    with pytest.raises(InvalidCiphertextException):
        store.import_key_material(key_id=key_id, import_token=params.import_token, encrypted_key_material=os.urandom(256))
    with pytest.raises(IncorrectKeyMaterialException):
        store.import_key_material(
            key_id=key_id, import_token=params.import_token,
            encrypted_key_material=wrap(params.public_key, algorithm, os.urandom(16)),
        )
    assert store.describe_key(key_id=key_id).key_metadata.key_state is KeyState.PENDING_IMPORT


def test_expiring_material_is_removed_by_maintenance(store: KeyStore) -> None:
    key_id = store.create_key(origin="EXTERNAL").key_metadata.key_id
    with pytest.raises(ValidationException):
        _import(store, key_id, AES_KEY, expiration_model="KEY_MATERIAL_EXPIRES")
    valid_to = store._clock.now() + timedelta(days=2)  # type: ignore[attr-defined]
    _import(store, key_id, AES_KEY, valid_to=valid_to)
    meta = store.describe_key(key_id=key_id).key_metadata
    assert meta.expiration_model == "KEY_MATERIAL_EXPIRES" and meta.valid_to == valid_to
    store._clock.advance(days=3)  # type: ignore[attr-defined]
    store.run_maintenance()
    assert store.describe_key(key_id=key_id).key_metadata.key_state is KeyState.PENDING_IMPORT


def test_an_aws_kms_key_refuses_import_and_external_keys_refuse_rotation(store: KeyStore) -> None:
    native = store.create_key().key_metadata.key_id
    with pytest.raises(UnsupportedOperationException):
        store.get_parameters_for_import(key_id=native, wrapping_algorithm="RSAES_OAEP_SHA_1", wrapping_key_spec="RSA_2048")
    external = store.create_key(origin="EXTERNAL").key_metadata.key_id
    rotation_calls = (store.enable_key_rotation, store.disable_key_rotation, store.rotate_key_on_demand)
    for call in rotation_calls:  # pending import: still "origin EXTERNAL", not the key state
        with pytest.raises(UnsupportedOperationException):
            call(key_id=external)
    _import(store, external, AES_KEY)
    for call in rotation_calls:
        with pytest.raises(UnsupportedOperationException):
            call(key_id=external)


def test_a_known_hmac_key_gives_known_tags(store: KeyStore) -> None:
    secret = bytes(range(64))
    key_id = store.create_key(origin="EXTERNAL", key_spec="HMAC_256", key_usage="GENERATE_VERIFY_MAC").key_metadata.key_id
    _import(store, key_id, secret)
    tag = store.generate_mac(key_id=key_id, message=b"hello", mac_algorithm="HMAC_SHA_256").mac
    assert tag == hmac.new(secret, b"hello", hashlib.sha256).digest()


@pytest.mark.parametrize("curve,spec", [(ec.SECP256K1(), "ECC_SECG_P256K1"), (ec.SECP256R1(), "ECC_NIST_P256")])
def test_a_known_ec_key_signs_as_itself_and_shows_its_public_key(
    store: KeyStore, curve: ec.EllipticCurve, spec: str
) -> None:
    private = ec.derive_private_key(0xC0FFEE ^ int.from_bytes(spec.encode(), "big") % 2**64, curve)
    key_id = store.create_key(origin="EXTERNAL", key_spec=spec, key_usage="SIGN_VERIFY").key_metadata.key_id
    _import(store, key_id, pkcs8(private), private_key=True)
    assert store.get_public_key(key_id=key_id).public_key == spki(private.public_key())
    digest = hashlib.sha256(b"message").digest()
    signature = store.sign(key_id=key_id, message=digest, message_type="DIGEST", signing_algorithm="ECDSA_SHA_256").signature
    private.public_key().verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_a_known_ecdh_key_derives_the_known_shared_secret(store: KeyStore) -> None:
    private = ec.derive_private_key(123456789, ec.SECP256R1())
    key_id = store.create_key(origin="EXTERNAL", key_spec="ECC_NIST_P256", key_usage="KEY_AGREEMENT").key_metadata.key_id
    _import(store, key_id, pkcs8(private), private_key=True)
    peer = ec.generate_private_key(ec.SECP256R1())
    shared = store.derive_shared_secret(
        key_id=key_id, key_agreement_algorithm="ECDH", public_key=spki(peer.public_key())
    ).shared_secret
    assert shared == private.exchange(ec.ECDH(), peer.public_key())


def test_imported_objects_are_not_extractable_on_softhsm(hsm: Pkcs11Hsm, tmp_path: Path) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    catalog = SqliteCatalog(tmp_path / "c.db")
    store = KeyStore(hsm=hsm, catalog=catalog, clock=FakeClock())
    key_id = store.create_key(origin="EXTERNAL").key_metadata.key_id
    _import(store, key_id, AES_KEY)
    session = hsm._live_session()
    secret = session.get_key(object_class=ObjectClass.SECRET_KEY, label=f"hsmkeys/{key_id}/v1")
    assert secret[Attribute.SENSITIVE] and not secret[Attribute.EXTRACTABLE]
    with pytest.raises(pkcs11.exceptions.AttributeSensitive):
        secret[Attribute.VALUE]
    catalog.close()
