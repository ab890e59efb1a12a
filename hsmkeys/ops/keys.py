"""CreateKey, DescribeKey, ListKeys, UpdateKeyDescription, Enable/DisableKey and deletion."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING

from hsmkeys import faultpoints, keyspecs
from hsmkeys.catalog.base import KeyRecord, VersionRecord
from hsmkeys.errors import (
    KMSInvalidStateException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkeys.models import (
    CancelKeyDeletionResult,
    CreateKeyResult,
    DescribeKeyResult,
    KeyListEntry,
    KeySpec,
    KeyState,
    KeyUsage,
    ListKeysResult,
    Origin,
    ScheduleKeyDeletionResult,
    Tag,
)
from hsmkeys.ops.common import (
    DELETION_WINDOW_DAYS,
    MAX_DESCRIPTION,
    page_limit,
    tag_map,
    uuid_marker,
)
from hsmkeys.ops.policies import check_lockout, check_policy
from hsmkeys.validation import check_enum, check_grant_tokens, check_int, check_str

if TYPE_CHECKING:
    from hsmkeys.call import Call
    from hsmkeys.keystore import KeyStore

# KMS's OriginType values hsmkeys does not implement: valid parameters, unsupported operations.

def create_key(
    ks: KeyStore,
    call: Call,
    *,
    policy: str | None = None,
    description: str = "",
    key_usage: str | KeyUsage | None = None,
    customer_master_key_spec: str | KeySpec | None = None,
    key_spec: str | KeySpec | None = None,
    origin: str | Origin | None = None,
    custom_key_store_id: str | None = None,
    bypass_policy_lockout_safety_check: bool = False,
    tags: Sequence[Tag | Mapping[str, str]] | None = None,
    multi_region: bool = False,
    xks_key_id: str | None = None,
) -> CreateKeyResult:
    check_str("description", description, min_len=0, max_len=MAX_DESCRIPTION)
    if key_spec is not None and customer_master_key_spec is not None and key_spec != customer_master_key_spec:
        raise ValidationException("You cannot specify KeySpec and CustomerMasterKeySpec in the same request.")
    spec = check_enum(KeySpec, "keySpec", key_spec or customer_master_key_spec or KeySpec.SYMMETRIC_DEFAULT)
    usage = check_enum(KeyUsage, "keyUsage", key_usage or KeyUsage.ENCRYPT_DECRYPT)
    if usage not in keyspecs.ALLOWED_USAGES[spec]:
        raise ValidationException(f"KeyUsage {usage} is not compatible with KeySpec {spec}")
    key_origin = check_enum(Origin, "origin", origin) if origin is not None else Origin.AWS_KMS
    if custom_key_store_id or xks_key_id:
        raise UnsupportedOperationException("Custom key stores are not supported")
    if multi_region:
        raise UnsupportedOperationException("Multi-Region keys are not supported")
    earlier = ks._recall(call)
    if earlier is not None:  # a retry of a request whose first attempt committed
        made = ks._catalog.get_key(uuid.UUID(earlier))
        if made is not None:
            call.used(ks._arn(made.key_uuid), 1)
            return CreateKeyResult(ks._metadata(made))
    key_uuid = uuid.uuid4()
    if policy is not None:
        policy_doc = check_policy(policy)
        if not bypass_policy_lockout_safety_check:
            check_lockout(ks, call, policy_doc, ks._arn(key_uuid))
    else:
        from hsmkeys.keystore import default_key_policy

        policy_doc = default_key_policy(ks.account_id)
    tags_to_set = tag_map(tags)
    now = ks._now()
    key = KeyRecord(
        key_uuid=key_uuid,
        spec=spec,
        usage=usage,
        origin=key_origin,
        # EXTERNAL: no material until ImportKeyMaterial (no HSM object either).
        state=KeyState.PENDING_IMPORT if key_origin is Origin.EXTERNAL else KeyState.ENABLED,
        description=description,
        created_at=now,
        current_version=1,
        policy=policy_doc,
    )
    first = VersionRecord(key.key_uuid, 1, now)
    if key_origin is not Origin.EXTERNAL:
        # HSM first (recorded as pending): a crash leaves an orphan the sweeper removes,
        # never a row without its object.
        ks._make_new_key_object(first.ref, spec, usage)
        faultpoints.reached("create_key.hsm_done")
    with ks._catalog.transaction():
        ks._catalog.insert_key(key, first)
        ks._catalog.remove_pending_object(first.ref.label)
        if tags_to_set:
            ks._catalog.put_tags(key.key_uuid, tags_to_set)
        ks._remember(call, str(key.key_uuid))
    faultpoints.reached("create_key.committed")
    call.used(ks._arn(key.key_uuid), 1)
    return CreateKeyResult(ks._metadata(key))


def describe_key(
    ks: KeyStore, call: Call, *, key_id: str, grant_tokens: Sequence[str] | None = None
) -> DescribeKeyResult:
    check_grant_tokens(grant_tokens)
    key = ks._key(call, key_id)
    call.used(ks._arn(key.key_uuid), key.current_version)
    return DescribeKeyResult(ks._metadata(key))


def list_keys(ks: KeyStore, call: Call, *, limit: int | None = None, marker: str | None = None) -> ListKeysResult:
    size = page_limit(limit)
    after = uuid_marker(marker)
    rows = ks._catalog.list_keys(limit=size + 1, after=after, exclude_purging=True)
    page, truncated = rows[:size], len(rows) > size
    entries = tuple(KeyListEntry(str(r.key_uuid), ks._arn(r.key_uuid)) for r in page)
    return ListKeysResult(entries, truncated, str(page[-1].key_uuid) if truncated else None)


def update_key_description(ks: KeyStore, call: Call, *, key_id: str, description: str) -> None:
    check_str("description", description, min_len=0, max_len=MAX_DESCRIPTION)
    with ks._catalog.transaction():
        key = ks._key(call, key_id, alias_ok=False)
        ks._require_not_pending_deletion(key)
        ks._catalog.update_key(replace(key, description=description))
    call.used(ks._arn(key.key_uuid), key.current_version)


def enable_key(ks: KeyStore, call: Call, *, key_id: str) -> None:
    _set_enabled(ks, call, key_id, True)


def disable_key(ks: KeyStore, call: Call, *, key_id: str) -> None:
    _set_enabled(ks, call, key_id, False)


def _set_enabled(ks: KeyStore, call: Call, key_id: str, enabled: bool) -> None:
    with ks._catalog.transaction():
        key = ks._key(call, key_id, alias_ok=False)
        ks._require_not_pending_deletion(key)
        if key.state is KeyState.PENDING_IMPORT:
            raise KMSInvalidStateException(f"{ks._arn(key.key_uuid)} is pending import.")
        state = KeyState.ENABLED if enabled else KeyState.DISABLED
        if key.state is not state:
            ks._catalog.update_key(replace(key, state=state))
    call.used(ks._arn(key.key_uuid), key.current_version)


def schedule_key_deletion(
    ks: KeyStore, call: Call, *, key_id: str, pending_window_in_days: int | None = None
) -> ScheduleKeyDeletionResult:
    days = 30
    if pending_window_in_days is not None:
        days = check_int(
            "pendingWindowInDays", pending_window_in_days, low=DELETION_WINDOW_DAYS[0], high=DELETION_WINDOW_DAYS[1]
        )
    with ks._catalog.transaction():
        key = ks._key(call, key_id, alias_ok=False)
        if (
            key.state is KeyState.PENDING_DELETION
            and key.deletion_date is not None
            and ks._recall(call) == str(key.key_uuid)
        ):  # a retry of a request whose first attempt committed
            call.used(ks._arn(key.key_uuid), key.current_version)
            return ScheduleKeyDeletionResult(
                ks._arn(key.key_uuid), key.deletion_date, KeyState.PENDING_DELETION, key.pending_window_days or days
            )
        ks._require_not_pending_deletion(key)
        when = ks._now() + timedelta(days=days)
        ks._catalog.update_key(
            replace(key, state=KeyState.PENDING_DELETION, deletion_date=when, pending_window_days=days)
        )
        ks._remember(call, str(key.key_uuid))
    faultpoints.reached("schedule_key_deletion.committed")
    call.used(ks._arn(key.key_uuid), key.current_version)
    return ScheduleKeyDeletionResult(ks._arn(key.key_uuid), when, KeyState.PENDING_DELETION, days)


def cancel_key_deletion(ks: KeyStore, call: Call, *, key_id: str) -> CancelKeyDeletionResult:
    with ks._catalog.transaction():
        key = ks._key(call, key_id, alias_ok=False)
        if key.state is not KeyState.PENDING_DELETION:
            raise KMSInvalidStateException(f"{ks._arn(key.key_uuid)} is not pending deletion.")
        ks._catalog.update_key(replace(key, state=KeyState.DISABLED, deletion_date=None, pending_window_days=None))
    call.used(ks._arn(key.key_uuid), key.current_version)
    return CancelKeyDeletionResult(ks._arn(key.key_uuid))
