"""Key material identifiers on the wire: Decrypt/GenerateDataKey*/ImportKeyMaterial/
DeleteImportedKeyMaterial ``KeyMaterialId``, ReEncrypt ``SourceKeyMaterialId`` and
``DestinationKeyMaterialId``, and ``KeyMetadata.CurrentKeyMaterialId``.

Every call goes through the server's wire layer in process (LocalKms), on the in-memory
HSM and on a SoftHSM2 token. The ids must agree with ListKeyRotations' ``KeyMaterialId``
(one per key version) and be valid ``BackingKeyIdType`` values; members KMS leaves out
(asymmetric and HMAC keys, a key without material) must be absent, not null or empty.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.clock import FakeClock
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.keystore import KeyStore
from hsmkeys.kmsclient import LocalKms

_MODEL = botocore.session.get_session().get_service_model("kms")
_MATERIAL_ID_MEMBERS = ("KeyMaterialId", "SourceKeyMaterialId", "DestinationKeyMaterialId")


def _check_material_ids(shape: Any, value: Mapping[str, Any], where: str) -> None:
    """Every *KeyMaterialId in a response meets its model shape (length, pattern)."""
    for name, member in shape.members.items():
        if name not in value:
            continue
        if member.type_name == "structure":
            _check_material_ids(member, value[name], f"{where}.{name}")
        elif name in _MATERIAL_ID_MEMBERS or name == "CurrentKeyMaterialId":
            text = value[name]
            meta = member.metadata
            assert isinstance(text, str), f"{where}.{name}: {text!r}"
            assert meta.get("min", 0) <= len(text) <= meta["max"], f"{where}.{name}: {text!r}"
            assert re.search(meta["pattern"], text), f"{where}.{name}: {text!r}"
            assert len(text) == 64, f"{where}.{name}: {text!r}"  # SHA-256 hex, as ListKeyRotations


class CheckedKms:
    """LocalKms whose responses have their key material ids checked against the model."""

    def __init__(self, store: KeyStore) -> None:
        self._kms = LocalKms(store)

    def __call__(self, operation: str, **params: Any) -> dict[str, Any]:
        response = self._kms.call(operation, params)
        shape = _MODEL.operation_model(operation).output_shape
        if shape is not None:
            _check_material_ids(shape, response, operation)
            for member in (*_MATERIAL_ID_MEMBERS, "CurrentKeyMaterialId"):
                assert response.get(member, "absent") is not None, f"{operation}: {member} is null"
        return response


@pytest.fixture(params=["memory", pytest.param("softhsm", marks=pytest.mark.hsm)])
def kms(request: pytest.FixtureRequest) -> CheckedKms:
    store = request.getfixturevalue("store" if request.param == "memory" else "hsm_keystore")
    return CheckedKms(store)


def _current(kms: CheckedKms, key_id: str) -> str:
    metadata = kms("DescribeKey", KeyId=key_id)["KeyMetadata"]
    current: str = metadata["CurrentKeyMaterialId"]
    return current


def _rotation_ids(kms: CheckedKms, key_id: str) -> list[str]:
    return [entry["KeyMaterialId"] for entry in kms("ListKeyRotations", KeyId=key_id)["Rotations"]]


def _wrap(spki: bytes, material: bytes) -> bytes:
    public = load_der_public_key(spki)
    assert isinstance(public, rsa.RSAPublicKey)
    return public.encrypt(material, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None))


def _import(kms: CheckedKms, key_id: str, material: bytes) -> dict[str, Any]:
    params = kms(
        "GetParametersForImport", KeyId=key_id, WrappingAlgorithm="RSAES_OAEP_SHA_1", WrappingKeySpec="RSA_2048"
    )
    return kms(
        "ImportKeyMaterial",
        KeyId=key_id,
        ImportToken=params["ImportToken"],
        EncryptedKeyMaterial=_wrap(params["PublicKey"], material),
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
    )


# ------------------------------------------------ symmetric keys: Encrypt, Decrypt, rotation


def test_create_and_describe_show_the_current_key_material_id_that_decrypt_reports(kms: CheckedKms) -> None:
    created = kms("CreateKey", Description="material ids")["KeyMetadata"]
    current = created["CurrentKeyMaterialId"]
    assert kms("DescribeKey", KeyId=created["Arn"])["KeyMetadata"]["CurrentKeyMaterialId"] == current
    blob = kms("Encrypt", KeyId=created["KeyId"], Plaintext=b"secret")["CiphertextBlob"]
    opened = kms("Decrypt", CiphertextBlob=blob)
    assert opened["Plaintext"] == b"secret"
    assert opened["KeyMaterialId"] == current
    other = kms("CreateKey")["KeyMetadata"]["CurrentKeyMaterialId"]
    assert other != current  # an id names one key's material, not the spec


def test_decrypt_of_old_ciphertext_names_the_old_material_as_list_key_rotations_does(kms: CheckedKms) -> None:
    key_id = kms("CreateKey")["KeyMetadata"]["KeyId"]
    first = _current(kms, key_id)
    blob_v1 = kms("Encrypt", KeyId=key_id, Plaintext=b"one")["CiphertextBlob"]

    kms("RotateKeyOnDemand", KeyId=key_id)
    second = _current(kms, key_id)
    assert second != first
    assert _rotation_ids(kms, key_id) == [second]
    assert kms("Decrypt", CiphertextBlob=blob_v1)["KeyMaterialId"] == first  # the first version's id
    blob_v2 = kms("Encrypt", KeyId=key_id, Plaintext=b"two")["CiphertextBlob"]
    assert kms("Decrypt", CiphertextBlob=blob_v2)["KeyMaterialId"] == second

    kms("RotateKeyOnDemand", KeyId=key_id)
    third = _current(kms, key_id)
    rotations = _rotation_ids(kms, key_id)
    assert rotations == [second, third] and first not in rotations
    old = kms("Decrypt", CiphertextBlob=blob_v2)
    assert old["Plaintext"] == b"two"
    assert old["KeyMaterialId"] == rotations[0] != third  # ListKeyRotations' id, not the current one
    assert kms("Decrypt", CiphertextBlob=blob_v1)["KeyMaterialId"] == first
    blob_v3 = kms("Encrypt", KeyId=key_id, Plaintext=b"three")["CiphertextBlob"]
    assert kms("Decrypt", CiphertextBlob=blob_v3)["KeyMaterialId"] == third


# ------------------------------------------------ data keys and data key pairs


@pytest.mark.parametrize(
    ("operation", "params", "blob_member"),
    [
        ("GenerateDataKey", {"KeySpec": "AES_256"}, "CiphertextBlob"),
        ("GenerateDataKeyWithoutPlaintext", {"NumberOfBytes": 16}, "CiphertextBlob"),
        ("GenerateDataKeyPair", {"KeyPairSpec": "ECC_NIST_P256"}, "PrivateKeyCiphertextBlob"),
        ("GenerateDataKeyPairWithoutPlaintext", {"KeyPairSpec": "ECC_NIST_P256"}, "PrivateKeyCiphertextBlob"),
    ],
)
def test_data_key_operations_name_the_material_that_encrypted_the_key(
    kms: CheckedKms, operation: str, params: dict[str, Any], blob_member: str
) -> None:
    key_id = kms("CreateKey")["KeyMetadata"]["KeyId"]
    first = _current(kms, key_id)
    made = kms(operation, KeyId=key_id, **params)
    assert made["KeyMaterialId"] == first
    kms("RotateKeyOnDemand", KeyId=key_id)
    second = _current(kms, key_id)
    again = kms(operation, KeyId=key_id, EncryptionContext={"purpose": "test"}, **params)
    assert again["KeyMaterialId"] == second == _rotation_ids(kms, key_id)[0]
    assert kms("Decrypt", CiphertextBlob=made[blob_member])["KeyMaterialId"] == first
    opened = kms("Decrypt", CiphertextBlob=again[blob_member], EncryptionContext={"purpose": "test"})
    assert opened["KeyMaterialId"] == second


def test_data_key_names_the_version_that_sealed_it_when_the_call_rotated_the_key(tmp_path: Path) -> None:
    """A version that spent its AES-GCM budget is rotated inside the call: the data key is
    sealed under the new version, and that is the id returned (not the one current before)."""
    catalog = SqliteCatalog(tmp_path / "catalog.db")
    try:
        store = KeyStore(
            hsm=MemoryHsm(), catalog=catalog, clock=FakeClock(), gcm_encryption_limit=2, gcm_reservation_block=1
        )
        kms = CheckedKms(store)
        key_id = kms("CreateKey")["KeyMetadata"]["KeyId"]
        first = _current(kms, key_id)
        made = [kms("GenerateDataKey", KeyId=key_id, KeySpec="AES_128") for _ in range(3)]
        second = _current(kms, key_id)
        assert second != first
        assert [m["KeyMaterialId"] for m in made] == [first, first, second]
        for m in made:
            assert kms("Decrypt", CiphertextBlob=m["CiphertextBlob"])["KeyMaterialId"] == m["KeyMaterialId"]
    finally:
        catalog.close()


# ------------------------------------------------ ReEncrypt


def test_re_encrypt_names_source_and_destination_material_of_symmetric_keys_only(kms: CheckedKms) -> None:
    source = kms("CreateKey")["KeyMetadata"]["KeyId"]
    destination = kms("CreateKey")["KeyMetadata"]["KeyId"]
    rsa_key = kms("CreateKey", KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    source_first = _current(kms, source)
    blob = kms("Encrypt", KeyId=source, Plaintext=b"moving")["CiphertextBlob"]
    kms("RotateKeyOnDemand", KeyId=source)  # the source id is the blob's material, not the current one

    moved = kms("ReEncrypt", CiphertextBlob=blob, DestinationKeyId=destination)
    assert moved["SourceKeyMaterialId"] == source_first != _current(kms, source)
    assert moved["DestinationKeyMaterialId"] == _current(kms, destination)
    assert kms("Decrypt", CiphertextBlob=moved["CiphertextBlob"])["KeyMaterialId"] == moved["DestinationKeyMaterialId"]

    to_rsa = kms(
        "ReEncrypt",
        CiphertextBlob=blob,
        DestinationKeyId=rsa_key,
        DestinationEncryptionAlgorithm="RSAES_OAEP_SHA_256",
    )
    assert to_rsa["SourceKeyMaterialId"] == source_first
    assert "DestinationKeyMaterialId" not in to_rsa

    from_rsa = kms(
        "ReEncrypt",
        CiphertextBlob=to_rsa["CiphertextBlob"],
        SourceKeyId=rsa_key,
        SourceEncryptionAlgorithm="RSAES_OAEP_SHA_256",
        DestinationKeyId=destination,
    )
    assert "SourceKeyMaterialId" not in from_rsa
    assert from_rsa["DestinationKeyMaterialId"] == _current(kms, destination)

    rsa_to_rsa = kms(
        "ReEncrypt",
        CiphertextBlob=to_rsa["CiphertextBlob"],
        SourceKeyId=rsa_key,
        SourceEncryptionAlgorithm="RSAES_OAEP_SHA_256",
        DestinationKeyId=rsa_key,
        DestinationEncryptionAlgorithm="RSAES_OAEP_SHA_1",
    )
    assert "SourceKeyMaterialId" not in rsa_to_rsa and "DestinationKeyMaterialId" not in rsa_to_rsa


# ------------------------------------------------ keys without key material ids


def test_rsa_decrypt_has_no_key_material_id(kms: CheckedKms) -> None:
    key_id = kms("CreateKey", KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    blob = kms("Encrypt", KeyId=key_id, Plaintext=b"rsa", EncryptionAlgorithm="RSAES_OAEP_SHA_256")["CiphertextBlob"]
    opened = kms("Decrypt", CiphertextBlob=blob, KeyId=key_id, EncryptionAlgorithm="RSAES_OAEP_SHA_256")
    assert opened["Plaintext"] == b"rsa"
    assert "KeyMaterialId" not in opened


@pytest.mark.parametrize(
    ("key_spec", "key_usage"),
    [
        ("RSA_2048", "ENCRYPT_DECRYPT"),
        ("RSA_2048", "SIGN_VERIFY"),
        ("ECC_NIST_P256", "SIGN_VERIFY"),
        ("HMAC_256", "GENERATE_VERIFY_MAC"),
    ],
)
def test_asymmetric_and_hmac_keys_have_no_current_key_material_id(
    kms: CheckedKms, key_spec: str, key_usage: str
) -> None:
    created = kms("CreateKey", KeySpec=key_spec, KeyUsage=key_usage)["KeyMetadata"]
    assert "CurrentKeyMaterialId" not in created
    assert "CurrentKeyMaterialId" not in kms("DescribeKey", KeyId=created["KeyId"])["KeyMetadata"]


# ------------------------------------------------ imported key material


def test_imported_symmetric_material_has_one_id_from_import_to_delete(kms: CheckedKms) -> None:
    material = os.urandom(32)
    created = kms("CreateKey", Origin="EXTERNAL")["KeyMetadata"]
    key_id = created["KeyId"]
    assert created["KeyState"] == "PendingImport" and "CurrentKeyMaterialId" not in created

    imported = _import(kms, key_id, material)
    material_id = imported["KeyMaterialId"]
    described = kms("DescribeKey", KeyId=key_id)["KeyMetadata"]
    assert described["KeyState"] == "Enabled" and described["CurrentKeyMaterialId"] == material_id
    blob = kms("Encrypt", KeyId=key_id, Plaintext=b"byok")["CiphertextBlob"]
    assert kms("Decrypt", CiphertextBlob=blob)["KeyMaterialId"] == material_id
    data_key = kms("GenerateDataKey", KeyId=key_id, KeySpec="AES_256")
    assert data_key["KeyMaterialId"] == material_id

    deleted = kms("DeleteImportedKeyMaterial", KeyId=key_id)
    assert deleted["KeyMaterialId"] == material_id
    described = kms("DescribeKey", KeyId=key_id)["KeyMetadata"]
    assert described["KeyState"] == "PendingImport" and "CurrentKeyMaterialId" not in described
    assert "KeyMaterialId" not in kms("DeleteImportedKeyMaterial", KeyId=key_id)  # nothing left to delete

    assert _import(kms, key_id, material)["KeyMaterialId"] == material_id  # the same material again
    assert _current(kms, key_id) == material_id
    assert kms("Decrypt", CiphertextBlob=blob)["KeyMaterialId"] == material_id


def test_imported_hmac_material_has_no_key_material_id(kms: CheckedKms) -> None:
    key_id = kms("CreateKey", Origin="EXTERNAL", KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"][
        "KeyId"
    ]
    assert "KeyMaterialId" not in _import(kms, key_id, os.urandom(32))
    described = kms("DescribeKey", KeyId=key_id)["KeyMetadata"]
    assert described["KeyState"] == "Enabled" and "CurrentKeyMaterialId" not in described
    assert "KeyMaterialId" not in kms("DeleteImportedKeyMaterial", KeyId=key_id)


def test_a_key_pending_deletion_shows_its_material_id_only_if_it_has_material(kms: CheckedKms) -> None:
    with_material = kms("CreateKey")["KeyMetadata"]
    kms("ScheduleKeyDeletion", KeyId=with_material["KeyId"], PendingWindowInDays=7)
    described = kms("DescribeKey", KeyId=with_material["KeyId"])["KeyMetadata"]
    assert described["KeyState"] == "PendingDeletion"
    assert described["CurrentKeyMaterialId"] == with_material["CurrentKeyMaterialId"]

    without = kms("CreateKey", Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    kms("ScheduleKeyDeletion", KeyId=without, PendingWindowInDays=7)
    described = kms("DescribeKey", KeyId=without)["KeyMetadata"]
    assert described["KeyState"] == "PendingDeletion" and "CurrentKeyMaterialId" not in described
