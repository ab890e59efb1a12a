"""Catalog rows <-> records, shared by the SQLite and PostgreSQL catalogs.

The two databases store the same columns in the same order; they differ only in how a
UUID, a timestamp and a JSON value travel (SQLite: text, integer microseconds, JSON
text; PostgreSQL: native uuid, timestamptz, jsonb). A :class:`RowCodec` is built once
per backend with those conversions and does every row and record translation.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

from hsmkeys.catalog.base import AliasRecord, AuditCheckpoint, GrantRecord, KeyRecord, VersionRecord
from hsmkeys.models import KeyManager, KeySpec, KeyState, KeyUsage, Origin, RotationType

KEY_COLUMNS = (
    "uuid, spec, usage, origin, state, description, created_at, current_version, "
    "rotation_period_days, next_rotation_at, deletion_date, pending_window_days, policy, "
    "valid_to, expiration_model, material_fingerprint, key_manager"
)
KEY_COLUMN_COUNT = 17
VERSION_COLUMNS = "uuid, version, created_at, rotation_type"
ALIAS_COLUMNS = "name, uuid, created_at, updated_at"
GRANT_COLUMNS = (
    "grant_id, uuid, token, name, grantee_principal, retiring_principal, operations, "
    "constraints, issuing_account, created_at"
)
CHECKPOINT_COLUMNS = "log_id, seq, chain_hash, mac, file_name, time"
EQUALS = "EncryptionContextEquals"
SUBSET = "EncryptionContextSubset"

# Dict lookups are several times cheaper than Enum(value) on the get_key hot path.
SPECS = {m.value: m for m in KeySpec}
USAGES = {m.value: m for m in KeyUsage}
ORIGINS = {m.value: m for m in Origin}
STATES = {m.value: m for m in KeyState}
ROTATION_TYPES = {m.value: m for m in RotationType}
KEY_MANAGERS = {m.value: m for m in KeyManager}


def read_only(value: Any) -> Mapping[str, str] | None:
    """A grant's context constraint as stored, checked and frozen."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError("grant constraint is not a string map")
    return MappingProxyType(value)  # the dict is private to this record


def grant_constraints(grant: GrantRecord) -> dict[str, dict[str, str]]:
    """The constraints column's value ({} when the grant has none)."""
    constraints: dict[str, dict[str, str]] = {}
    if grant.encryption_context_equals is not None:
        constraints[EQUALS] = dict(grant.encryption_context_equals)
    if grant.encryption_context_subset is not None:
        constraints[SUBSET] = dict(grant.encryption_context_subset)
    return constraints


@dataclass(frozen=True, slots=True)
class RowCodec:
    """One backend's conversions; ``*_in`` read a column, ``*_out`` write one."""

    uuid_in: Callable[[Any], uuid.UUID]
    uuid_out: Callable[[uuid.UUID], Any]
    time_in: Callable[[Any], datetime]
    time_out: Callable[[datetime], Any]
    json_in: Callable[[Any], Any]  # the constraints column (a JSON object)
    json_out: Callable[[Any], Any]
    list_in: Callable[[Any], Any]  # the operations column (a list of names)
    list_out: Callable[[Any], Any]

    def time_in_or_none(self, value: Any) -> datetime | None:
        return None if value is None else self.time_in(value)

    def time_out_or_none(self, value: datetime | None) -> Any:
        return None if value is None else self.time_out(value)

    def key(self, row: Any, key_uuid: uuid.UUID | None = None) -> KeyRecord:
        return KeyRecord(
            key_uuid=key_uuid if key_uuid is not None else self.uuid_in(row[0]),
            spec=SPECS[row[1]],
            usage=USAGES[row[2]],
            origin=ORIGINS[row[3]],
            state=STATES[row[4]],
            description=row[5],
            created_at=self.time_in(row[6]),
            current_version=row[7],
            rotation_period_days=row[8],
            next_rotation_at=self.time_in_or_none(row[9]),
            deletion_date=self.time_in_or_none(row[10]),
            pending_window_days=row[11],
            policy=row[12],
            valid_to=self.time_in_or_none(row[13]),
            expiration_model=row[14],
            material_fingerprint=row[15],
            key_manager=KEY_MANAGERS[row[16]],
        )

    def key_values(self, key: KeyRecord) -> tuple[object, ...]:
        """Every key column but uuid, in KEY_COLUMNS order."""
        return (
            key.spec.value,
            key.usage.value,
            key.origin.value,
            key.state.value,
            key.description,
            self.time_out(key.created_at),
            key.current_version,
            key.rotation_period_days,
            self.time_out_or_none(key.next_rotation_at),
            self.time_out_or_none(key.deletion_date),
            key.pending_window_days,
            key.policy,
            self.time_out_or_none(key.valid_to),
            key.expiration_model,
            key.material_fingerprint,
            key.key_manager.value,
        )

    def version(self, row: Any) -> VersionRecord:
        return VersionRecord(
            key_uuid=self.uuid_in(row[0]),
            version=row[1],
            created_at=self.time_in(row[2]),
            rotation_type=None if row[3] is None else ROTATION_TYPES[row[3]],
        )

    def alias(self, row: Any) -> AliasRecord:
        return AliasRecord(
            name=row[0], key_uuid=self.uuid_in(row[1]), created_at=self.time_in(row[2]), updated_at=self.time_in(row[3])
        )

    def grant_values(self, grant: GrantRecord) -> tuple[object, ...]:
        constraints = grant_constraints(grant)
        return (
            grant.grant_id,
            self.uuid_out(grant.key_uuid),
            grant.token,
            grant.name,
            grant.grantee_principal,
            grant.retiring_principal,
            self.list_out(list(grant.operations)),
            self.json_out(constraints) if constraints else None,
            grant.issuing_account,
            self.time_out(grant.created_at),
        )

    def grant(self, row: Any) -> GrantRecord:
        operations = self.list_in(row[6])
        if not isinstance(operations, list) or not all(isinstance(op, str) for op in operations):
            raise ValueError("grant operations are not a list of names")
        constraints = {} if row[7] is None else self.json_in(row[7])
        if not isinstance(constraints, dict):
            raise ValueError("grant constraints are not an object")
        return GrantRecord(
            grant_id=row[0],
            key_uuid=self.uuid_in(row[1]),
            token=row[2],
            name=row[3],
            grantee_principal=row[4],
            retiring_principal=row[5],
            operations=tuple(operations),
            encryption_context_equals=read_only(constraints.get(EQUALS)),
            encryption_context_subset=read_only(constraints.get(SUBSET)),
            issuing_account=row[8],
            created_at=self.time_in(row[9]),
        )

    def checkpoint(self, row: Any) -> AuditCheckpoint:
        return AuditCheckpoint(
            log_id=row[0],
            sequence=row[1],
            chain_hash=row[2],
            mac=row[3],
            file_name=row[4],
            time=self.time_in(row[5]),
        )
