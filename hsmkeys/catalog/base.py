"""The catalog contract: the source of truth for key state, versions, aliases, tags,
grants and audit checkpoints.

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

from hsmkeys.models import (
    KeyManager,
    KeySpec,
    KeyState,
    KeyUsage,
    KeyVersionRef,
    Origin,
    RotationType,
)


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
    # Imported (Origin EXTERNAL) key material: when it expires (None: never, or not
    # imported), "KEY_MATERIAL_EXPIRES"/"KEY_MATERIAL_DOES_NOT_EXPIRE", and a check
    # value computed in the HSM that tells whether re-imported material is the same.
    valid_to: datetime | None = None
    expiration_model: str | None = None
    material_fingerprint: str | None = None
    key_manager: KeyManager = KeyManager.CUSTOMER  # AWS: an AWS managed key (alias/aws/<service>)


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


@dataclass(frozen=True, slots=True)
class GrantRecord:
    """A grant on one key. ``token`` is the opaque grant token returned by CreateGrant."""

    grant_id: str  # 64 lowercase hex characters
    key_uuid: uuid.UUID
    token: str
    grantee_principal: str
    operations: tuple[str, ...]  # KMS operation names, e.g. ("Encrypt", "Decrypt")
    issuing_account: str
    created_at: datetime
    name: str | None = None
    retiring_principal: str | None = None
    encryption_context_equals: Mapping[str, str] | None = None
    encryption_context_subset: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class AuditCheckpoint:
    """The newest signed checkpoint of one audit log chain (``log_id``: the log's path)."""

    log_id: str
    sequence: int  # sequence number of the last line the checkpoint covers
    chain_hash: str  # hex SHA-256 chain value after that line
    mac: str  # hex HMAC of the checkpoint, computed in the HSM
    file_name: str  # base name of the file holding that line
    time: datetime


@dataclass(frozen=True, slots=True)
class KeyLastUse:
    """The last successful cryptographic operation on a key (GetKeyLastUsage)."""

    operation: str
    time: datetime
    request_id: str


@dataclass(frozen=True, slots=True)
class UsageCount:
    """Successful requests of one operation on one key by one account in one UTC hour."""

    key_uuid: uuid.UUID | None  # None: a keyless operation (GenerateRandom)
    operation: str
    account: str
    hour: datetime  # the start of the hour
    count: int


@dataclass(frozen=True, slots=True)
class KeyLifetime:
    """When a key existed (``deleted_at`` None: it still does), for key-month billing.

    ``tags`` and ``aliases`` are the key's current ones, or those it had when purged.
    """

    key_uuid: uuid.UUID
    key_manager: KeyManager
    created_at: datetime
    deleted_at: datetime | None
    tags: Mapping[str, str]
    aliases: tuple[str, ...]


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
        """Remove the key with its versions, aliases, tags and grants. Missing: no error."""
        ...

    def list_keys(
        self, *, limit: int, after: uuid.UUID | None = None, exclude_purging: bool = False
    ) -> list[KeyRecord]:
        """Keys ordered by UUID string, starting after ``after``, at most ``limit``.

        ``exclude_purging`` filters Purging keys in the query, so pages stay full.
        """
        ...

    def count_keys(self) -> int: ...

    def keys_due_rotation(self, now: datetime) -> list[KeyRecord]:
        """Enabled keys whose next_rotation_at is set and <= now."""
        ...

    def keys_material_expired(self, now: datetime) -> list[KeyRecord]:
        """Keys with imported material whose valid_to <= now (not PendingImport already)."""
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

    # ------------------------------------------------------------- grants
    def insert_grant(self, grant: GrantRecord) -> None:
        """Raises NotFoundException when the key does not exist, AlreadyExistsException
        when the grant id or token is taken. A key's grants are deleted with the key."""
        ...

    def get_grant(self, key_uuid: uuid.UUID, grant_id: str) -> GrantRecord | None:
        """The grant with that id if it is on that key, else None."""
        ...

    def get_grant_by_token(self, token: str) -> GrantRecord | None: ...

    def find_grant_by_name(self, key_uuid: uuid.UUID, name: str) -> list[GrantRecord]:
        """Every grant of the key with that name (CreateGrant's idempotency check)."""
        ...

    def list_grants(
        self,
        key_uuid: uuid.UUID,
        *,
        limit: int,
        after: str | None = None,
        grant_id: str | None = None,
        grantee_principal: str | None = None,
    ) -> list[GrantRecord]:
        """Grants of one key ordered by grant_id, after ``after``, at most ``limit``;
        ``grant_id`` / ``grantee_principal`` keep only the matching ones."""
        ...

    def grants_for_key(self, key_uuid: uuid.UUID) -> tuple[GrantRecord, ...]:
        """Every grant of the key ordered by grant_id, empty for an unknown key (read-cached:
        on the authorization path of each call). Records and their maps are read-only."""
        ...

    def list_retirable_grants(
        self, retiring_principal: str, *, limit: int, after: str | None = None
    ) -> list[GrantRecord]:
        """Grants (of any key) naming ``retiring_principal``, ordered by grant_id, after
        ``after``, at most ``limit``."""
        ...

    def delete_grant(self, grant_id: str) -> bool:
        """Remove one grant; False when it did not exist."""
        ...

    # ------------------------------------------------------------- audit checkpoints
    def get_audit_checkpoint(self, log_id: str) -> AuditCheckpoint | None: ...

    def list_audit_checkpoint_ids(self) -> list[str]:
        """Every chain with a stored checkpoint (its log id), ordered."""
        ...

    def put_audit_checkpoint(self, checkpoint: AuditCheckpoint) -> None:
        """Store the newest checkpoint of a chain (replaces the previous one)."""
        ...

    # ------------------------------------------------------------- key usage
    # insert_key records the key's lifetime and delete_key closes it (with the key's
    # tags and aliases at that moment), so purged keys are still billed for their time.

    def add_usage(self, counts: Iterable[UsageCount], last_uses: Mapping[uuid.UUID, KeyLastUse]) -> None:
        """Add the counts to the stored ones and keep the newer last use of each key (of
        keys that still exist), in one transaction. Must not invalidate read caches."""
        ...

    def get_key_last_use(self, key_uuid: uuid.UUID) -> KeyLastUse | None: ...

    def usage_tracking_start(self) -> datetime:
        """When this catalog began recording key usage (the migration that added it)."""
        ...

    def list_usage(self, since: datetime, until: datetime) -> list[UsageCount]:
        """Stored counts of the hours that start in [since, until)."""
        ...

    def list_key_lifetimes(self, since: datetime, until: datetime) -> list[KeyLifetime]:
        """Keys that existed at some time in [since, until), ordered by UUID."""
        ...

    # ------------------------------------------------------------- reliability
    def reserve_encryptions(self, ref: KeyVersionRef, count: int, limit: int) -> int:
        """Atomically reserve up to ``count`` AES-GCM encryptions of a version, never past
        ``limit`` in total; returns how many were granted (0: the version is spent).
        Reservations are never returned. NotFoundException for an unknown version."""
        ...

    def record_sightings(self, names: Iterable[str], now: datetime) -> dict[str, datetime]:
        """doctor's orphan bookkeeping: the first-seen time of each name (``now`` for a new
        one), forgetting stored names not given. One transaction."""
        ...

    def remember_request(
        self, principal: str, invocation_id: str, operation: str, resource: str, now: datetime
    ) -> None:
        """Record the resource a non-idempotent request made, in the caller's transaction
        (rows older than a day may be dropped). AlreadyExistsException if recorded."""
        ...

    def recall_request(self, principal: str, invocation_id: str, operation: str) -> str | None:
        """The resource an earlier, committed attempt of the same request made."""
        ...

    # ------------------------------------------------------------- maintenance lease
    def take_maintenance_lease(self, holder: str, seconds: float) -> bool:
        """Take the maintenance lease for ``holder`` until ``seconds`` from now if it is
        free, expired or held by ``holder`` already (a renewal); whether ``holder`` holds
        it now. One atomic statement, so of two contenders exactly one wins. The time is
        the database's (PostgreSQL), so hosts' clocks need not agree."""
        ...

    def release_maintenance_lease(self, holder: str) -> None:
        """Let the lease go at once if ``holder`` holds it (a clean shutdown)."""
        ...

    # ------------------------------------------------------------- pending HSM objects
    def add_pending_object(self, label: str, since: datetime) -> None:
        """Record, before the HSM write, that an object for a not-yet-committed key is being
        made (committed at once, in its own transaction unless inside one). Re-adding keeps
        the first time."""
        ...

    def remove_pending_object(self, label: str) -> None:
        """Forget a pending object (with the commit of its key's row). Missing: no error."""
        ...

    def pending_objects(self) -> dict[str, datetime]:
        """Every pending object's label and when it was recorded."""
        ...
