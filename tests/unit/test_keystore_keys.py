"""Key creation, description, listing, enable/disable, aliases and tags."""

from __future__ import annotations

import json

import pytest

from hsmkeys.errors import (
    AlreadyExistsException,
    InvalidAliasNameException,
    InvalidMarkerException,
    KMSInvalidStateException,
    MalformedPolicyDocumentException,
    NotFoundException,
    TagException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkeys.keystore import KeyStore
from hsmkeys.models import KeyState, Tag


def test_create_key_returns_kms_metadata(store: KeyStore) -> None:
    md = store.create_key(description="orders").key_metadata
    assert md.arn == f"arn:aws:kms:us-east-1:111122223333:key/{md.key_id}"
    assert md.key_state is KeyState.ENABLED and md.enabled
    assert md.key_spec == "SYMMETRIC_DEFAULT" and md.key_usage == "ENCRYPT_DECRYPT"
    assert md.encryption_algorithms == ("SYMMETRIC_DEFAULT",)
    assert md.origin == "AWS_KMS" and md.key_manager == "CUSTOMER"
    assert md.description == "orders"
    assert md.current_version == 1


def test_describe_key_by_every_identifier(store: KeyStore, key_id: str) -> None:
    store.create_alias(alias_name="alias/d", target_key_id=key_id)
    arn = f"arn:aws:kms:us-east-1:111122223333:key/{key_id}"
    for ident in (key_id, arn, "alias/d", "arn:aws:kms:us-east-1:111122223333:alias/d"):
        assert store.describe_key(key_id=ident).key_metadata.key_id == key_id


def test_description_over_8192_chars_is_validation_error(store: KeyStore) -> None:
    with pytest.raises(ValidationException):
        store.create_key(description="x" * 8193)
    store.create_key(description="x" * 8192)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"key_spec": "AES_999"}, ValidationException),
        ({"key_usage": "SIGN_VERIFY"}, ValidationException),
        ({"key_spec": "HMAC_256", "key_usage": "ENCRYPT_DECRYPT"}, ValidationException),
        ({"key_spec": "RSA_2048", "customer_master_key_spec": "RSA_3072"}, ValidationException),
        ({"origin": "AWS_CLOUDHSM"}, UnsupportedOperationException),
        ({"multi_region": True}, UnsupportedOperationException),
        ({"custom_key_store_id": "cks-1"}, UnsupportedOperationException),
        ({"policy": "{not json"}, MalformedPolicyDocumentException),
        ({"tags": [{"TagKey": "aws:x", "TagValue": "1"}]}, TagException),
        ({"tags": [{"TagKey": "", "TagValue": "1"}]}, ValidationException),
        ({"tags": [{"TagKey": "k", "TagValue": "v" * 257}]}, ValidationException),
    ],
)
def test_create_key_rejections(store: KeyStore, kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        store.create_key(**kwargs)  # type: ignore[arg-type]


def test_create_key_stores_default_policy_and_tags(store: KeyStore) -> None:
    md = store.create_key(tags=[Tag("team", "payments"), {"TagKey": "env", "TagValue": "prod"}]).key_metadata
    tags = store.list_resource_tags(key_id=md.key_id).tags
    assert {(t.tag_key, t.tag_value) for t in tags} == {("team", "payments"), ("env", "prod")}


def test_list_keys_pages_with_marker(store: KeyStore) -> None:
    ids = {store.create_key().key_metadata.key_id for _ in range(5)}
    seen: list[str] = []
    marker = None
    while True:
        page = store.list_keys(limit=2, marker=marker)
        seen += [k.key_id for k in page.keys]
        assert all(k.key_arn.endswith(k.key_id) for k in page.keys)
        if not page.truncated:
            assert page.next_marker is None
            break
        marker = page.next_marker
    assert set(seen) == ids and len(seen) == 5


@pytest.mark.parametrize("limit", [0, 1001])
def test_list_keys_limit_out_of_range_is_validation_error(store: KeyStore, limit: int) -> None:
    with pytest.raises(ValidationException):
        store.list_keys(limit=limit)


def test_list_keys_bad_marker_is_invalid_marker(store: KeyStore) -> None:
    with pytest.raises(InvalidMarkerException):
        store.list_keys(marker="garbage")


def test_update_key_description(store: KeyStore, key_id: str) -> None:
    store.update_key_description(key_id=key_id, description="new")
    assert store.describe_key(key_id=key_id).key_metadata.description == "new"


def test_disable_enable_changes_state(store: KeyStore, key_id: str) -> None:
    store.disable_key(key_id=key_id)
    md = store.describe_key(key_id=key_id).key_metadata
    assert md.key_state is KeyState.DISABLED and not md.enabled
    store.enable_key(key_id=key_id)
    assert store.describe_key(key_id=key_id).key_metadata.key_state is KeyState.ENABLED


def test_enable_pending_deletion_key_is_invalid_state(store: KeyStore, key_id: str) -> None:
    store.schedule_key_deletion(key_id=key_id, pending_window_in_days=7)
    with pytest.raises(KMSInvalidStateException):
        store.enable_key(key_id=key_id)
    with pytest.raises(KMSInvalidStateException):
        store.disable_key(key_id=key_id)


# ------------------------------------------------------------------ aliases


def test_alias_lifecycle(store: KeyStore, key_id: str) -> None:
    other = store.create_key().key_metadata.key_id
    store.create_alias(alias_name="alias/app/db", target_key_id=key_id)
    # ListAliases also lists the predefined AWS managed key aliases (no target yet).
    entries = [a for a in store.list_aliases().aliases if a.target_key_id is not None]
    assert [(a.alias_name, a.target_key_id) for a in entries] == [("alias/app/db", key_id)]
    assert entries[0].alias_arn == "arn:aws:kms:us-east-1:111122223333:alias/app/db"
    store.update_alias(alias_name="alias/app/db", target_key_id=other)
    assert store.describe_key(key_id="alias/app/db").key_metadata.key_id == other
    assert store.list_aliases(key_id=key_id).aliases == ()
    store.delete_alias(alias_name="alias/app/db")
    with pytest.raises(NotFoundException):
        store.describe_key(key_id="alias/app/db")


def test_alias_name_taken_is_already_exists(store: KeyStore, key_id: str) -> None:
    store.create_alias(alias_name="alias/x", target_key_id=key_id)
    with pytest.raises(AlreadyExistsException):
        store.create_alias(alias_name="alias/x", target_key_id=key_id)


@pytest.mark.parametrize("name", ["x", "alias/", "alias/sp ace", "alias/é", "alias/" + "a" * 251])
def test_bad_alias_names_are_validation_errors(store: KeyStore, key_id: str, name: str) -> None:
    with pytest.raises(ValidationException):
        store.create_alias(alias_name=name, target_key_id=key_id)


def test_alias_aws_prefix_is_reserved(store: KeyStore, key_id: str) -> None:
    with pytest.raises(InvalidAliasNameException):
        store.create_alias(alias_name="alias/aws/s3", target_key_id=key_id)


def test_alias_cannot_target_an_alias_or_missing_key(store: KeyStore, key_id: str) -> None:
    store.create_alias(alias_name="alias/a", target_key_id=key_id)
    with pytest.raises(NotFoundException):
        store.create_alias(alias_name="alias/b", target_key_id="alias/a")
    with pytest.raises(NotFoundException):
        store.create_alias(alias_name="alias/c", target_key_id="11111111-2222-3333-4444-555555555555")


def test_update_and_delete_missing_alias_are_not_found(store: KeyStore, key_id: str) -> None:
    with pytest.raises(NotFoundException):
        store.update_alias(alias_name="alias/none", target_key_id=key_id)
    with pytest.raises(NotFoundException):
        store.delete_alias(alias_name="alias/none")


def test_update_alias_to_key_of_other_usage_is_validation_error(store: KeyStore, key_id: str) -> None:
    hmac_key = store.create_key(key_spec="HMAC_256", key_usage="GENERATE_VERIFY_MAC").key_metadata.key_id
    store.create_alias(alias_name="alias/sym", target_key_id=key_id)
    with pytest.raises(ValidationException):
        store.update_alias(alias_name="alias/sym", target_key_id=hmac_key)


def test_list_aliases_pages(store: KeyStore, key_id: str) -> None:
    for i in range(5):
        store.create_alias(alias_name=f"alias/a{i}", target_key_id=key_id)
    first = store.list_aliases(limit=3, key_id=key_id)  # not the predefined alias/aws/* names
    assert first.truncated and len(first.aliases) == 3
    rest = store.list_aliases(limit=3, marker=first.next_marker, key_id=key_id)
    assert not rest.truncated
    assert [a.alias_name for a in first.aliases + rest.aliases] == [f"alias/a{i}" for i in range(5)]


def test_list_aliases_pages_50_by_default_and_takes_at_most_100(store: KeyStore, key_id: str) -> None:
    other = store.create_key().key_metadata.key_id  # a key holds at most 50 aliases
    names = [f"alias/n{i:02}" for i in range(60)]
    for i, name in enumerate(names):
        store.create_alias(alias_name=name, target_key_id=key_id if i < 30 else other)
    first = store.list_aliases()
    assert first.truncated and len(first.aliases) == 50
    mine = [a for a in store.list_aliases(limit=100).aliases if a.alias_name.startswith("alias/n")]
    assert [a.alias_name for a in mine] == names  # all 60 fit in one page of 100
    for bad in (0, 101, 1000):
        with pytest.raises(ValidationException):
            store.list_aliases(limit=bad)


# ------------------------------------------------------------------ tags


def test_tag_untag_and_list(store: KeyStore, key_id: str) -> None:
    store.tag_resource(key_id=key_id, tags=[{"TagKey": "a", "TagValue": "1"}, {"TagKey": "b", "TagValue": "2"}])
    store.tag_resource(key_id=key_id, tags=[{"TagKey": "a", "TagValue": "3"}])
    store.untag_resource(key_id=key_id, tag_keys=["b"])
    assert store.list_resource_tags(key_id=key_id).tags == (Tag("a", "3"),)


def test_more_than_50_tags_is_tag_exception(store: KeyStore, key_id: str) -> None:
    store.tag_resource(key_id=key_id, tags=[{"TagKey": f"k{i}", "TagValue": ""} for i in range(50)])
    with pytest.raises(TagException):
        store.tag_resource(key_id=key_id, tags=[{"TagKey": "one-more", "TagValue": ""}])


def test_tag_resource_by_alias_is_not_found(store: KeyStore, key_id: str) -> None:
    store.create_alias(alias_name="alias/t", target_key_id=key_id)
    with pytest.raises(NotFoundException):
        store.tag_resource(key_id="alias/t", tags=[{"TagKey": "a", "TagValue": "1"}])


def test_list_resource_tags_pages(store: KeyStore, key_id: str) -> None:
    store.tag_resource(key_id=key_id, tags=[{"TagKey": f"k{i}", "TagValue": str(i)} for i in range(5)])
    first = store.list_resource_tags(key_id=key_id, limit=2)
    second = store.list_resource_tags(key_id=key_id, limit=10, marker=first.next_marker)
    assert first.truncated and not second.truncated
    assert [t.tag_key for t in first.tags + second.tags] == [f"k{i}" for i in range(5)]


def test_default_policy_grants_the_account_root(store: KeyStore) -> None:
    from hsmkeys.keystore import default_key_policy

    doc = json.loads(default_key_policy("111122223333"))
    assert doc["Statement"][0]["Principal"] == {"AWS": "arn:aws:iam::111122223333:root"}


def test_preload_indexes_every_key_version(store: KeyStore) -> None:
    first = store.create_key().key_metadata.key_id
    store.create_key()
    store.rotate_key_on_demand(key_id=first)
    assert store.preload() == 3
