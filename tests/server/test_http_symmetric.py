"""Symmetric keys through boto3: every key-management and envelope operation."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError
from server_harness import ACCOUNT_ID, KEY_ARN, REGION, ServerProcess, kms_call

pytestmark = pytest.mark.server


def error_code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return str(excinfo.value.response["Error"]["Code"])


@pytest.fixture
def key(kms: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = kms.create_key(Description="symmetric test key")["KeyMetadata"]
    return metadata


def test_create_key_returns_metadata_with_arn(kms: Any) -> None:
    metadata = kms.create_key(
        Description="made by boto3",
        Tags=[{"TagKey": "team", "TagValue": "crypto"}],
    )["KeyMetadata"]
    assert KEY_ARN.match(metadata["Arn"])
    assert metadata["Arn"].endswith(metadata["KeyId"])
    assert uuid.UUID(metadata["KeyId"])
    assert metadata["AWSAccountId"] == ACCOUNT_ID
    assert metadata["KeyState"] == "Enabled"
    assert metadata["Enabled"] is True
    assert metadata["KeySpec"] == "SYMMETRIC_DEFAULT"
    assert metadata["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert metadata["EncryptionAlgorithms"] == ["SYMMETRIC_DEFAULT"]
    assert metadata["Description"] == "made by boto3"
    tags = kms.list_resource_tags(KeyId=metadata["KeyId"])["Tags"]
    assert tags == [{"TagKey": "team", "TagValue": "crypto"}]


def test_describe_key_by_id_arn_and_alias(kms: Any, key: dict[str, Any]) -> None:
    alias = f"alias/describe-{uuid.uuid4().hex[:8]}"
    kms.create_alias(AliasName=alias, TargetKeyId=key["KeyId"])
    alias_arn = f"arn:aws:kms:{REGION}:{ACCOUNT_ID}:{alias}"
    for name in (key["KeyId"], key["Arn"], alias, alias_arn):
        assert kms.describe_key(KeyId=name)["KeyMetadata"]["Arn"] == key["Arn"]


def test_list_keys_pages_through_every_key(kms: Any) -> None:
    made = {kms.create_key()["KeyMetadata"]["KeyId"] for _ in range(3)}
    seen: list[str] = []
    marker: str | None = None
    pages = 0
    while True:
        page = kms.list_keys(Limit=2, **({"Marker": marker} if marker else {}))
        pages += 1
        assert len(page["Keys"]) <= 2
        for entry in page["Keys"]:
            assert entry["KeyArn"].endswith(entry["KeyId"])
            seen.append(entry["KeyId"])
        if not page["Truncated"]:
            assert "NextMarker" not in page
            break
        marker = page["NextMarker"]
    assert pages >= 2
    assert made <= set(seen)
    assert len(seen) == len(set(seen))
    paginated = [
        entry["KeyId"]
        for page in kms.get_paginator("list_keys").paginate(PaginationConfig={"PageSize": 2})
        for entry in page["Keys"]
    ]
    assert set(paginated) >= made


def test_update_key_description(kms: Any, key: dict[str, Any]) -> None:
    kms.update_key_description(KeyId=key["KeyId"], Description="new words")
    assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["Description"] == "new words"


def test_disable_and_enable_key(kms: Any, key: dict[str, Any]) -> None:
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x")["CiphertextBlob"]
    kms.disable_key(KeyId=key["KeyId"])
    metadata = kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]
    assert (metadata["KeyState"], metadata["Enabled"]) == ("Disabled", False)
    with pytest.raises(ClientError) as excinfo:
        kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x")
    assert error_code(excinfo) == "DisabledException"
    with pytest.raises(ClientError) as excinfo:
        kms.decrypt(CiphertextBlob=blob)
    assert error_code(excinfo) == "DisabledException"
    kms.enable_key(KeyId=key["KeyId"])
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"x"


def test_alias_create_list_update_delete(kms: Any) -> None:
    first = kms.create_key()["KeyMetadata"]
    second = kms.create_key()["KeyMetadata"]
    alias = f"alias/crud-{uuid.uuid4().hex[:8]}"
    kms.create_alias(AliasName=alias, TargetKeyId=first["KeyId"])
    with pytest.raises(ClientError) as excinfo:
        kms.create_alias(AliasName=alias, TargetKeyId=second["KeyId"])
    assert error_code(excinfo) == "AlreadyExistsException"

    listed = kms.list_aliases(KeyId=first["KeyId"])["Aliases"]
    assert [a["AliasName"] for a in listed] == [alias]
    assert listed[0]["TargetKeyId"] == first["KeyId"]
    assert listed[0]["AliasArn"] == f"arn:aws:kms:{REGION}:{ACCOUNT_ID}:{alias}"
    all_aliases = [
        a["AliasName"]
        for page in kms.get_paginator("list_aliases").paginate(PaginationConfig={"PageSize": 1})
        for a in page["Aliases"]
    ]
    assert alias in all_aliases

    kms.update_alias(AliasName=alias, TargetKeyId=second["KeyId"])
    assert kms.describe_key(KeyId=alias)["KeyMetadata"]["KeyId"] == second["KeyId"]
    blob = kms.encrypt(KeyId=alias, Plaintext=b"via alias")
    assert blob["KeyId"] == second["Arn"]

    kms.delete_alias(AliasName=alias)
    with pytest.raises(ClientError) as excinfo:
        kms.describe_key(KeyId=alias)
    assert error_code(excinfo) == "NotFoundException"


def test_alias_with_reserved_prefix_is_refused(kms: Any, key: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as excinfo:
        kms.create_alias(AliasName="alias/aws/mine", TargetKeyId=key["KeyId"])
    assert error_code(excinfo) in {"NotFoundException", "InvalidAliasNameException"}
    with pytest.raises(ClientError) as excinfo:
        kms.create_alias(AliasName="not-an-alias", TargetKeyId=key["KeyId"])
    assert error_code(excinfo) in {"ValidationException", "InvalidAliasNameException"}


def test_tag_untag_and_list_tags(kms: Any, key: dict[str, Any]) -> None:
    kms.tag_resource(
        KeyId=key["KeyId"],
        Tags=[{"TagKey": "a", "TagValue": "1"}, {"TagKey": "b", "TagValue": "2"}],
    )
    kms.tag_resource(KeyId=key["Arn"], Tags=[{"TagKey": "a", "TagValue": "3"}])
    tags = kms.list_resource_tags(KeyId=key["KeyId"])["Tags"]
    assert sorted((t["TagKey"], t["TagValue"]) for t in tags) == [("a", "3"), ("b", "2")]
    kms.untag_resource(KeyId=key["KeyId"], TagKeys=["a"])
    assert kms.list_resource_tags(KeyId=key["KeyId"])["Tags"] == [{"TagKey": "b", "TagValue": "2"}]
    with pytest.raises(ClientError) as excinfo:
        kms.tag_resource(KeyId=key["KeyId"], Tags=[{"TagKey": "aws:x", "TagValue": "1"}])
    assert error_code(excinfo) == "TagException"


def test_encrypt_decrypt_with_context(kms: Any, key: dict[str, Any]) -> None:
    context = {"purpose": "test", "tenant": "42"}
    out = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"secret bytes", EncryptionContext=context)
    assert out["KeyId"] == key["Arn"]
    assert out["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    back = kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext=context)
    assert back["Plaintext"] == b"secret bytes"
    assert back["KeyId"] == key["Arn"]
    back = kms.decrypt(
        CiphertextBlob=out["CiphertextBlob"], EncryptionContext=context, KeyId=key["Arn"]
    )
    assert back["Plaintext"] == b"secret bytes"


@pytest.mark.parametrize(
    "other_context",
    [None, {"purpose": "other"}, {"purpose": "test", "extra": "1"}],
    ids=["missing", "changed", "added"],
)
def test_decrypt_with_other_context_is_invalid_ciphertext(
    kms: Any, key: dict[str, Any], other_context: dict[str, str] | None
) -> None:
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"p", EncryptionContext={"purpose": "test"})
    kwargs: dict[str, Any] = {"CiphertextBlob": blob["CiphertextBlob"]}
    if other_context is not None:
        kwargs["EncryptionContext"] = other_context
    with pytest.raises(ClientError) as excinfo:
        kms.decrypt(**kwargs)
    assert error_code(excinfo) == "InvalidCiphertextException"


def test_decrypt_tampered_ciphertext_is_invalid_ciphertext(kms: Any, key: dict[str, Any]) -> None:
    blob = bytearray(kms.encrypt(KeyId=key["KeyId"], Plaintext=b"p")["CiphertextBlob"])
    blob[-1] ^= 1
    with pytest.raises(ClientError) as excinfo:
        kms.decrypt(CiphertextBlob=bytes(blob))
    assert error_code(excinfo) == "InvalidCiphertextException"
    with pytest.raises(ClientError) as excinfo:
        kms.decrypt(CiphertextBlob=b"\x01" * 40)
    assert error_code(excinfo) == "InvalidCiphertextException"


def test_decrypt_with_the_wrong_key_id_is_incorrect_key(kms: Any, key: dict[str, Any]) -> None:
    other = kms.create_key()["KeyMetadata"]
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"p")["CiphertextBlob"]
    with pytest.raises(ClientError) as excinfo:
        kms.decrypt(CiphertextBlob=blob, KeyId=other["KeyId"])
    assert error_code(excinfo) == "IncorrectKeyException"


def test_re_encrypt_moves_ciphertext_to_another_key_and_context(
    kms: Any, key: dict[str, Any]
) -> None:
    destination = kms.create_key()["KeyMetadata"]
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"move me", EncryptionContext={"a": "1"})
    out = kms.re_encrypt(
        CiphertextBlob=blob["CiphertextBlob"],
        SourceEncryptionContext={"a": "1"},
        DestinationKeyId=destination["KeyId"],
        DestinationEncryptionContext={"b": "2"},
    )
    assert out["SourceKeyId"] == key["Arn"]
    assert out["KeyId"] == destination["Arn"]
    assert "Plaintext" not in out
    back = kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext={"b": "2"})
    assert back["Plaintext"] == b"move me"
    with pytest.raises(ClientError) as excinfo:
        kms.re_encrypt(
            CiphertextBlob=blob["CiphertextBlob"],
            SourceEncryptionContext={"a": "wrong"},
            DestinationKeyId=destination["KeyId"],
        )
    assert error_code(excinfo) == "InvalidCiphertextException"


def test_generate_data_key_round_trips_through_decrypt(kms: Any, key: dict[str, Any]) -> None:
    context = {"file": "report.pdf"}
    for kwargs, size in (
        ({"KeySpec": "AES_256"}, 32),
        ({"KeySpec": "AES_128"}, 16),
        ({"NumberOfBytes": 7}, 7),
    ):
        out = kms.generate_data_key(KeyId=key["KeyId"], EncryptionContext=context, **kwargs)
        assert len(out["Plaintext"]) == size
        assert out["KeyId"] == key["Arn"]
        back = kms.decrypt(CiphertextBlob=out["CiphertextBlob"], EncryptionContext=context)
        assert back["Plaintext"] == out["Plaintext"]


def test_generate_data_key_without_plaintext(kms: Any, key: dict[str, Any]) -> None:
    out = kms.generate_data_key_without_plaintext(KeyId=key["KeyId"], KeySpec="AES_256")
    assert "Plaintext" not in out
    assert out["KeyId"] == key["Arn"]
    assert len(kms.decrypt(CiphertextBlob=out["CiphertextBlob"])["Plaintext"]) == 32


def test_generate_data_key_needs_exactly_one_size(kms: Any, key: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as excinfo:
        kms.generate_data_key(KeyId=key["KeyId"])
    assert error_code(excinfo) == "ValidationException"
    with pytest.raises(ClientError) as excinfo:
        kms.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256", NumberOfBytes=32)
    assert error_code(excinfo) == "ValidationException"


def test_generate_random(kms: Any) -> None:
    first = kms.generate_random(NumberOfBytes=64)["Plaintext"]
    second = kms.generate_random(NumberOfBytes=64)["Plaintext"]
    assert len(first) == len(second) == 64
    assert first != second
    with pytest.raises(ClientError) as excinfo:
        kms.generate_random(NumberOfBytes=2000)
    assert error_code(excinfo) == "ValidationException"


def test_rotation_on_demand_keeps_old_ciphertexts_decryptable(
    kms: Any, key: dict[str, Any]
) -> None:
    old = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"before")["CiphertextBlob"]
    assert kms.get_key_rotation_status(KeyId=key["KeyId"])["KeyRotationEnabled"] is False
    assert kms.rotate_key_on_demand(KeyId=key["KeyId"])["KeyId"] == key["Arn"]
    new = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"after")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=old)["Plaintext"] == b"before"
    assert kms.decrypt(CiphertextBlob=new)["Plaintext"] == b"after"
    rotations = kms.list_key_rotations(KeyId=key["KeyId"])["Rotations"]
    assert [r["RotationType"] for r in rotations] == ["ON_DEMAND"]
    assert rotations[0]["KeyId"] == key["KeyId"] or rotations[0]["KeyId"] == key["Arn"]


def test_list_key_rotations_with_all_key_material_on_the_wire(kms: Any, key: dict[str, Any]) -> None:
    kms.rotate_key_on_demand(KeyId=key["KeyId"])
    listed = kms.list_key_rotations(KeyId=key["KeyId"], IncludeKeyMaterial="ALL_KEY_MATERIAL")["Rotations"]
    first, rotated = listed
    assert set(first) == {"KeyId", "KeyMaterialId", "KeyMaterialState"}  # no RotationDate/Type
    assert first["KeyMaterialState"] == "NON_CURRENT"
    assert (rotated["RotationType"], rotated["KeyMaterialState"]) == ("ON_DEMAND", "CURRENT")
    assert "RotationDate" in rotated and rotated["KeyMaterialId"] != first["KeyMaterialId"]


def test_rotation_status_of_a_key_pending_deletion_is_false(kms: Any, key: dict[str, Any]) -> None:
    kms.enable_key_rotation(KeyId=key["KeyId"], RotationPeriodInDays=90)
    kms.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=7)
    status = kms.get_key_rotation_status(KeyId=key["KeyId"])
    assert status["KeyRotationEnabled"] is False and "NextRotationDate" not in status
    kms.cancel_key_deletion(KeyId=key["KeyId"])
    assert kms.get_key_rotation_status(KeyId=key["KeyId"])["RotationPeriodInDays"] == 90


def test_automatic_rotation_enable_status_disable(
    kms: Any, kms_server: ServerProcess, key: dict[str, Any]
) -> None:
    kms.enable_key_rotation(KeyId=key["KeyId"], RotationPeriodInDays=90)
    status = kms.get_key_rotation_status(KeyId=key["KeyId"])
    assert status["KeyRotationEnabled"] is True
    assert status["RotationPeriodInDays"] == 90
    assert "NextRotationDate" in status
    kms.disable_key_rotation(KeyId=key["KeyId"])
    assert kms.get_key_rotation_status(KeyId=key["KeyId"])["KeyRotationEnabled"] is False
    # boto3 refuses a period under 90 itself, so send it raw.
    out = kms_call(
        kms_server, "EnableKeyRotation", {"KeyId": key["KeyId"], "RotationPeriodInDays": 30}
    )
    assert (out.status, out.error_code) == (400, "ValidationException")


def test_list_key_rotations_pages(kms: Any, key: dict[str, Any]) -> None:
    for _ in range(3):
        kms.rotate_key_on_demand(KeyId=key["KeyId"])
    first = kms.list_key_rotations(KeyId=key["KeyId"], Limit=2)
    assert len(first["Rotations"]) == 2
    assert first["Truncated"] is True
    rest = kms.list_key_rotations(KeyId=key["KeyId"], Limit=2, Marker=first["NextMarker"])
    assert len(rest["Rotations"]) == 1
    assert rest["Truncated"] is False


def test_schedule_and_cancel_key_deletion(kms: Any, key: dict[str, Any]) -> None:
    blob = kms.encrypt(KeyId=key["KeyId"], Plaintext=b"p")["CiphertextBlob"]
    out = kms.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=7)
    assert out["KeyId"] == key["Arn"]
    assert out["KeyState"] == "PendingDeletion"
    assert out["PendingWindowInDays"] == 7
    metadata = kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]
    assert metadata["KeyState"] == "PendingDeletion"
    assert "DeletionDate" in metadata
    for call in (
        lambda: kms.encrypt(KeyId=key["KeyId"], Plaintext=b"p"),
        lambda: kms.decrypt(CiphertextBlob=blob),
        lambda: kms.enable_key(KeyId=key["KeyId"]),
    ):
        with pytest.raises(ClientError) as excinfo:
            call()
        assert error_code(excinfo) == "KMSInvalidStateException"
    assert kms.cancel_key_deletion(KeyId=key["KeyId"])["KeyId"] == key["Arn"]
    assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "Disabled"
    kms.enable_key(KeyId=key["KeyId"])
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"p"


def test_schedule_key_deletion_window_is_validated(kms: Any, key: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as excinfo:
        kms.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=3)
    assert error_code(excinfo) == "ValidationException"
    with pytest.raises(ClientError) as excinfo:
        kms.cancel_key_deletion(KeyId=key["KeyId"])
    assert error_code(excinfo) == "KMSInvalidStateException"


def test_unknown_key_is_not_found(kms: Any) -> None:
    missing = str(uuid.uuid4())
    for call in (
        lambda: kms.describe_key(KeyId=missing),
        lambda: kms.encrypt(KeyId=missing, Plaintext=b"p"),
        lambda: kms.describe_key(KeyId="alias/does-not-exist"),
        lambda: kms.disable_key(KeyId=missing),
    ):
        with pytest.raises(ClientError) as excinfo:
            call()
        assert error_code(excinfo) == "NotFoundException"


def test_symmetric_key_refuses_sign(kms: Any, key: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as excinfo:
        kms.sign(KeyId=key["KeyId"], Message=b"m", SigningAlgorithm="RSASSA_PSS_SHA_256")
    assert error_code(excinfo) == "InvalidKeyUsageException"


def test_plaintext_over_4096_bytes_is_validation_error(kms: Any, key: dict[str, Any]) -> None:
    with pytest.raises(ClientError) as excinfo:
        kms.encrypt(KeyId=key["KeyId"], Plaintext=b"x" * 4097)
    assert error_code(excinfo) == "ValidationException"
