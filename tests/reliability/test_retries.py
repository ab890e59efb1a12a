"""A 500 after the effect makes botocore retry: the retry must not do it again.

The server is told (fault points) to fail once right after the catalog commit of
CreateKey, CreateGrant and ScheduleKeyDeletion; botocore retries with the same
``amz-sdk-invocation-id`` and must get the first attempt's resource back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from botocore.config import Config

from hsmkeys.faultpoints import ENV_VAR
from hsmkeys.testing.server import EphemeralKms, start_ephemeral_kms

_FAULTS = "create_key.committed=raise:1,create_grant.committed=raise:1,schedule_key_deletion.committed=raise:1"


@pytest.fixture(scope="module")
def failing_kms() -> Iterator[EphemeralKms]:
    with start_ephemeral_kms(env={ENV_VAR: _FAULTS}) as server:
        yield server


def _retrying_client(kms: EphemeralKms):  # type: ignore[no-untyped-def]
    return kms.client(config=Config(retries={"max_attempts": 4, "mode": "standard"}))


def test_retried_create_key_creates_one_key(failing_kms: EphemeralKms) -> None:
    client = _retrying_client(failing_kms)
    made = client.create_key(Description="once")
    assert made["ResponseMetadata"]["RetryAttempts"] == 1  # the first attempt got the 500
    keys = client.list_keys()["Keys"]
    assert [k["KeyId"] for k in keys] == [made["KeyMetadata"]["KeyId"]]


def test_retried_create_grant_creates_one_grant(failing_kms: EphemeralKms) -> None:
    client = _retrying_client(failing_kms)
    key_id = client.create_key()["KeyMetadata"]["KeyId"]
    grantee = f"arn:aws:iam::{failing_kms.account_id}:user/alice"
    grant = client.create_grant(KeyId=key_id, GranteePrincipal=grantee, Operations=["Encrypt"])
    assert grant["ResponseMetadata"]["RetryAttempts"] == 1
    grants = client.list_grants(KeyId=key_id)["Grants"]
    assert [g["GrantId"] for g in grants] == [grant["GrantId"]]


def test_retried_schedule_key_deletion_answers_success(failing_kms: EphemeralKms) -> None:
    client = _retrying_client(failing_kms)
    key_id = client.create_key()["KeyMetadata"]["KeyId"]
    scheduled = client.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    assert scheduled["ResponseMetadata"]["RetryAttempts"] == 1
    assert scheduled["KeyState"] == "PendingDeletion"
    assert client.describe_key(KeyId=key_id)["KeyMetadata"]["DeletionDate"] == scheduled["DeletionDate"]


def test_a_new_request_is_not_mistaken_for_a_retry(failing_kms: EphemeralKms) -> None:
    client = failing_kms.client()
    first = client.create_key()["KeyMetadata"]["KeyId"]
    second = client.create_key()["KeyMetadata"]["KeyId"]
    assert first != second
