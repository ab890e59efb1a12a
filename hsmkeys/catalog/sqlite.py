"""SQLite catalog: the embedded default (WAL mode, one BEGIN IMMEDIATE per state change).

Several processes (server workers, ``hsmkeys maintain``) may open the same file; each
commit is visible to the others at their next statement. Within a process one
connection is shared by all threads behind a lock.

``get_key``, ``get_alias`` and ``grants_for_key`` sit on every request's path, so their
answers are cached per process and validated by a generation counter in ``<catalog>-gen`` (an mmap'd
8-byte file beside the database) that every SqliteCatalog bumps after each commit. A
reader compares one integer in shared memory instead of running a statement, and a
change committed by any process is seen by every other at its next call. The counter
is read before the database, so a cached answer is never newer than the generation it
is tagged with. Entries also expire after ``CACHE_MAX_AGE_SECONDS`` to bound
staleness should a writer die between its commit and its bump. Writers that bypass
SqliteCatalog (the sqlite3 shell) must be followed by a restart or that expiry.

Timestamps are stored as integer microseconds since the Unix epoch (UTC), so they
round-trip exactly and compare as integers in the due-rotation / due-purge queries.
UUIDs are stored as their canonical lower-case string, whose order is the UUID order.
A grant's operations and constraints are JSON; records handed out are immutable (tuples,
read-only mappings), since cached ones are shared by every caller in the process.

Errors: AlreadyExistsException (duplicate key UUID, version, alias name, grant id or
grant token),
NotFoundException (a row that must exist does not), KMSInternalException for every
other SQLite failure (details are logged, not returned).
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hsmkeys.catalog import rows
from hsmkeys.catalog.base import (
    AliasRecord,
    AuditCheckpoint,
    GrantRecord,
    KeyLastUse,
    KeyLifetime,
    KeyRecord,
    UsageCount,
    VersionRecord,
)
from hsmkeys.errors import (
    AlreadyExistsException,
    KMSError,
    KMSInternalException,
    NotFoundException,
)
from hsmkeys.models import (
    KeyState,
    KeyVersionRef,
)

_log = logging.getLogger(__name__)

BUSY_TIMEOUT_SECONDS = 5.0
CACHE_MAX_AGE_SECONDS = 1.0
CACHE_MAX_ENTRIES = 65536
_MISS = object()

#: Schema migrations, applied in order; migration n (1-based) brings the schema to
#: version n. Append new tuples; never edit a released one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE keys (
            uuid TEXT PRIMARY KEY NOT NULL,
            spec TEXT NOT NULL,
            usage TEXT NOT NULL,
            origin TEXT NOT NULL,
            state TEXT NOT NULL,
            description TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            current_version INTEGER NOT NULL CHECK (current_version >= 1),
            rotation_period_days INTEGER,
            next_rotation_at INTEGER,
            deletion_date INTEGER,
            pending_window_days INTEGER,
            policy TEXT
        )""",
        "CREATE INDEX keys_by_rotation ON keys (state, next_rotation_at)",
        "CREATE INDEX keys_by_deletion ON keys (state, deletion_date)",
        """CREATE TABLE key_versions (
            uuid TEXT NOT NULL REFERENCES keys (uuid) ON DELETE CASCADE,
            version INTEGER NOT NULL CHECK (version >= 1),
            created_at INTEGER NOT NULL,
            rotation_type TEXT,
            PRIMARY KEY (uuid, version)
        ) WITHOUT ROWID""",
        """CREATE TABLE aliases (
            name TEXT PRIMARY KEY NOT NULL,
            uuid TEXT NOT NULL REFERENCES keys (uuid) ON DELETE CASCADE,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        )""",
        "CREATE INDEX aliases_by_key ON aliases (uuid, name)",
        """CREATE TABLE tags (
            uuid TEXT NOT NULL REFERENCES keys (uuid) ON DELETE CASCADE,
            tag_key TEXT NOT NULL,
            tag_value TEXT NOT NULL,
            PRIMARY KEY (uuid, tag_key)
        ) WITHOUT ROWID""",
    ),
    (
        # constraints: NULL, or {"EncryptionContextEquals": {...}, "EncryptionContextSubset": {...}}
        # with only the members that are set.
        """CREATE TABLE grants (
            grant_id TEXT PRIMARY KEY NOT NULL,
            uuid TEXT NOT NULL REFERENCES keys (uuid) ON DELETE CASCADE,
            token TEXT NOT NULL UNIQUE,
            name TEXT,
            grantee_principal TEXT NOT NULL,
            retiring_principal TEXT,
            operations TEXT NOT NULL,
            constraints TEXT,
            issuing_account TEXT NOT NULL,
            created_at INTEGER NOT NULL
        )""",
        "CREATE INDEX grants_by_key ON grants (uuid, grant_id)",
        "CREATE INDEX grants_by_name ON grants (uuid, name)",
        "CREATE INDEX grants_by_retiring_principal ON grants (retiring_principal, grant_id)",
        # The token's index is the one its UNIQUE constraint creates.
        """CREATE TABLE audit_checkpoints (
            log_id TEXT PRIMARY KEY NOT NULL,
            seq INTEGER NOT NULL CHECK (seq >= 0),
            chain_hash TEXT NOT NULL,
            mac TEXT NOT NULL,
            file_name TEXT NOT NULL,
            time INTEGER NOT NULL
        )""",
    ),
    (
        "ALTER TABLE keys ADD COLUMN valid_to INTEGER",
        "ALTER TABLE keys ADD COLUMN expiration_model TEXT",
        "ALTER TABLE keys ADD COLUMN material_fingerprint TEXT",
        "CREATE INDEX keys_by_valid_to ON keys (valid_to) WHERE valid_to IS NOT NULL",
    ),
    (
        # AWS managed keys, and key usage: lifetimes outlive purged keys (key-month billing),
        # counts are per hour, key ('' for none), operation and caller account.
        "ALTER TABLE keys ADD COLUMN key_manager TEXT NOT NULL DEFAULT 'CUSTOMER'",
        """CREATE TABLE key_lifetimes (
            uuid TEXT PRIMARY KEY NOT NULL,
            key_manager TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            deleted_at INTEGER,
            tags TEXT,
            aliases TEXT
        )""",
        "INSERT INTO key_lifetimes (uuid, key_manager, created_at) SELECT uuid, key_manager, created_at FROM keys",
        """CREATE TABLE usage_counts (
            hour INTEGER NOT NULL,
            uuid TEXT NOT NULL,
            operation TEXT NOT NULL,
            account TEXT NOT NULL,
            count INTEGER NOT NULL CHECK (count >= 0),
            PRIMARY KEY (hour, uuid, operation, account)
        ) WITHOUT ROWID""",
        """CREATE TABLE key_last_use (
            uuid TEXT PRIMARY KEY NOT NULL REFERENCES keys (uuid) ON DELETE CASCADE,
            operation TEXT NOT NULL,
            time INTEGER NOT NULL,
            request_id TEXT NOT NULL
        )""",
        """CREATE TABLE usage_tracking (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            started_at INTEGER NOT NULL
        )""",
        "INSERT INTO usage_tracking (id, started_at) "
        "VALUES (1, CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER))",
    ),
    (
        # Reliability: AES-GCM encryptions reserved per version (blocks, never given back),
        # when doctor first saw each orphan object, and the resource each retried
        # non-idempotent request made (by the SDK's invocation id).
        "ALTER TABLE key_versions ADD COLUMN encryptions_reserved INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE doctor_sightings (
            name TEXT PRIMARY KEY NOT NULL,
            first_seen INTEGER NOT NULL
        )""",
        """CREATE TABLE request_results (
            principal TEXT NOT NULL,
            invocation_id TEXT NOT NULL,
            operation TEXT NOT NULL,
            resource TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            PRIMARY KEY (principal, invocation_id, operation)
        )""",
        "CREATE INDEX request_results_by_age ON request_results (created_at)",
    ),
    (
        # Maintenance runs in one process at a time: whoever holds this lease.
        """CREATE TABLE maintenance_lease (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            holder TEXT NOT NULL,
            expires INTEGER NOT NULL
        )""",
        "INSERT INTO maintenance_lease (id, holder, expires) VALUES (1, '', 0)",
    ),
    (
        # Objects being made for keys whose rows are not committed yet (CreateKey): the
        # sweeper may remove one left by a crash without touching other deployments' keys.
        """CREATE TABLE pending_objects (
            label TEXT PRIMARY KEY NOT NULL,
            since INTEGER NOT NULL
        )""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_KEY_COLUMNS = rows.KEY_COLUMNS
_GET_KEY = f"SELECT {_KEY_COLUMNS} FROM keys WHERE uuid = ?"
_INSERT_KEY = f"INSERT INTO keys ({_KEY_COLUMNS}) VALUES ({', '.join('?' * 17)})"
_UPDATE_KEY = (
    "UPDATE keys SET spec = ?, usage = ?, origin = ?, state = ?, description = ?, "
    "created_at = ?, current_version = ?, rotation_period_days = ?, next_rotation_at = ?, "
    "deletion_date = ?, pending_window_days = ?, policy = ?, valid_to = ?, expiration_model = ?, "
    "material_fingerprint = ?, key_manager = ? WHERE uuid = ?"
)
_MATERIAL_EXPIRED = (
    f"SELECT {_KEY_COLUMNS} FROM keys WHERE valid_to IS NOT NULL AND valid_to <= ? AND state != ? "
    "ORDER BY valid_to, uuid"
)
_LIST_KEYS = f"SELECT {_KEY_COLUMNS} FROM keys WHERE uuid > ? ORDER BY uuid LIMIT ?"
_LIST_KEYS_BUT_STATE = (
    f"SELECT {_KEY_COLUMNS} FROM keys WHERE uuid > ? AND state != ? ORDER BY uuid LIMIT ?"
)
_DUE_ROTATION = (
    f"SELECT {_KEY_COLUMNS} FROM keys WHERE state = ? AND next_rotation_at IS NOT NULL "
    "AND next_rotation_at <= ? ORDER BY next_rotation_at, uuid"
)
_DUE_PURGE = (
    f"SELECT {_KEY_COLUMNS} FROM keys WHERE (state = ? AND deletion_date <= ?) OR state = ? "
    "ORDER BY deletion_date, uuid"
)
_INSERT_VERSION = (
    "INSERT INTO key_versions (uuid, version, created_at, rotation_type) VALUES (?, ?, ?, ?)"
)
_ALIAS_COLUMNS = rows.ALIAS_COLUMNS
_GRANT_COLUMNS = rows.GRANT_COLUMNS
_SELECT_GRANTS = f"SELECT {_GRANT_COLUMNS} FROM grants"
_CHECKPOINT_COLUMNS = rows.CHECKPOINT_COLUMNS

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

_SPECS = rows.SPECS
_USAGES = rows.USAGES
_ORIGINS = rows.ORIGINS
_STATES = rows.STATES
_ROTATION_TYPES = rows.ROTATION_TYPES
_KEY_MANAGERS = rows.KEY_MANAGERS

_ALREADY_EXISTS = frozenset({"SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"})


def _to_us(when: datetime) -> int:
    if when.tzinfo is None:
        raise KMSInternalException("catalog timestamps must be timezone-aware")
    return (when - _EPOCH) // _MICROSECOND


def _now() -> datetime:
    return datetime.now(UTC)


def _from_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _from_us_or_none(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + timedelta(microseconds=value)


_CODEC = rows.RowCodec(
    uuid_in=uuid.UUID,
    uuid_out=str,
    time_in=_from_us,
    time_out=_to_us,
    json_in=json.loads,
    json_out=lambda value: json.dumps(value, sort_keys=True),
    list_in=json.loads,
    list_out=json.dumps,
)
_key_from_row = _CODEC.key
_key_values = _CODEC.key_values
_version_from_row = _CODEC.version
_alias_from_row = _CODEC.alias
_grant_values = _CODEC.grant_values
_grant_from_row = _CODEC.grant
_checkpoint_from_row = _CODEC.checkpoint


def _internal(operation: str, exc: BaseException) -> KMSInternalException:
    _log.error("catalog_error operation=%s error=%r", operation, exc)
    return KMSInternalException("The catalog failed; see the server log.")


def _integrity(exc: sqlite3.IntegrityError, *, exists: str, missing: str) -> KMSError:
    name = getattr(exc, "sqlite_errorname", "")
    if name in _ALREADY_EXISTS:
        return AlreadyExistsException(exists)
    if name == "SQLITE_CONSTRAINT_FOREIGNKEY":
        return NotFoundException(missing)
    return _internal("integrity", exc)


class _Generation:
    """A commit counter shared by every process that opens the same catalog file."""

    def __init__(self, path: str | None) -> None:
        self._fd = -1
        if path is None:  # ":memory:" is private to this connection
            self._map: mmap.mmap | bytearray = bytearray(8)
            return
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(self._fd).st_size < 8:
                os.ftruncate(self._fd, 8)  # zero-filled; growing it twice is harmless
            self._map = mmap.mmap(self._fd, 8)
        except BaseException:
            os.close(self._fd)
            raise

    def read(self) -> int:
        return int.from_bytes(self._map[0:8], "little")

    def bump(self) -> None:
        """Add one, serialised across processes by flock (commits themselves are not)."""
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._map[0:8] = ((self.read() + 1) % (1 << 64)).to_bytes(8, "little")
        finally:
            if self._fd >= 0:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if isinstance(self._map, mmap.mmap):
            self._map.close()
            self._map = bytearray(8)  # reads after close reach the (closed) database and fail there
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SqliteCatalog:
    """The Catalog protocol over one SQLite file (or ``":memory:"`` for tests)."""

    def __init__(self, path: str | Path) -> None:
        target = str(path)
        # RLock: transaction() holds it across the calls it encloses, which lock again.
        self._lock = threading.RLock()
        self._depth = 0
        # uuid -> KeyRecord | None, ("alias", name) -> AliasRecord | None,
        # ("grants", uuid) -> tuple[GrantRecord, ...]
        self._cache: dict[object, Any] = {}
        self._cache_generation = -1
        self._cache_expires = 0.0
        try:
            if target != ":memory:":
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._generation = _Generation(None if target == ":memory:" else target + "-gen")
            self._conn = sqlite3.connect(
                target,
                timeout=BUSY_TIMEOUT_SECONDS,
                isolation_level=None,  # autocommit; writes open BEGIN IMMEDIATE themselves
                check_same_thread=False,  # uvicorn may run handlers on other threads; the lock serialises
            )
        except (OSError, sqlite3.Error) as exc:
            raise _internal("open", exc) from exc
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._enter_wal(target)
            # Writes are rare; FULL makes a committed key or version survive power loss.
            self._conn.execute("PRAGMA synchronous = FULL")
            self._migrate()
        except BaseException:
            self._conn.close()
            self._generation.close()
            raise

    # ------------------------------------------------------------- setup

    def _enter_wal(self, target: str) -> None:
        # Switching a fresh file to WAL returns SQLITE_BUSY at once (no busy handler)
        # while another process holds a lock, so retry until the busy timeout.
        deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
        delay = 0.001
        while True:
            try:
                row = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()
                break
            except sqlite3.OperationalError as exc:
                if time.monotonic() >= deadline:
                    raise _internal("open", exc) from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        mode = str(row[0]).lower()
        if mode != "wal" and not (target == ":memory:" and mode == "memory"):
            raise _internal("open", RuntimeError(f"journal_mode is {mode}, not wal"))

    def _migrate(self) -> None:
        if self._stored_schema_version() == SCHEMA_VERSION:
            return  # the common case takes no write lock
        # BEGIN IMMEDIATE serialises processes opening a fresh file at the same time;
        # the version is read again inside, so each migration runs exactly once.
        with self._write("migrate"):
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)"
            )
            current = self._stored_schema_version() or 0
            if current > SCHEMA_VERSION:
                raise _internal(
                    "migrate",
                    RuntimeError(f"schema version {current} is newer than {SCHEMA_VERSION}"),
                )
            for statements in MIGRATIONS[current:]:
                for statement in statements:
                    self._conn.execute(statement)
            self._conn.execute(
                "INSERT INTO schema_version (id, version) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                (SCHEMA_VERSION,),
            )

    def _stored_schema_version(self) -> int | None:
        try:
            row = self._conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
        except sqlite3.OperationalError:
            return None  # no schema_version table yet: a fresh file
        return None if row is None else int(row[0])

    @property
    def schema_version(self) -> int:
        """The schema version stored in the file (SCHEMA_VERSION once opened)."""
        with self._lock:
            return self._stored_schema_version() or 0

    # ------------------------------------------------------------- transactions

    def _run(self, operation: str, sql: str) -> None:
        try:
            self._conn.execute(sql)
        except sqlite3.Error as exc:
            raise _internal(operation, exc) from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic write unit (BEGIN IMMEDIATE); nested use joins the outer one.

        A nested block runs in a SAVEPOINT, so a nested failure undoes only that block
        even if the outer code catches the error. Other threads wait on the lock.
        Raises KMSInternalException if SQLite cannot begin or commit.
        """
        with self._lock:
            depth = self._depth
            savepoint = f"hsmkeys_{depth}"
            self._run("begin", "BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT {savepoint}")
            self._depth = depth + 1
            try:
                yield
            except BaseException:
                self._depth = depth
                self._undo(depth, savepoint)
                raise
            self._depth = depth
            if depth > 0:
                self._run("commit", f"RELEASE {savepoint}")
                return
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._undo(0, savepoint)
                raise _internal("commit", exc) from exc
            self._generation.bump()

    def _cached(self, key: object, load: Callable[[], Any]) -> Any:
        """``load()``, answered from the per-process cache while the generation is unchanged.

        Inside a transaction the database is read directly and nothing is cached.
        """
        with self._lock:
            if self._depth:
                return load()
            generation = self._generation.read()  # before the database: see the module docstring
            now = time.monotonic()
            if (
                generation != self._cache_generation
                or now >= self._cache_expires
                or len(self._cache) >= CACHE_MAX_ENTRIES
            ):
                self._cache.clear()
                self._cache_generation = generation
                self._cache_expires = now + CACHE_MAX_AGE_SECONDS
            found = self._cache.get(key, _MISS)
            if found is _MISS:
                found = self._cache[key] = load()
            return found

    def _undo(self, depth: int, savepoint: str) -> None:
        try:
            if depth > 0:
                self._conn.execute(f"ROLLBACK TO {savepoint}")
                self._conn.execute(f"RELEASE {savepoint}")
            elif self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            # The original error is the one worth raising; this one is only logged.
            _log.error("catalog_rollback_failed error=%r", exc)

    @contextmanager
    def _write(self, operation: str) -> Iterator[None]:
        """transaction() plus the mapping of stray SQLite errors to KMSInternalException."""
        with self.transaction():
            try:
                yield
            except sqlite3.Error as exc:
                raise _internal(operation, exc) from exc

    def _read(self, operation: str, sql: str, params: tuple[object, ...]) -> list[Any]:
        try:
            with self._lock:
                return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _internal(operation, exc) from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self._generation.close()

    # ------------------------------------------------------------- keys

    def insert_key(self, key: KeyRecord, first_version: VersionRecord) -> None:
        """Raises AlreadyExistsException if the UUID is taken."""
        if first_version.key_uuid != key.key_uuid:
            raise KMSInternalException("first_version belongs to another key")
        key_id = str(key.key_uuid)
        with self._write("insert_key"):
            try:
                self._conn.execute(_INSERT_KEY, (key_id, *_key_values(key)))
            except sqlite3.IntegrityError as exc:
                raise _integrity(
                    exc, exists=f"Key '{key_id}' already exists.", missing=key_id
                ) from exc
            self._insert_version(first_version)
            self._conn.execute(
                "INSERT INTO key_lifetimes (uuid, key_manager, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (uuid) DO NOTHING",
                (key_id, key.key_manager.value, _to_us(key.created_at)),
            )

    def get_key(self, key_uuid: uuid.UUID) -> KeyRecord | None:
        found: KeyRecord | None = self._cached(key_uuid, lambda: self._load_key(key_uuid))
        return found

    def _load_key(self, key_uuid: uuid.UUID) -> KeyRecord | None:
        try:
            row = self._conn.execute(_GET_KEY, (str(key_uuid),)).fetchone()
            return None if row is None else _key_from_row(row, key_uuid)
        except (sqlite3.Error, KeyError, TypeError) as exc:
            raise _internal("get_key", exc) from exc

    def update_key(self, key: KeyRecord) -> None:
        """Raises NotFoundException if no row has ``key.key_uuid``."""
        with self._write("update_key"):
            cursor = self._conn.execute(_UPDATE_KEY, (*_key_values(key), str(key.key_uuid)))
            if cursor.rowcount == 0:
                raise NotFoundException(f"Key '{key.key_uuid}' does not exist.")

    def delete_key(self, key_uuid: uuid.UUID) -> None:
        key_id = str(key_uuid)
        with self._write("delete_key"):
            # Close the key's lifetime (billing) with what it was labelled by, then delete:
            # ON DELETE CASCADE removes its versions, aliases, tags, grants and last use.
            row = self._conn.execute(
                "SELECT coalesce(deletion_date, ?) FROM keys WHERE uuid = ?", (_to_us(_now()), key_id)
            ).fetchone()
            if row is not None:
                self._conn.execute(
                    "UPDATE key_lifetimes SET deleted_at = ?, tags = ?, aliases = ? WHERE uuid = ?",
                    (
                        row[0],
                        json.dumps(self.get_tags(key_uuid), sort_keys=True),
                        json.dumps([a.name for a in self.list_aliases(limit=1 << 30, key_uuid=key_uuid)]),
                        key_id,
                    ),
                )
            self._conn.execute("DELETE FROM keys WHERE uuid = ?", (key_id,))

    def list_keys(
        self, *, limit: int, after: uuid.UUID | None = None, exclude_purging: bool = False
    ) -> list[KeyRecord]:
        """Keys ordered by UUID string, after ``after``, at most ``limit``.

        ``exclude_purging`` leaves Purging keys out in SQL, so a page is short only at the end.
        """
        start = "" if after is None else str(after)
        if exclude_purging:
            rows = self._read(
                "list_keys",
                _LIST_KEYS_BUT_STATE,
                (start, KeyState.PURGING.value, max(limit, 0)),
            )
        else:
            rows = self._read("list_keys", _LIST_KEYS, (start, max(limit, 0)))
        return self._keys(rows, "list_keys")

    def count_keys(self) -> int:
        return int(self._read("count_keys", "SELECT count(*) FROM keys", ())[0][0])

    def keys_due_rotation(self, now: datetime) -> list[KeyRecord]:
        """Enabled keys whose next_rotation_at is set and <= now, soonest first."""
        rows = self._read("keys_due_rotation", _DUE_ROTATION, (KeyState.ENABLED.value, _to_us(now)))
        return self._keys(rows, "keys_due_rotation")

    def keys_material_expired(self, now: datetime) -> list[KeyRecord]:
        """Keys with imported material whose valid_to <= now (not PendingImport already)."""
        params = (_to_us(now), KeyState.PENDING_IMPORT.value)
        return self._keys(self._read("keys_material_expired", _MATERIAL_EXPIRED, params), "keys_material_expired")

    def keys_due_purge(self, now: datetime) -> list[KeyRecord]:
        """PendingDeletion keys whose deletion_date <= now, and every Purging key."""
        params = (KeyState.PENDING_DELETION.value, _to_us(now), KeyState.PURGING.value)
        return self._keys(self._read("keys_due_purge", _DUE_PURGE, params), "keys_due_purge")

    @staticmethod
    def _keys(rows: list[Any], operation: str) -> list[KeyRecord]:
        try:
            return [_key_from_row(row) for row in rows]
        except (KeyError, ValueError, TypeError) as exc:
            raise _internal(operation, exc) from exc

    # ------------------------------------------------------------- versions

    def _insert_version(self, version: VersionRecord) -> None:
        key_id = str(version.key_uuid)
        params = (
            key_id,
            version.version,
            _to_us(version.created_at),
            None if version.rotation_type is None else version.rotation_type.value,
        )
        try:
            self._conn.execute(_INSERT_VERSION, params)
        except sqlite3.IntegrityError as exc:
            raise _integrity(
                exc,
                exists=f"Key '{key_id}' already has version {version.version}.",
                missing=f"Key '{key_id}' does not exist.",
            ) from exc

    def add_version(self, version: VersionRecord) -> None:
        """Record a new version and make it current, atomically.

        Raises NotFoundException if the key is missing, AlreadyExistsException if the
        version number is taken.
        """
        with self._write("add_version"):
            self._insert_version(version)
            self._conn.execute(
                "UPDATE keys SET current_version = ? WHERE uuid = ?",
                (version.version, str(version.key_uuid)),
            )

    def list_versions(self, key_uuid: uuid.UUID) -> list[VersionRecord]:
        rows = self._read(
            "list_versions",
            "SELECT uuid, version, created_at, rotation_type FROM key_versions "
            "WHERE uuid = ? ORDER BY version",
            (str(key_uuid),),
        )
        try:
            return [_version_from_row(row) for row in rows]
        except (KeyError, ValueError, TypeError) as exc:
            raise _internal("list_versions", exc) from exc

    def all_version_refs(self) -> set[KeyVersionRef]:
        rows = self._read("all_version_refs", "SELECT uuid, version FROM key_versions", ())
        return {KeyVersionRef(uuid.UUID(row[0]), row[1]) for row in rows}

    def reserve_encryptions(self, ref: KeyVersionRef, count: int, limit: int) -> int:
        """Reserve up to ``count`` more encryptions of a version, never past ``limit`` in
        total; how many were granted (0: the version is spent). One UPDATE; reservations
        are never returned, so a crash wastes at most the unspent part of a block."""
        with self._write("reserve_encryptions"):
            row = self._conn.execute(
                "SELECT encryptions_reserved FROM key_versions WHERE uuid = ? AND version = ?",
                (str(ref.key_uuid), ref.version),
            ).fetchone()
            if row is None:
                raise NotFoundException(f"Key version {ref.label} does not exist.")
            granted = max(0, min(count, limit - int(row[0])))
            if granted:
                self._conn.execute(
                    "UPDATE key_versions SET encryptions_reserved = encryptions_reserved + ? "
                    "WHERE uuid = ? AND version = ?",
                    (granted, str(ref.key_uuid), ref.version),
                )
            return granted

    def encryptions_reserved(self, ref: KeyVersionRef) -> int:
        rows = self._read(
            "encryptions_reserved",
            "SELECT encryptions_reserved FROM key_versions WHERE uuid = ? AND version = ?",
            (str(ref.key_uuid), ref.version),
        )
        return int(rows[0][0]) if rows else 0

    # ------------------------------------------------------------- doctor

    def record_sightings(self, names: Iterable[str], now: datetime) -> dict[str, datetime]:
        """When each named orphan was first seen (``now`` for new ones); names no longer
        given are forgotten. One transaction."""
        wanted = set(names)
        with self._write("record_sightings"):
            stored = {
                row[0]: _from_us(row[1])
                for row in self._conn.execute("SELECT name, first_seen FROM doctor_sightings")
            }
            gone = [(name,) for name in stored if name not in wanted]
            self._conn.executemany("DELETE FROM doctor_sightings WHERE name = ?", gone)
            new = [(name, _to_us(now)) for name in wanted if name not in stored]
            self._conn.executemany("INSERT INTO doctor_sightings (name, first_seen) VALUES (?, ?)", new)
        return {name: stored.get(name, now) for name in wanted}

    # ------------------------------------------------------------- pending HSM objects

    def add_pending_object(self, label: str, since: datetime) -> None:
        with self._write("add_pending_object"):
            self._conn.execute(
                "INSERT INTO pending_objects (label, since) VALUES (?, ?) ON CONFLICT (label) DO NOTHING",
                (label, _to_us(since)),
            )

    def remove_pending_object(self, label: str) -> None:
        with self._write("remove_pending_object"):
            self._conn.execute("DELETE FROM pending_objects WHERE label = ?", (label,))

    def pending_objects(self) -> dict[str, datetime]:
        rows = self._read("pending_objects", "SELECT label, since FROM pending_objects", ())
        return {row[0]: _from_us(row[1]) for row in rows}

    # ------------------------------------------------------------- request results

    def remember_request(
        self, principal: str, invocation_id: str, operation: str, resource: str, now: datetime
    ) -> None:
        """Record what a request made (inside the caller's transaction, with the effect);
        rows older than a day are dropped. AlreadyExistsException if already recorded."""
        with self._write("remember_request"):
            self._conn.execute(
                "DELETE FROM request_results WHERE created_at < ?",
                (_to_us(now - timedelta(days=1)),),
            )
            try:
                self._conn.execute(
                    "INSERT INTO request_results (principal, invocation_id, operation, resource, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (principal, invocation_id, operation, resource, _to_us(now)),
                )
            except sqlite3.IntegrityError as exc:
                raise _integrity(exc, exists="The request was already done.", missing="") from exc

    def recall_request(self, principal: str, invocation_id: str, operation: str) -> str | None:
        """The resource an earlier attempt of this request made, if it committed."""
        rows = self._read(
            "recall_request",
            "SELECT resource FROM request_results WHERE principal = ? AND invocation_id = ? "
            "AND operation = ?",
            (principal, invocation_id, operation),
        )
        return str(rows[0][0]) if rows else None

    # ------------------------------------------------------------- maintenance lease

    def take_maintenance_lease(self, holder: str, seconds: float) -> bool:
        """Take or renew the lease (see Catalog): one UPDATE, atomic in SQLite's write lock.
        The wall clock decides expiry (the processes sharing a file share a host). It
        bypasses transaction() so that a renewal does not flush every process's cache."""
        now = time.time_ns() // 1000
        try:
            with self._lock:
                cursor = self._conn.execute(
                    "UPDATE maintenance_lease SET holder = ?, expires = ? "
                    "WHERE id = 1 AND (expires < ? OR holder = ?)",
                    (holder, now + int(seconds * 1_000_000), now, holder),
                )
        except sqlite3.Error as exc:
            raise _internal("take_maintenance_lease", exc) from exc
        return cursor.rowcount == 1

    def release_maintenance_lease(self, holder: str) -> None:
        try:
            with self._lock:
                self._conn.execute("UPDATE maintenance_lease SET expires = 0 WHERE id = 1 AND holder = ?", (holder,))
        except sqlite3.Error as exc:
            raise _internal("release_maintenance_lease", exc) from exc

    # ------------------------------------------------------------- aliases

    def insert_alias(self, alias: AliasRecord) -> None:
        """Raises AlreadyExistsException if the name is taken, NotFoundException if the key is missing."""
        with self._write("insert_alias"):
            try:
                self._conn.execute(
                    f"INSERT INTO aliases ({_ALIAS_COLUMNS}) VALUES (?, ?, ?, ?)",
                    (
                        alias.name,
                        str(alias.key_uuid),
                        _to_us(alias.created_at),
                        _to_us(alias.updated_at),
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise _integrity(
                    exc,
                    exists=f"Alias '{alias.name}' already exists.",
                    missing=f"Key '{alias.key_uuid}' does not exist.",
                ) from exc

    def get_alias(self, name: str) -> AliasRecord | None:
        found: AliasRecord | None = self._cached(("alias", name), lambda: self._load_alias(name))
        return found

    def _load_alias(self, name: str) -> AliasRecord | None:
        rows = self._read(
            "get_alias", f"SELECT {_ALIAS_COLUMNS} FROM aliases WHERE name = ?", (name,)
        )
        return _alias_from_row(rows[0]) if rows else None

    def update_alias(self, alias: AliasRecord) -> None:
        """Point an alias at another key. Raises NotFoundException if the alias or key is missing."""
        with self._write("update_alias"):
            try:
                cursor = self._conn.execute(
                    "UPDATE aliases SET uuid = ?, created_at = ?, updated_at = ? WHERE name = ?",
                    (
                        str(alias.key_uuid),
                        _to_us(alias.created_at),
                        _to_us(alias.updated_at),
                        alias.name,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise _integrity(
                    exc,
                    exists=f"Alias '{alias.name}' already exists.",
                    missing=f"Key '{alias.key_uuid}' does not exist.",
                ) from exc
            if cursor.rowcount == 0:
                raise NotFoundException(f"Alias '{alias.name}' does not exist.")

    def delete_alias(self, name: str) -> None:
        """Raises NotFoundException if the alias does not exist (as KMS DeleteAlias does)."""
        with self._write("delete_alias"):
            cursor = self._conn.execute("DELETE FROM aliases WHERE name = ?", (name,))
            if cursor.rowcount == 0:
                raise NotFoundException(f"Alias '{name}' does not exist.")

    def list_aliases(
        self, *, limit: int, after: str | None = None, key_uuid: uuid.UUID | None = None
    ) -> list[AliasRecord]:
        """Aliases ordered by name, starting after ``after``, optionally only one key's."""
        start = "" if after is None else after
        if key_uuid is None:
            sql = f"SELECT {_ALIAS_COLUMNS} FROM aliases WHERE name > ? ORDER BY name LIMIT ?"
            params: tuple[object, ...] = (start, max(limit, 0))
        else:
            sql = (
                f"SELECT {_ALIAS_COLUMNS} FROM aliases WHERE uuid = ? AND name > ? "
                "ORDER BY name LIMIT ?"
            )
            params = (str(key_uuid), start, max(limit, 0))
        return [_alias_from_row(row) for row in self._read("list_aliases", sql, params)]

    def count_aliases(self, key_uuid: uuid.UUID) -> int:
        rows = self._read(
            "count_aliases", "SELECT count(*) FROM aliases WHERE uuid = ?", (str(key_uuid),)
        )
        return int(rows[0][0])

    # ------------------------------------------------------------- tags

    def put_tags(self, key_uuid: uuid.UUID, tags: Mapping[str, str]) -> None:
        """Add or overwrite tags. Raises NotFoundException if the key is missing."""
        key_id = str(key_uuid)
        with self._write("put_tags"):
            try:
                self._conn.executemany(
                    "INSERT INTO tags (uuid, tag_key, tag_value) VALUES (?, ?, ?) "
                    "ON CONFLICT (uuid, tag_key) DO UPDATE SET tag_value = excluded.tag_value",
                    [(key_id, k, v) for k, v in tags.items()],
                )
            except sqlite3.IntegrityError as exc:
                raise _integrity(
                    exc, exists=key_id, missing=f"Key '{key_id}' does not exist."
                ) from exc

    def delete_tags(self, key_uuid: uuid.UUID, tag_keys: Iterable[str]) -> None:
        """Remove the named tags; names that are not set are ignored."""
        key_id = str(key_uuid)
        with self._write("delete_tags"):
            self._conn.executemany(
                "DELETE FROM tags WHERE uuid = ? AND tag_key = ?", [(key_id, k) for k in tag_keys]
            )

    def get_tags(self, key_uuid: uuid.UUID) -> dict[str, str]:
        """The key's tags ordered by tag key (empty for an unknown key)."""
        rows = self._read(
            "get_tags",
            "SELECT tag_key, tag_value FROM tags WHERE uuid = ? ORDER BY tag_key",
            (str(key_uuid),),
        )
        return {row[0]: row[1] for row in rows}

    # ------------------------------------------------------------- grants

    def insert_grant(self, grant: GrantRecord) -> None:
        """Raises NotFoundException if the key is missing, AlreadyExistsException if the
        grant id or token is taken."""
        with self._write("insert_grant"):
            try:
                self._conn.execute(
                    f"INSERT INTO grants ({_GRANT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _grant_values(grant),
                )
            except sqlite3.IntegrityError as exc:
                raise _integrity(
                    exc,
                    exists=f"Grant '{grant.grant_id}' or its token already exists.",
                    missing=f"Key '{grant.key_uuid}' does not exist.",
                ) from exc

    def _grants(self, operation: str, clause: str, params: tuple[object, ...]) -> list[GrantRecord]:
        """Grants matching ``WHERE clause`` (which may end in ORDER BY / LIMIT)."""
        rows = self._read(operation, f"{_SELECT_GRANTS} WHERE {clause}", params)
        try:
            return [_grant_from_row(row) for row in rows]
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            raise _internal(operation, exc) from exc

    def get_grant(self, key_uuid: uuid.UUID, grant_id: str) -> GrantRecord | None:
        """The grant with that id if it belongs to that key, else None."""
        found = self._grants("get_grant", "grant_id = ? AND uuid = ?", (grant_id, str(key_uuid)))
        return found[0] if found else None

    def get_grant_by_token(self, token: str) -> GrantRecord | None:
        found = self._grants("get_grant_by_token", "token = ?", (token,))
        return found[0] if found else None

    def find_grant_by_name(self, key_uuid: uuid.UUID, name: str) -> list[GrantRecord]:
        """Every grant of the key with that name, ordered by grant_id."""
        return self._grants(
            "find_grant_by_name",
            "uuid = ? AND name = ? ORDER BY grant_id",
            (str(key_uuid), name),
        )

    def list_grants(
        self,
        key_uuid: uuid.UUID,
        *,
        limit: int,
        after: str | None = None,
        grant_id: str | None = None,
        grantee_principal: str | None = None,
    ) -> list[GrantRecord]:
        """Grants of one key ordered by grant_id, after ``after``, at most ``limit``,
        optionally only the one with ``grant_id`` and/or those of ``grantee_principal``."""
        where = "uuid = ? AND grant_id > ?"
        params: list[object] = [str(key_uuid), "" if after is None else after]
        if grant_id is not None:
            where += " AND grant_id = ?"
            params.append(grant_id)
        if grantee_principal is not None:
            where += " AND grantee_principal = ?"
            params.append(grantee_principal)
        params.append(max(limit, 0))
        return self._grants("list_grants", f"{where} ORDER BY grant_id LIMIT ?", tuple(params))

    def grants_for_key(self, key_uuid: uuid.UUID) -> tuple[GrantRecord, ...]:
        """Every grant of the key ordered by grant_id (empty for an unknown key), cached."""
        found: tuple[GrantRecord, ...] = self._cached(
            ("grants", key_uuid),
            lambda: tuple(
                self._grants("grants_for_key", "uuid = ? ORDER BY grant_id", (str(key_uuid),))
            ),
        )
        return found

    def list_retirable_grants(
        self, retiring_principal: str, *, limit: int, after: str | None = None
    ) -> list[GrantRecord]:
        """Grants of any key naming ``retiring_principal``, ordered by grant_id, after
        ``after``, at most ``limit``."""
        return self._grants(
            "list_retirable_grants",
            "retiring_principal = ? AND grant_id > ? ORDER BY grant_id LIMIT ?",
            (retiring_principal, "" if after is None else after, max(limit, 0)),
        )

    def delete_grant(self, grant_id: str) -> bool:
        """Remove one grant; False when it did not exist."""
        with self._write("delete_grant"):
            cursor = self._conn.execute("DELETE FROM grants WHERE grant_id = ?", (grant_id,))
            return cursor.rowcount > 0

    # ------------------------------------------------------------- audit checkpoints

    def get_audit_checkpoint(self, log_id: str) -> AuditCheckpoint | None:
        rows = self._read(
            "get_audit_checkpoint",
            f"SELECT {_CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE log_id = ?",
            (log_id,),
        )
        return _checkpoint_from_row(rows[0]) if rows else None

    def list_audit_checkpoint_ids(self) -> list[str]:
        """Every chain with a stored checkpoint (its log id), ordered."""
        rows = self._read(
            "list_audit_checkpoint_ids", "SELECT log_id FROM audit_checkpoints ORDER BY log_id", ()
        )
        return [str(row[0]) for row in rows]

    def put_audit_checkpoint(self, checkpoint: AuditCheckpoint) -> None:
        """Store the newest checkpoint of a chain, replacing the previous one."""
        with self._write("put_audit_checkpoint"):
            self._conn.execute(
                f"INSERT INTO audit_checkpoints ({_CHECKPOINT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (log_id) DO UPDATE SET seq = excluded.seq, "
                "chain_hash = excluded.chain_hash, mac = excluded.mac, "
                "file_name = excluded.file_name, time = excluded.time",
                (
                    checkpoint.log_id,
                    checkpoint.sequence,
                    checkpoint.chain_hash,
                    checkpoint.mac,
                    checkpoint.file_name,
                    _to_us(checkpoint.time),
                ),
            )

    # ------------------------------------------------------------- key usage

    def add_usage(self, counts: Iterable[UsageCount], last_uses: Mapping[uuid.UUID, KeyLastUse]) -> None:
        """Add counts and keep each key's newer last use, in one transaction.

        The usage tables are never cached, so the commit does not bump the generation
        (a flush every few seconds must not empty every process's read cache).
        """
        count_rows = [
            (_to_us(c.hour), "" if c.key_uuid is None else str(c.key_uuid), c.operation, c.account, c.count)
            for c in counts
        ]
        use_rows = [(str(k), u.operation, _to_us(u.time), u.request_id) for k, u in last_uses.items()]
        if not (count_rows or use_rows):
            return
        with self._lock:
            if self._depth:  # inside a caller's transaction: join it
                self._add_usage(count_rows, use_rows)
                return
            self._run("begin", "BEGIN IMMEDIATE")
            try:
                self._add_usage(count_rows, use_rows)
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._undo(0, "")
                raise _internal("add_usage", exc) from exc
            except BaseException:
                self._undo(0, "")
                raise

    def _add_usage(self, count_rows: Sequence[tuple[object, ...]], use_rows: Sequence[tuple[object, ...]]) -> None:
        self._conn.executemany(
            "INSERT INTO usage_counts (hour, uuid, operation, account, count) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (hour, uuid, operation, account) DO UPDATE SET count = count + excluded.count",
            count_rows,
        )
        # Only keys that still exist (a purged key has no last use); the newer use wins.
        self._conn.executemany(
            "INSERT INTO key_last_use (uuid, operation, time, request_id) "
            "SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM keys WHERE uuid = ?1) "
            "ON CONFLICT (uuid) DO UPDATE SET operation = excluded.operation, time = excluded.time, "
            "request_id = excluded.request_id WHERE excluded.time >= key_last_use.time",
            use_rows,
        )

    def get_key_last_use(self, key_uuid: uuid.UUID) -> KeyLastUse | None:
        rows = self._read(
            "get_key_last_use",
            "SELECT operation, time, request_id FROM key_last_use WHERE uuid = ?",
            (str(key_uuid),),
        )
        return KeyLastUse(rows[0][0], _from_us(rows[0][1]), rows[0][2]) if rows else None

    def usage_tracking_start(self) -> datetime:
        rows = self._read("usage_tracking_start", "SELECT started_at FROM usage_tracking WHERE id = 1", ())
        return _from_us(rows[0][0])

    def list_usage(self, since: datetime, until: datetime) -> list[UsageCount]:
        rows = self._read(
            "list_usage",
            "SELECT hour, uuid, operation, account, count FROM usage_counts "
            "WHERE hour >= ? AND hour < ? ORDER BY hour, uuid, operation, account",
            (_to_us(since), _to_us(until)),
        )
        return [
            UsageCount(uuid.UUID(r[1]) if r[1] else None, r[2], r[3], _from_us(r[0]), r[4]) for r in rows
        ]

    def list_key_lifetimes(self, since: datetime, until: datetime) -> list[KeyLifetime]:
        rows = self._read(
            "list_key_lifetimes",
            "SELECT uuid, key_manager, created_at, deleted_at, tags, aliases FROM key_lifetimes "
            "WHERE created_at < ? AND (deleted_at IS NULL OR deleted_at > ?) ORDER BY uuid",
            (_to_us(until), _to_us(since)),
        )
        found = []
        for r in rows:
            key_uuid = uuid.UUID(r[0])
            if r[3] is None:  # a live key: its current labels
                tags = self.get_tags(key_uuid)
                aliases = tuple(a.name for a in self.list_aliases(limit=1 << 30, key_uuid=key_uuid))
            else:
                tags = json.loads(r[4]) if r[4] else {}
                aliases = tuple(json.loads(r[5])) if r[5] else ()
            found.append(
                KeyLifetime(key_uuid, _KEY_MANAGERS[r[1]], _from_us(r[2]), _from_us_or_none(r[3]), tags, aliases)
            )
        return found
