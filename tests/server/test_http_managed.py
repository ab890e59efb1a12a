"""AWS managed keys and GetKeyLastUsage over the wire (boto3 against the ephemeral server)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError


def test_first_use_of_an_aws_alias_creates_a_managed_key(kms: Any) -> None:
    alias = f"alias/aws/svc-{uuid.uuid4().hex[:8]}"
    blob = kms.encrypt(KeyId=alias, Plaintext=b"x")
    meta = kms.describe_key(KeyId=alias)["KeyMetadata"]
    assert meta["KeyManager"] == "AWS" and blob["KeyId"] == meta["Arn"]
    assert kms.decrypt(CiphertextBlob=blob["CiphertextBlob"])["Plaintext"] == b"x"
    assert kms.get_key_rotation_status(KeyId=meta["KeyId"])["KeyRotationEnabled"] is True
    with pytest.raises(ClientError) as refused:
        kms.schedule_key_deletion(KeyId=meta["KeyId"])
    assert refused.value.response["Error"]["Code"] == "AccessDeniedException"
    with pytest.raises(ClientError) as refused:
        kms.create_alias(AliasName=f"alias/aws/mine-{uuid.uuid4().hex[:6]}", TargetKeyId=meta["KeyId"])
    assert refused.value.response["Error"]["Code"] == "InvalidAliasNameException"


def test_get_key_last_usage_names_the_last_cryptographic_request(kms: Any) -> None:
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    unused = kms.get_key_last_usage(KeyId=key)
    assert unused["KeyLastUsage"] == {}  # "an empty object" when not used since tracking began
    assert unused["TrackingStartDate"] >= unused["KeyCreationDate"]
    response = kms.encrypt(KeyId=key, Plaintext=b"x")
    request_id = response["ResponseMetadata"]["RequestId"]
    usage = kms.get_key_last_usage(KeyId=key)
    assert usage["KeyLastUsage"]["Operation"] == "Encrypt"
    assert usage["KeyLastUsage"]["KmsRequestId"] == request_id
