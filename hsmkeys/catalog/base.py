"""The catalog contract: the source of truth for key state, versions, aliases and tags.

Only ``hsmkeys/catalog/`` runs SQL. Records are frozen dataclasses; change one with
``dataclasses.replace`` and write it back with ``update_key``. Every method is its own
transaction unless called inside ``with catalog.transaction():``, which makes the
enclosed calls one atomic unit (BEGIN IMMEDIATE in SQLite).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from hsmkeys.models import KeySpec, KeyState, KeyUsage, KeyVersionRef, Origin, RotationType


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_uuid: uuid.UUID
    spec: KeySpec
    usage: KeyUsage
    origin: Origin
    state: KeyState
    description: str
    created_at: datetime
    current_version: int
    rotation_period_days: int | None = None  # None: automatic rotation disabled
    next_rotation_at: datetime | None = None
    deletion_date: datetime | None = None
    pending_window_days: int | None = None
    policy: str | None = None  # key policy JSON document


@dataclass(frozen=True, slots=True)
class VersionRecord:
    key_uuid: uuid.UUID
    version: int
    created_at: datetime
    rotation_type: RotationType | None = None  # None for the key's first version

    @property
    def ref(self) -> KeyVersionRef:
        return KeyVersionRef(self.key_uuid, self.version)


@dataclass(frozen=True, slots=True)
class AliasRecord:
    name: str  # "alias/..."
    key_uuid: uuid.UUID
    created_at: datetime
    updated_at: datetime


class Catalog(Protocol):
    def transaction(self) -> AbstractContextManager[None]:
        """Group the calls inside into one atomic write transaction (re-entrant)."""
        ...

    def close(self) -> None: ...

    # ------------------------------------------------------------- keys
    def insert_key(self, key: KeyRecord, first_version: VersionRecord) -> None: ...

    def get_key(self, key_uuid: uuid.UUID) -> KeyRecord | None: ...

    def update_key(self, key: KeyRecord) -> None:
        """Replace the stored row of ``key.key_uuid`` (every column but key_uuid)."""
        ...

    def delete_key(self, key_uuid: uuid.UUID) -> None:
        """Remove the key with its versions, aliases and tags. Missing: no error."""
        ...

    def list_keys(self, *, limit: int, after: uuid.UUID | None = None) -> list[KeyRecord]:
        """Keys ordered by UUID string, starting after ``after``, at most ``limit``."""
        ...

    def count_keys(self) -> int: ...

    def keys_due_rotation(self, now: datetime) -> list[KeyRecord]:
        """Enabled keys whose next_rotation_at is set and <= now."""
        ...

    def keys_due_purge(self, now: datetime) -> list[KeyRecord]:
        """PendingDeletion keys whose deletion_date <= now, and every Purging key."""
        ...

    # ------------------------------------------------------------- versions
    def add_version(self, version: VersionRecord) -> None:
        """Record a new version and make it the key's current_version, atomically."""
        ...

    def list_versions(self, key_uuid: uuid.UUID) -> list[VersionRecord]:
        """Versions in ascending order."""
        ...

    def all_version_refs(self) -> set[KeyVersionRef]: ...

    # ------------------------------------------------------------- aliases
    def insert_alias(self, alias: AliasRecord) -> None:
        """Raises AlreadyExistsException if the name is taken."""
        ...

    def get_alias(self, name: str) -> AliasRecord | None: ...

    def update_alias(self, alias: AliasRecord) -> None: ...

    def delete_alias(self, name: str) -> None: ...

    def list_aliases(
        self, *, limit: int, after: str | None = None, key_uuid: uuid.UUID | None = None
    ) -> list[AliasRecord]:
        """Aliases ordered by name, optionally only those of one key."""
        ...

    def count_aliases(self, key_uuid: uuid.UUID) -> int: ...

    # ------------------------------------------------------------- tags
    def put_tags(self, key_uuid: uuid.UUID, tags: Mapping[str, str]) -> None:
        """Add or overwrite tags."""
        ...

    def delete_tags(self, key_uuid: uuid.UUID, tag_keys: Iterable[str]) -> None: ...

    def get_tags(self, key_uuid: uuid.UUID) -> dict[str, str]: ...
