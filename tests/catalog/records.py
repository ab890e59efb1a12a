"""Record builders for the catalog contract suite."""

from __future__ import annotations

import dataclasses
import secrets
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from hsmkeys.catalog.base import (
    AliasRecord,
    AuditCheckpoint,
    Catalog,
    GrantRecord,
    KeyRecord,
    VersionRecord,
)
from hsmkeys.models import KeySpec, KeyState, KeyUsage, Origin

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
ALICE = "arn:aws:iam::111122223333:role/alice"
BOB = "arn:aws:iam::111122223333:role/bob"
RETIRER = "arn:aws:iam::111122223333:role/retirer"


def make_key(key_uuid: uuid.UUID | None = None, **changes: object) -> KeyRecord:
    record = KeyRecord(
        key_uuid=key_uuid or uuid.uuid4(),
        spec=KeySpec.SYMMETRIC_DEFAULT,
        usage=KeyUsage.ENCRYPT_DECRYPT,
        origin=Origin.AWS_KMS,
        state=KeyState.ENABLED,
        description="test key",
        created_at=T0,
        current_version=1,
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def add_key(catalog: Catalog, key_uuid: uuid.UUID | None = None, **changes: object) -> KeyRecord:
    key = make_key(key_uuid, **changes)
    catalog.insert_key(key, VersionRecord(key.key_uuid, 1, key.created_at))
    return key


def alias(key: KeyRecord, name: str = "alias/app") -> AliasRecord:
    return AliasRecord(name, key.key_uuid, T0, T0 + timedelta(seconds=1))


def grant(key: KeyRecord, **changes: object) -> GrantRecord:
    record = GrantRecord(
        grant_id=secrets.token_hex(32),
        key_uuid=key.key_uuid,
        token=secrets.token_urlsafe(48),
        grantee_principal=ALICE,
        operations=("Encrypt", "Decrypt"),
        issuing_account="111122223333",
        created_at=T0,
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def checkpoint(log_id: str = "/var/log/hsmkeys/audit.log", **changes: object) -> AuditCheckpoint:
    record = AuditCheckpoint(
        log_id=log_id, sequence=41, chain_hash="ab" * 32, mac="cd" * 32, file_name="audit.log", time=T0
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


#: A fixture's factory of catalogs on one database (a second call: another instance).
OpenCatalog = Callable[[], Catalog]
