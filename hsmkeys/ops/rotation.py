"""Key rotation: Enable/DisableKeyRotation, GetKeyRotationStatus, RotateKeyOnDemand,
ListKeyRotations, and the rotation itself (also run by maintenance when due)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from hsmkeys import faultpoints, keyspecs
from hsmkeys.catalog.base import KeyRecord, VersionRecord
from hsmkeys.errors import (
    AlreadyExistsException,
    InvalidMarkerException,
    LimitExceededException,
    NotFoundException,
)
from hsmkeys.models import (
    GetKeyRotationStatusResult,
    IncludeKeyMaterial,
    KeyMaterialState,
    KeyState,
    ListKeyRotationsResult,
    RotateKeyOnDemandResult,
    RotationsListEntry,
    RotationType,
)
from hsmkeys.ops.common import (
    DEFAULT_ROTATION_PERIOD_DAYS,
    MAX_ON_DEMAND_ROTATIONS,
    ROTATION_PERIOD_DAYS,
    key_material_id,
    page_limit,
)
from hsmkeys.validation import check_enum, check_int

if TYPE_CHECKING:
    from hsmkeys.call import Call
    from hsmkeys.keystore import KeyStore


def enable_key_rotation(ks: KeyStore, call: Call, *, key_id: str, rotation_period_in_days: int | None = None) -> None:
    period = DEFAULT_ROTATION_PERIOD_DAYS
    if rotation_period_in_days is not None:
        period = check_int(
            "rotationPeriodInDays", rotation_period_in_days, low=ROTATION_PERIOD_DAYS[0], high=ROTATION_PERIOD_DAYS[1]
        )
    with ks._catalog.transaction():
        key = ks._key(call, key_id, alias_ok=False)
        ks._require_rotatable(key)  # before the state: imported material is refused in any state
        ks._require_enabled(key)
        ks._catalog.update_key(
            replace(key, rotation_period_days=period, next_rotation_at=ks._now() + timedelta(days=period))
        )
    call.used(ks._arn(key.key_uuid), key.current_version)


def disable_key_rotation(ks: KeyStore, call: Call, *, key_id: str) -> None:
    with ks._catalog.transaction():
        key = ks._key(call, key_id, alias_ok=False)
        ks._require_rotatable(key)
        ks._require_enabled(key)
        ks._catalog.update_key(replace(key, rotation_period_days=None, next_rotation_at=None))
    call.used(ks._arn(key.key_uuid), key.current_version)


def get_key_rotation_status(ks: KeyStore, call: Call, *, key_id: str) -> GetKeyRotationStatusResult:
    """While a key is pending deletion its rotation status is false and it is not
    rotated; CancelKeyDeletion brings the kept schedule back (as KMS documents)."""
    key = ks._key(call, key_id, alias_ok=False)
    ks._require_rotatable(key)
    call.used(ks._arn(key.key_uuid), key.current_version)
    if key.state is KeyState.PENDING_DELETION:
        return GetKeyRotationStatusResult(key_rotation_enabled=False, key_id=ks._arn(key.key_uuid))
    return GetKeyRotationStatusResult(
        key_rotation_enabled=key.rotation_period_days is not None,
        key_id=ks._arn(key.key_uuid),
        rotation_period_in_days=key.rotation_period_days,
        next_rotation_date=key.next_rotation_at,
    )


def rotate_key_on_demand(ks: KeyStore, call: Call, *, key_id: str) -> RotateKeyOnDemandResult:
    key = ks._key(call, key_id, alias_ok=False)
    ks._require_rotatable(key)
    ks._require_enabled(key)
    rotate(ks, call, key, RotationType.ON_DEMAND)
    return RotateKeyOnDemandResult(ks._arn(key.key_uuid))


def rotate(
    ks: KeyStore,
    call: Call | None,
    key: KeyRecord,
    rotation_type: RotationType,
    *,
    retiring: int | None = None,
) -> KeyRecord | None:
    """Add version n+1 and make it current; the older versions stay for decryption.

    The key's state is checked again under the write lock. An automatic rotation that
    is no longer due then (another maintainer did it, or the key changed) returns None
    and changes nothing. ``retiring``: rotate because that version spent its AES-GCM
    budget (due or not), unless it is no longer current (None: someone did already).

    The HSM object is made under the write lock, so an object already carrying the
    new version's label is a leftover of a rotation that crashed before its commit
    (never used: it was never current); it is replaced.
    """
    with ks._catalog.transaction():
        fresh = ks._catalog.get_key(key.key_uuid)
        if fresh is None or fresh.state is KeyState.PURGING:
            raise NotFoundException(f"Key '{ks._arn(key.key_uuid)}' does not exist")
        if retiring is not None:
            if fresh.current_version != retiring:
                return None
            ks._require_enabled(fresh)
        elif rotation_type is RotationType.AUTOMATIC and not rotation_due(fresh, ks._now()):
            return None
        if rotation_type is RotationType.ON_DEMAND:
            ks._require_enabled(fresh)  # it may have changed since the caller looked
            done = sum(v.rotation_type is RotationType.ON_DEMAND for v in ks._catalog.list_versions(key.key_uuid))
            if done >= MAX_ON_DEMAND_ROTATIONS:
                raise LimitExceededException(f"A key may be rotated on demand at most {MAX_ON_DEMAND_ROTATIONS} times.")
        now = ks._now()
        version = VersionRecord(key.key_uuid, fresh.current_version + 1, now, rotation_type)
        try:
            ks._hsm.create_key(version.ref, fresh.spec, fresh.usage)
        except AlreadyExistsException:
            ks._hsm.destroy_key(version.ref)
            ks._hsm.create_key(version.ref, fresh.spec, fresh.usage)
        faultpoints.reached("rotate.hsm_done")
        ks._catalog.add_version(version)
        updated = replace(fresh, current_version=version.version)
        if rotation_type is RotationType.AUTOMATIC and fresh.rotation_period_days is not None and retiring is None:
            updated = replace(updated, next_rotation_at=now + timedelta(days=fresh.rotation_period_days))
            ks._catalog.update_key(updated)
    faultpoints.reached("rotate.committed")
    if call is not None:
        call.used(ks._arn(updated.key_uuid), version.version)
    return updated


def rotation_due(key: KeyRecord, now: datetime) -> bool:
    return (
        key.state is KeyState.ENABLED
        and keyspecs.is_rotatable(key.spec)
        and key.next_rotation_at is not None
        and key.next_rotation_at <= now
    )


def list_key_rotations(
    ks: KeyStore,
    call: Call,
    *,
    key_id: str,
    include_key_material: str | None = None,
    limit: int | None = None,
    marker: str | None = None,
) -> ListKeyRotationsResult:
    """The key's materials made by rotations; with ALL_KEY_MATERIAL also the first one
    (no RotationDate or RotationType), each with its KeyMaterialState."""
    size = page_limit(limit)
    every = (
        include_key_material is not None
        and check_enum(IncludeKeyMaterial, "includeKeyMaterial", include_key_material)
        is IncludeKeyMaterial.ALL_KEY_MATERIAL
    )
    after = 0
    if marker is not None:
        if not marker.isdigit():
            raise InvalidMarkerException("The marker is not valid.")
        after = int(marker)
    key = ks._key(call, key_id, alias_ok=False)
    ks._require_rotatable(key)
    arn = ks._arn(key.key_uuid)
    listed = [
        v
        for v in ks._catalog.list_versions(key.key_uuid)
        if (every or v.rotation_type is not None) and v.version > after
    ]
    page, truncated = listed[:size], len(listed) > size
    entries = tuple(
        RotationsListEntry(
            arn,
            v.created_at if v.rotation_type is not None else None,
            v.rotation_type,
            key_material_id(v.ref),
            KeyMaterialState.CURRENT if v.version == key.current_version else KeyMaterialState.NON_CURRENT,
        )
        for v in page
    )
    call.used(arn, None)
    return ListKeyRotationsResult(entries, truncated, str(page[-1].version) if truncated else None)
