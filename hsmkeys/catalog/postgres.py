"""PostgreSQL catalog: one database shared by several hosts (and their worker processes).

Connections come from a psycopg-pool ``ConnectionPool`` in autocommit mode; a statement
outside ``transaction()`` is its own transaction. ``transaction()`` checks out one
connection for the calling thread and runs the enclosed calls as one database
transaction (READ COMMITTED); a nested ``transaction()`` is a SAVEPOINT, and so is
every write made inside a transaction, so a failed write (a duplicate alias, say)
undoes only itself, as in SQLite, and the caller may go on.

Read-modify-write is safe across hosts because, inside a transaction, ``get_key`` and
``get_alias`` read with ``SELECT ... FOR UPDATE``: a second writer of the same key
waits for the first to commit and then reads the committed row, so a rotation and a
ScheduleKeyDeletion (or two rotations) are serialised and neither loses the other's
change. Blind writes that collide end with a KMS error for the loser: a version number,
alias name, grant id or grant token taken → AlreadyExistsException. A deadlock, a
serialization failure or a lock wait past ``LOCK_TIMEOUT_MS`` ends the transaction with
DependencyTimeoutException (503, "retry"); a single write outside a transaction is
retried by the catalog itself first.

Read cache (``get_key``, ``get_alias``, ``grants_for_key``): as in SqliteCatalog, per
process and tagged with a generation number. Every writing transaction sends
``NOTIFY hsmkeys_catalog`` before its COMMIT, so the notification is delivered only if
the change commits. A listener thread per catalog holds its own connection and bumps
the generation on each notification from another instance (a writer bumps its own
at once, after the commit). Entries
also expire after ``CACHE_MAX_AGE_SECONDS``; while the listener is disconnected the
cache is bypassed, and reconnecting flushes it. The generation is read before the
database, so an answer loaded while a change committed is never kept.

Schema migrations are versioned (``MIGRATIONS``) and applied at open under a
transaction-scoped advisory lock, so instances starting at once apply each exactly once.

Timestamps are ``timestamptz`` (microseconds, like the Python datetimes); the session
time zone is UTC. Text columns that are ordered or paged on use ``COLLATE "C"`` so the
order is byte order, as in SQLite, whatever the database's locale.

Errors: AlreadyExistsException, NotFoundException as in SqliteCatalog;
DependencyTimeoutException for a busy database (see above) or an exhausted pool;
KMSInternalException for every other failure (details are logged, not returned; the
DSN's password never is).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

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
    DependencyTimeoutException,
    KMSError,
    KMSInternalException,
    NotFoundException,
)
from hsmkeys.models import (
    KeyState,
    KeyVersionRef,
)

_log = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL = "hsmkeys_catalog"
CACHE_MAX_AGE_SECONDS = 1.0
CACHE_MAX_ENTRIES = 65536
CONNECT_TIMEOUT_SECONDS = 5
POOL_TIMEOUT_SECONDS = 10.0
LOCK_TIMEOUT_MS = 5000
WRITE_RETRIES = 3
LISTEN_POLL_SECONDS = 0.25
#: pg_advisory_xact_lock key taken around migrations ("hsmkeys" in ASCII).
MIGRATION_LOCK_KEY = 0x68736D6B657973
DEFAULT_POOL_SIZE = 4
_MISS = object()

#: Schema migrations, applied in order; migration n (1-based) brings the schema to
#: version n. Append new tuples; never edit a released one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE keys (
            uuid uuid PRIMARY KEY,
            spec text NOT NULL,
            usage text NOT NULL,
            origin text NOT NULL,
            state text NOT NULL,
            description text NOT NULL,
            created_at timestamptz NOT NULL,
            current_version integer NOT NULL CHECK (current_version >= 1),
            rotation_period_days integer,
            next_rotation_at timestamptz,
            deletion_date timestamptz,
            pending_window_days integer,
            policy text,
            valid_to timestamptz,
            expiration_model text,
            material_fingerprint text
        )""",
        "CREATE INDEX keys_by_rotation ON keys (state, next_rotation_at)",
        "CREATE INDEX keys_by_valid_to ON keys (valid_to) WHERE valid_to IS NOT NULL",
        "CREATE INDEX keys_by_deletion ON keys (state, deletion_date)",
        """CREATE TABLE key_versions (
            uuid uuid NOT NULL REFERENCES keys (uuid) ON DELETE CASCADE,
            version integer NOT NULL CHECK (version >= 1),
            created_at timestamptz NOT NULL,
            rotation_type text,
            PRIMARY KEY (uuid, version)
        )""",
        """CREATE TABLE aliases (
            name text COLLATE "C" PRIMARY KEY,
            uuid uuid NOT NULL REFERENCES keys (uuid) ON DELETE CASCADE,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL
        )""",
        "CREATE INDEX aliases_by_key ON aliases (uuid, name)",
        """CREATE TABLE tags (
            uuid uuid NOT NULL REFERENCES keys (uuid) ON DELETE CASCADE,
            tag_key text COLLATE "C" NOT NULL,
            tag_value text NOT NULL,
            PRIMARY KEY (uuid, tag_key)
        )""",
        # constraints: NULL, or {"EncryptionContextEquals": {...}, "EncryptionContextSubset": {...}}
        # with only the members that are set.
        """CREATE TABLE grants (
            grant_id text COLLATE "C" PRIMARY KEY,
            uuid uuid NOT NULL REFERENCES keys (uuid) ON DELETE CASCADE,
            token text NOT NULL UNIQUE,
            name text,
            grantee_principal text NOT NULL,
            retiring_principal text,
            operations text[] NOT NULL,
            constraints jsonb,
            issuing_account text NOT NULL,
            created_at timestamptz NOT NULL
        )""",
        "CREATE INDEX grants_by_key ON grants (uuid, grant_id)",
        "CREATE INDEX grants_by_name ON grants (uuid, name)",
        "CREATE INDEX grants_by_retiring_principal ON grants (retiring_principal, grant_id)",
        """CREATE TABLE audit_checkpoints (
            log_id text PRIMARY KEY,
            seq bigint NOT NULL CHECK (seq >= 0),
            chain_hash text NOT NULL,
            mac text NOT NULL,
            file_name text NOT NULL,
            time timestamptz NOT NULL
        )""",
    ),
    (
        # AWS managed keys, and key usage: lifetimes outlive purged keys (key-month billing),
        # counts are per hour, key ('' for none), operation and caller account.
        "ALTER TABLE keys ADD COLUMN key_manager text NOT NULL DEFAULT 'CUSTOMER'",
        """CREATE TABLE key_lifetimes (
            uuid uuid PRIMARY KEY,
            key_manager text NOT NULL,
            created_at timestamptz NOT NULL,
            deleted_at timestamptz,
            tags jsonb,
            aliases jsonb
        )""",
        "INSERT INTO key_lifetimes (uuid, key_manager, created_at) SELECT uuid, key_manager, created_at FROM keys",
        """CREATE TABLE usage_counts (
            hour timestamptz NOT NULL,
            uuid text COLLATE "C" NOT NULL,
            operation text COLLATE "C" NOT NULL,
            account text COLLATE "C" NOT NULL,
            count bigint NOT NULL CHECK (count >= 0),
            PRIMARY KEY (hour, uuid, operation, account)
        )""",
        """CREATE TABLE key_last_use (
            uuid uuid PRIMARY KEY REFERENCES keys (uuid) ON DELETE CASCADE,
            operation text NOT NULL,
            time timestamptz NOT NULL,
            request_id text NOT NULL
        )""",
        """CREATE TABLE usage_tracking (
            id integer PRIMARY KEY CHECK (id = 1),
            started_at timestamptz NOT NULL
        )""",
        "INSERT INTO usage_tracking (id, started_at) VALUES (1, now())",
    ),
    (
        # Reliability: AES-GCM encryptions reserved per version (blocks, never given back),
        # when doctor first saw each orphan object, and the resource each retried
        # non-idempotent request made (by the SDK's invocation id).
        "ALTER TABLE key_versions ADD COLUMN encryptions_reserved bigint NOT NULL DEFAULT 0",
        """CREATE TABLE doctor_sightings (
            name text PRIMARY KEY,
            first_seen timestamptz NOT NULL
        )""",
        """CREATE TABLE request_results (
            principal text NOT NULL,
            invocation_id text NOT NULL,
            operation text NOT NULL,
            resource text NOT NULL,
            created_at timestamptz NOT NULL,
            PRIMARY KEY (principal, invocation_id, operation)
        )""",
        "CREATE INDEX request_results_by_age ON request_results (created_at)",
    ),
    (
        # Maintenance runs on one host at a time: whoever holds this lease (a row with an
        # expiry, not a session lock, which a frozen holder would keep forever).
        """CREATE TABLE maintenance_lease (
            id integer PRIMARY KEY CHECK (id = 1),
            holder text NOT NULL,
            expires timestamptz NOT NULL
        )""",
        "INSERT INTO maintenance_lease (id, holder, expires) VALUES (1, '', '-infinity')",
    ),
    (
        # Objects being made for keys whose rows are not committed yet (CreateKey): the
        # sweeper may remove one left by a crash without touching other deployments' keys.
        """CREATE TABLE pending_objects (
            label text PRIMARY KEY,
            since timestamptz NOT NULL
        )""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_KEY_COLUMNS = rows.KEY_COLUMNS
_GET_KEY = f"SELECT {_KEY_COLUMNS} FROM keys WHERE uuid = %s"
_INSERT_KEY = f"INSERT INTO keys ({_KEY_COLUMNS}) VALUES ({', '.join(['%s'] * 17)})"
_UPDATE_KEY = (
    "UPDATE keys SET spec = %s, usage = %s, origin = %s, state = %s, description = %s, "
    "created_at = %s, current_version = %s, rotation_period_days = %s, next_rotation_at = %s, "
    "deletion_date = %s, pending_window_days = %s, policy = %s, valid_to = %s, "
    "expiration_model = %s, material_fingerprint = %s, key_manager = %s WHERE uuid = %s"
)
_MATERIAL_EXPIRED = (
    f"SELECT {_KEY_COLUMNS} FROM keys WHERE valid_to IS NOT NULL AND valid_to <= %s AND state <> %s "
    "ORDER BY valid_to, uuid"
)
_DUE_ROTATION = (
    f"SELECT {_KEY_COLUMNS} FROM keys WHERE state = %s AND next_rotation_at IS NOT NULL "
    "AND next_rotation_at <= %s ORDER BY next_rotation_at, uuid"
)
_DUE_PURGE = (
    f"SELECT {_KEY_COLUMNS} FROM keys WHERE (state = %s AND deletion_date <= %s) OR state = %s "
    "ORDER BY deletion_date NULLS FIRST, uuid"
)
_VERSION_COLUMNS = rows.VERSION_COLUMNS
_ALIAS_COLUMNS = rows.ALIAS_COLUMNS
_GRANT_COLUMNS = rows.GRANT_COLUMNS
_SELECT_GRANTS = f"SELECT {_GRANT_COLUMNS} FROM grants"
_CHECKPOINT_COLUMNS = rows.CHECKPOINT_COLUMNS

_SPECS = rows.SPECS
_USAGES = rows.USAGES
_ORIGINS = rows.ORIGINS
_STATES = rows.STATES
_ROTATION_TYPES = rows.ROTATION_TYPES
_KEY_MANAGERS = rows.KEY_MANAGERS

#: SQLSTATEs that mean "another transaction got in the way: try again".
_BUSY = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected, pg_errors.LockNotAvailable)


def _aware(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise KMSInternalException("catalog timestamps must be timezone-aware")
    return when


def _same(value: Any) -> Any:
    return value


_CODEC = rows.RowCodec(
    uuid_in=_same,  # psycopg reads uuid, timestamptz and jsonb as Python values
    uuid_out=_same,
    time_in=_same,
    time_out=_aware,
    json_in=_same,
    json_out=Jsonb,
    list_in=_same,
    list_out=_same,
)
_key_from_row = _CODEC.key
_key_values = _CODEC.key_values
_version_from_row = _CODEC.version
_alias_from_row = _CODEC.alias
_grant_values = _CODEC.grant_values
_grant_from_row = _CODEC.grant
_checkpoint_from_row = _CODEC.checkpoint


def _internal(operation: str, exc: BaseException) -> KMSInternalException:
    _log.error("catalog_error backend=postgresql operation=%s error=%r", operation, exc)
    return KMSInternalException("The catalog failed; see the server log.")


def _mapped(operation: str, exc: BaseException, *, exists: str = "", missing: str = "") -> KMSError:
    """The KMS error a database failure means to the caller."""
    if isinstance(exc, pg_errors.UniqueViolation) and exists:
        return AlreadyExistsException(exists)
    if isinstance(exc, pg_errors.ForeignKeyViolation) and missing:
        return NotFoundException(missing)
    if isinstance(exc, (*_BUSY, PoolTimeout)):
        _log.warning("catalog_busy backend=postgresql operation=%s error=%r", operation, exc)
        return DependencyTimeoutException("The catalog is busy; retry the request.")
    return _internal(operation, exc)


def redacted(dsn: str) -> str:
    """``dsn`` without its password, for logs and messages."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable dsn>"
    params.pop("password", None)
    return make_conninfo("", **{k: v for k, v in params.items() if v is not None})


@dataclass
class _Tx:
    """The calling thread's open transaction: its connection and whether it wrote."""

    conn: psycopg.Connection[Any]
    dirty: bool = False


class PostgresCatalog:
    """The Catalog protocol over one PostgreSQL database (see the module docstring).

    ``dsn`` is a libpq URL or key=value string; ``password`` (if given) is added to it
    without ever being logged. ``pool_size`` bounds the connections this instance opens
    for queries; the cache listener holds one more.
    """

    def __init__(
        self,
        dsn: str,
        *,
        password: str | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        application_name: str = "hsmkeys",
    ) -> None:
        if pool_size < 1:
            raise KMSInternalException("pool_size must be at least 1")
        extra: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
        if password is not None:
            extra["password"] = password
        try:
            self._conninfo = make_conninfo(dsn, **extra)
        except psycopg.ProgrammingError:
            raise KMSInternalException(f"catalog: not a PostgreSQL DSN: {redacted(dsn)}") from None
        self._target = redacted(dsn)
        self._application_name = application_name
        self._local = threading.local()
        self._instance_id = uuid.uuid4().hex  # the payload of this catalog's notifications
        self._cache_lock = threading.Lock()
        # uuid -> KeyRecord | None, ("alias", name) -> AliasRecord | None,
        # ("grants", uuid) -> tuple[GrantRecord, ...]
        self._cache: dict[object, Any] = {}
        self._generation = 0
        self._cache_generation = -1
        self._cache_expires = 0.0
        self._listening = False
        self._listener_ready = threading.Event()
        self._closing = threading.Event()
        self._closed = False

        self._migrate()
        self._pool = ConnectionPool(
            self._conninfo,
            kwargs={"autocommit": True, "application_name": application_name},
            configure=self._configure,
            min_size=1,
            max_size=pool_size,
            timeout=POOL_TIMEOUT_SECONDS,
            name="hsmkeys-catalog",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_SECONDS + 1)
        except PoolTimeout as exc:
            self._pool.close()
            raise _internal("open", exc) from exc
        self._listener = threading.Thread(
            target=self._listen, name="hsmkeys-catalog-listener", daemon=True
        )
        self._listener.start()
        # The cache is bypassed until the listener is up; waiting makes it useful at once.
        self._listener_ready.wait(CONNECT_TIMEOUT_SECONDS)

    # ------------------------------------------------------------- setup

    def _connect(self, role: str) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            self._conninfo, autocommit=True, application_name=f"{self._application_name}-{role}"
        )
        try:
            self._configure(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SET TIME ZONE 'UTC'")
        conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, once, whoever else is opening it now."""
        try:
            with self._connect("migrate") as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
                current = 0 if row is None else int(row[0])
                if current > SCHEMA_VERSION:
                    raise RuntimeError(f"schema version {current} is newer than {SCHEMA_VERSION}")
                for number, statements in enumerate(MIGRATIONS[current:], start=current + 1):
                    for statement in statements:
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (number,))
                    _log.info("catalog_migrated backend=postgresql version=%d", number)
        except (psycopg.Error, RuntimeError) as exc:
            _log.error("catalog_open_failed target=%s", self._target)
            raise _internal("migrate", exc) from exc

    @property
    def schema_version(self) -> int:
        """The newest migration applied to the database (SCHEMA_VERSION once opened)."""
        row = self._fetch("schema_version", "SELECT max(version) FROM schema_migrations", ())
        return int(row[0][0])

    @property
    def listening(self) -> bool:
        """Whether the cache listener is connected (the cache is bypassed while it is not)."""
        return self._listening

    # ------------------------------------------------------------- cache listener

    def _listen(self) -> None:
        delay = 0.05
        while not self._closing.is_set():
            try:
                conn = self._connect("listener")
            except psycopg.Error as exc:
                _log.warning("catalog_listener_connect_failed error=%r", exc)
                self._closing.wait(delay)
                delay = min(delay * 2, 2.0)
                continue
            try:
                conn.execute(f"LISTEN {CHANNEL}")
                with self._cache_lock:
                    # Changes may have been missed while disconnected: start afresh.
                    self._generation += 1
                    self._listening = True
                self._listener_ready.set()
                delay = 0.05
                while not self._closing.is_set():
                    for notify in conn.notifies(timeout=LISTEN_POLL_SECONDS):
                        if notify.payload != self._instance_id:  # its own: invalidated at commit
                            self._invalidate()
            except psycopg.Error as exc:
                if not self._closing.is_set():
                    _log.warning("catalog_listener_lost error=%r", exc)
            finally:
                with self._cache_lock:
                    self._listening = False
                    self._generation += 1
                conn.close()

    def _invalidate(self) -> None:
        with self._cache_lock:
            self._generation += 1

    def _cached(self, key: object, load: Callable[[], T]) -> T:
        """``load()``, answered from the per-process cache while no change was announced.

        Inside a transaction the database is read directly and nothing is cached.
        """
        if getattr(self._local, "tx", None) is not None:
            return load()
        with self._cache_lock:
            generation = self._generation  # before the database: see the module docstring
            usable = self._listening
            now = time.monotonic()
            if (
                generation != self._cache_generation
                or now >= self._cache_expires
                or len(self._cache) >= CACHE_MAX_ENTRIES
            ):
                self._cache.clear()
                self._cache_generation = generation
                self._cache_expires = now + CACHE_MAX_AGE_SECONDS
            found = self._cache.get(key, _MISS) if usable else _MISS
        if found is not _MISS:
            return cast(T, found)
        loaded = load()
        with self._cache_lock:
            if self._listening and self._generation == generation == self._cache_generation:
                self._cache[key] = loaded
        return loaded

    # ------------------------------------------------------------- transactions

    def _tx(self) -> _Tx | None:
        tx: _Tx | None = getattr(self._local, "tx", None)
        return tx

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One database transaction for this thread; nested use is a SAVEPOINT.

        Raises DependencyTimeoutException if no connection is free in time or the
        database aborts the transaction as a deadlock or serialization failure,
        KMSInternalException for other database failures.
        """
        outer = self._tx()
        if outer is not None:
            try:
                with outer.conn.transaction():
                    yield
            except psycopg.Error as exc:
                raise _mapped("savepoint", exc) from exc
            return
        tx: _Tx | None = None
        try:
            with self._pool.connection() as conn:
                tx = _Tx(conn)
                self._local.tx = tx
                try:
                    with conn.transaction():
                        yield
                        if tx.dirty:  # inside the transaction: delivered only on commit
                            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self._instance_id))
                finally:
                    self._local.tx = None
        except (psycopg.Error, PoolTimeout) as exc:
            raise _mapped("transaction", exc) from exc
        if tx is not None and tx.dirty:
            self._invalidate()  # this process sees its own write at once

    def _write(
        self,
        operation: str,
        body: Callable[[psycopg.Connection[Any]], T],
        *,
        exists: str = "",
        missing: str = "",
        announce: bool = True,
    ) -> T:
        """Run ``body`` as a write: in a savepoint of the open transaction, else in a
        transaction of its own, retried when the database says it collided.

        ``announce=False``: the write touches no cached table, so it sends no NOTIFY."""
        tx = self._tx()
        if tx is not None:
            try:
                with tx.conn.transaction():
                    result = body(tx.conn)
            except psycopg.Error as exc:
                raise _mapped(operation, exc, exists=exists, missing=missing) from exc
            tx.dirty = tx.dirty or announce
            return result
        for attempt in range(WRITE_RETRIES):
            try:
                with self.transaction():
                    inner = self._tx()
                    assert inner is not None
                    inner.dirty = announce
                    try:
                        return body(inner.conn)
                    except psycopg.Error as exc:
                        if isinstance(exc, _BUSY) and attempt + 1 < WRITE_RETRIES:
                            raise _Retry from exc
                        raise _mapped(operation, exc, exists=exists, missing=missing) from exc
            except _Retry:
                time.sleep(0.005 * (attempt + 1))
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _fetch(self, operation: str, sql: str, params: tuple[object, ...] | list[object]) -> list[Any]:
        tx = self._tx()
        try:
            if tx is not None:
                return tx.conn.execute(sql, params).fetchall()
            with self._pool.connection() as conn:
                return conn.execute(sql, params).fetchall()
        except (psycopg.Error, PoolTimeout) as exc:
            raise _mapped(operation, exc) from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._listener.join(LISTEN_POLL_SECONDS * 4 + CONNECT_TIMEOUT_SECONDS)
        self._pool.close()

    # ------------------------------------------------------------- keys

    def insert_key(self, key: KeyRecord, first_version: VersionRecord) -> None:
        """Raises AlreadyExistsException if the UUID is taken."""
        if first_version.key_uuid != key.key_uuid:
            raise KMSInternalException("first_version belongs to another key")

        def body(conn: psycopg.Connection[Any]) -> None:
            conn.execute(_INSERT_KEY, (key.key_uuid, *_key_values(key)))
            self._insert_version(conn, first_version)
            conn.execute(
                "INSERT INTO key_lifetimes (uuid, key_manager, created_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (uuid) DO NOTHING",
                (key.key_uuid, key.key_manager.value, _aware(key.created_at)),
            )

        self._write("insert_key", body, exists=f"Key '{key.key_uuid}' already exists.")

    def get_key(self, key_uuid: uuid.UUID) -> KeyRecord | None:
        """The key's row. Inside a transaction the row is locked (FOR UPDATE) until it ends."""
        return self._cached(key_uuid, lambda: self._load_key(key_uuid))

    def _load_key(self, key_uuid: uuid.UUID) -> KeyRecord | None:
        locking = " FOR UPDATE" if self._tx() is not None else ""
        rows = self._fetch("get_key", _GET_KEY + locking, (key_uuid,))
        return self._keys(rows, "get_key")[0] if rows else None

    def update_key(self, key: KeyRecord) -> None:
        """Raises NotFoundException if no row has ``key.key_uuid``."""

        def body(conn: psycopg.Connection[Any]) -> int:
            return conn.execute(_UPDATE_KEY, (*_key_values(key), key.key_uuid)).rowcount

        if self._write("update_key", body) == 0:
            raise NotFoundException(f"Key '{key.key_uuid}' does not exist.")

    def delete_key(self, key_uuid: uuid.UUID) -> None:
        def body(conn: psycopg.Connection[Any]) -> None:
            # Close the key's lifetime (billing) with what it was labelled by, then delete:
            # ON DELETE CASCADE removes its versions, aliases, tags, grants and last use.
            conn.execute(
                "UPDATE key_lifetimes AS l SET deleted_at = coalesce(k.deletion_date, now()), "
                "tags = (SELECT coalesce(jsonb_object_agg(tag_key, tag_value), '{}'::jsonb) "
                "FROM tags WHERE uuid = k.uuid), "
                "aliases = (SELECT coalesce(jsonb_agg(name ORDER BY name), '[]'::jsonb) "
                "FROM aliases WHERE uuid = k.uuid) "
                "FROM keys AS k WHERE k.uuid = %s AND l.uuid = k.uuid",
                (key_uuid,),
            )
            conn.execute("DELETE FROM keys WHERE uuid = %s", (key_uuid,))

        self._write("delete_key", body)

    def list_keys(
        self, *, limit: int, after: uuid.UUID | None = None, exclude_purging: bool = False
    ) -> list[KeyRecord]:
        """Keys ordered by UUID, after ``after``, at most ``limit``; ``exclude_purging``
        leaves Purging keys out in SQL, so a page is short only at the end."""
        where: list[str] = []
        params: list[object] = []
        if after is not None:
            where.append("uuid > %s")
            params.append(after)
        if exclude_purging:
            where.append("state <> %s")
            params.append(KeyState.PURGING.value)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        params.append(max(limit, 0))
        sql = f"SELECT {_KEY_COLUMNS} FROM keys{clause} ORDER BY uuid LIMIT %s"
        return self._keys(self._fetch("list_keys", sql, params), "list_keys")

    def count_keys(self) -> int:
        return int(self._fetch("count_keys", "SELECT count(*) FROM keys", ())[0][0])

    def keys_due_rotation(self, now: datetime) -> list[KeyRecord]:
        """Enabled keys whose next_rotation_at is set and <= now, soonest first."""
        rows = self._fetch("keys_due_rotation", _DUE_ROTATION, (KeyState.ENABLED.value, _aware(now)))
        return self._keys(rows, "keys_due_rotation")

    def keys_material_expired(self, now: datetime) -> list[KeyRecord]:
        """Keys with imported material whose valid_to <= now (not PendingImport already)."""
        params = (_aware(now), KeyState.PENDING_IMPORT.value)
        rows = self._fetch("keys_material_expired", _MATERIAL_EXPIRED, params)
        return self._keys(rows, "keys_material_expired")

    def keys_due_purge(self, now: datetime) -> list[KeyRecord]:
        """PendingDeletion keys whose deletion_date <= now, and every Purging key."""
        params = (KeyState.PENDING_DELETION.value, _aware(now), KeyState.PURGING.value)
        return self._keys(self._fetch("keys_due_purge", _DUE_PURGE, params), "keys_due_purge")

    @staticmethod
    def _keys(rows: list[Any], operation: str) -> list[KeyRecord]:
        try:
            return [_key_from_row(row) for row in rows]
        except (KeyError, ValueError, TypeError) as exc:
            raise _internal(operation, exc) from exc

    # ------------------------------------------------------------- versions

    @staticmethod
    def _insert_version(conn: psycopg.Connection[Any], version: VersionRecord) -> None:
        conn.execute(
            f"INSERT INTO key_versions ({_VERSION_COLUMNS}) VALUES (%s, %s, %s, %s)",
            (
                version.key_uuid,
                version.version,
                _aware(version.created_at),
                None if version.rotation_type is None else version.rotation_type.value,
            ),
        )

    def add_version(self, version: VersionRecord) -> None:
        """Record a new version and make it current, atomically.

        Raises NotFoundException if the key is missing, AlreadyExistsException if the
        version number is taken (the loser of two concurrent rotations).
        """

        def body(conn: psycopg.Connection[Any]) -> None:
            self._insert_version(conn, version)
            conn.execute(
                "UPDATE keys SET current_version = %s WHERE uuid = %s",
                (version.version, version.key_uuid),
            )

        self._write(
            "add_version",
            body,
            exists=f"Key '{version.key_uuid}' already has version {version.version}.",
            missing=f"Key '{version.key_uuid}' does not exist.",
        )

    def list_versions(self, key_uuid: uuid.UUID) -> list[VersionRecord]:
        rows = self._fetch(
            "list_versions",
            f"SELECT {_VERSION_COLUMNS} FROM key_versions WHERE uuid = %s ORDER BY version",
            (key_uuid,),
        )
        try:
            return [_version_from_row(row) for row in rows]
        except (KeyError, ValueError, TypeError) as exc:
            raise _internal("list_versions", exc) from exc

    def all_version_refs(self) -> set[KeyVersionRef]:
        rows = self._fetch("all_version_refs", "SELECT uuid, version FROM key_versions", ())
        return {KeyVersionRef(row[0], row[1]) for row in rows}

    def reserve_encryptions(self, ref: KeyVersionRef, count: int, limit: int) -> int:
        """Reserve up to ``count`` more encryptions of a version, never past ``limit`` in
        total; how many were granted (0: the version is spent). The version's row is
        locked while it is read and raised, so hosts never hand out the same block.
        NotFoundException for an unknown version."""

        def body(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(
                "SELECT encryptions_reserved FROM key_versions WHERE uuid = %s AND version = %s FOR UPDATE",
                (ref.key_uuid, ref.version),
            ).fetchone()
            if row is None:
                raise NotFoundException(f"Key version {ref.label} does not exist.")
            granted = max(0, min(count, limit - int(row[0])))
            if granted:
                conn.execute(
                    "UPDATE key_versions SET encryptions_reserved = encryptions_reserved + %s "
                    "WHERE uuid = %s AND version = %s",
                    (granted, ref.key_uuid, ref.version),
                )
            return granted

        return self._write("reserve_encryptions", body, announce=False)

    def encryptions_reserved(self, ref: KeyVersionRef) -> int:
        rows = self._fetch(
            "encryptions_reserved",
            "SELECT encryptions_reserved FROM key_versions WHERE uuid = %s AND version = %s",
            (ref.key_uuid, ref.version),
        )
        return int(rows[0][0]) if rows else 0

    # ------------------------------------------------------------- doctor

    def record_sightings(self, names: Iterable[str], now: datetime) -> dict[str, datetime]:
        """When each named orphan was first seen (``now`` for new ones); names no longer
        given are forgotten. One transaction."""
        wanted = set(names)

        def body(conn: psycopg.Connection[Any]) -> dict[str, datetime]:
            conn.execute("LOCK TABLE doctor_sightings IN SHARE ROW EXCLUSIVE MODE")  # one doctor at a time
            stored: dict[str, datetime] = {
                row[0]: row[1] for row in conn.execute("SELECT name, first_seen FROM doctor_sightings")
            }
            gone = [name for name in stored if name not in wanted]
            if gone:
                conn.execute("DELETE FROM doctor_sightings WHERE name = ANY(%s)", (gone,))
            with conn.cursor() as cur:
                new = [(name, _aware(now)) for name in wanted if name not in stored]
                if new:
                    cur.executemany("INSERT INTO doctor_sightings (name, first_seen) VALUES (%s, %s)", new)
            return {name: stored.get(name, now) for name in wanted}

        return self._write("record_sightings", body, announce=False)

    # ------------------------------------------------------------- pending HSM objects

    def add_pending_object(self, label: str, since: datetime) -> None:
        self._write(
            "add_pending_object",
            lambda conn: conn.execute(
                "INSERT INTO pending_objects (label, since) VALUES (%s, %s) ON CONFLICT (label) DO NOTHING",
                (label, _aware(since)),
            ),
            announce=False,
        )

    def remove_pending_object(self, label: str) -> None:
        self._write(
            "remove_pending_object",
            lambda conn: conn.execute("DELETE FROM pending_objects WHERE label = %s", (label,)),
            announce=False,
        )

    def pending_objects(self) -> dict[str, datetime]:
        rows = self._fetch("pending_objects", "SELECT label, since FROM pending_objects", ())
        return {row[0]: row[1] for row in rows}

    # ------------------------------------------------------------- request results

    def remember_request(
        self, principal: str, invocation_id: str, operation: str, resource: str, now: datetime
    ) -> None:
        """Record what a request made (inside the caller's transaction, with the effect);
        rows older than a day are dropped. AlreadyExistsException if already recorded."""

        def body(conn: psycopg.Connection[Any]) -> None:
            conn.execute("DELETE FROM request_results WHERE created_at < %s", (_aware(now) - timedelta(days=1),))
            conn.execute(
                "INSERT INTO request_results (principal, invocation_id, operation, resource, created_at) "
                "VALUES (%s, %s, %s, %s, %s)",
                (principal, invocation_id, operation, resource, _aware(now)),
            )

        self._write("remember_request", body, exists="The request was already done.", announce=False)

    def recall_request(self, principal: str, invocation_id: str, operation: str) -> str | None:
        """The resource an earlier attempt of this request made, if it committed."""
        rows = self._fetch(
            "recall_request",
            "SELECT resource FROM request_results WHERE principal = %s AND invocation_id = %s "
            "AND operation = %s",
            (principal, invocation_id, operation),
        )
        return str(rows[0][0]) if rows else None

    # ------------------------------------------------------------- maintenance lease

    def take_maintenance_lease(self, holder: str, seconds: float) -> bool:
        """Take or renew the lease (see Catalog). One UPDATE: a second contender waits for
        the first's row lock, then re-checks the condition against the committed row."""
        rows = self._write(
            "take_maintenance_lease",
            lambda conn: conn.execute(
                "UPDATE maintenance_lease SET holder = %s, "
                "expires = clock_timestamp() + make_interval(secs => %s) "
                "WHERE id = 1 AND (expires < clock_timestamp() OR holder = %s)",
                (holder, float(seconds), holder),
            ).rowcount,
            announce=False,
        )
        return rows == 1

    def release_maintenance_lease(self, holder: str) -> None:
        self._write(
            "release_maintenance_lease",
            lambda conn: conn.execute(
                "UPDATE maintenance_lease SET expires = '-infinity' WHERE id = 1 AND holder = %s",
                (holder,),
            ),
            announce=False,
        )

    # ------------------------------------------------------------- aliases

    def insert_alias(self, alias: AliasRecord) -> None:
        """Raises AlreadyExistsException if the name is taken, NotFoundException if the key is missing."""
        self._write(
            "insert_alias",
            lambda conn: conn.execute(
                f"INSERT INTO aliases ({_ALIAS_COLUMNS}) VALUES (%s, %s, %s, %s)",
                (alias.name, alias.key_uuid, _aware(alias.created_at), _aware(alias.updated_at)),
            ),
            exists=f"Alias '{alias.name}' already exists.",
            missing=f"Key '{alias.key_uuid}' does not exist.",
        )

    def get_alias(self, name: str) -> AliasRecord | None:
        """The alias. Inside a transaction its row is locked (FOR UPDATE) until it ends."""
        return self._cached(("alias", name), lambda: self._load_alias(name))

    def _load_alias(self, name: str) -> AliasRecord | None:
        locking = " FOR UPDATE" if self._tx() is not None else ""
        rows = self._fetch(
            "get_alias", f"SELECT {_ALIAS_COLUMNS} FROM aliases WHERE name = %s{locking}", (name,)
        )
        return _alias_from_row(rows[0]) if rows else None

    def update_alias(self, alias: AliasRecord) -> None:
        """Point an alias at another key. Raises NotFoundException if the alias or key is missing."""

        def body(conn: psycopg.Connection[Any]) -> int:
            return conn.execute(
                "UPDATE aliases SET uuid = %s, created_at = %s, updated_at = %s WHERE name = %s",
                (alias.key_uuid, _aware(alias.created_at), _aware(alias.updated_at), alias.name),
            ).rowcount

        changed = self._write(
            "update_alias", body, missing=f"Key '{alias.key_uuid}' does not exist."
        )
        if changed == 0:
            raise NotFoundException(f"Alias '{alias.name}' does not exist.")

    def delete_alias(self, name: str) -> None:
        """Raises NotFoundException if the alias does not exist (as KMS DeleteAlias does)."""
        deleted = self._write(
            "delete_alias",
            lambda conn: conn.execute("DELETE FROM aliases WHERE name = %s", (name,)).rowcount,
        )
        if deleted == 0:
            raise NotFoundException(f"Alias '{name}' does not exist.")

    def list_aliases(
        self, *, limit: int, after: str | None = None, key_uuid: uuid.UUID | None = None
    ) -> list[AliasRecord]:
        """Aliases ordered by name (byte order), after ``after``, optionally only one key's."""
        where, params = "name > %s", list[object]([after or ""])
        if key_uuid is not None:
            where, params = "uuid = %s AND name > %s", [key_uuid, after or ""]
        rows = self._fetch(
            "list_aliases",
            f"SELECT {_ALIAS_COLUMNS} FROM aliases WHERE {where} ORDER BY name LIMIT %s",
            [*params, max(limit, 0)],
        )
        return [_alias_from_row(row) for row in rows]

    def count_aliases(self, key_uuid: uuid.UUID) -> int:
        rows = self._fetch("count_aliases", "SELECT count(*) FROM aliases WHERE uuid = %s", (key_uuid,))
        return int(rows[0][0])

    # ------------------------------------------------------------- tags

    def put_tags(self, key_uuid: uuid.UUID, tags: Mapping[str, str]) -> None:
        """Add or overwrite tags. Raises NotFoundException if the key is missing."""
        rows = [(key_uuid, k, v) for k, v in tags.items()]
        if not rows:
            return

        def body(conn: psycopg.Connection[Any]) -> None:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO tags (uuid, tag_key, tag_value) VALUES (%s, %s, %s) "
                    "ON CONFLICT (uuid, tag_key) DO UPDATE SET tag_value = excluded.tag_value",
                    rows,
                )

        self._write("put_tags", body, missing=f"Key '{key_uuid}' does not exist.")

    def delete_tags(self, key_uuid: uuid.UUID, tag_keys: Iterable[str]) -> None:
        """Remove the named tags; names that are not set are ignored."""
        names = list(tag_keys)
        if not names:
            return
        self._write(
            "delete_tags",
            lambda conn: conn.execute(
                "DELETE FROM tags WHERE uuid = %s AND tag_key = ANY(%s)", (key_uuid, names)
            ),
        )

    def get_tags(self, key_uuid: uuid.UUID) -> dict[str, str]:
        """The key's tags ordered by tag key (empty for an unknown key)."""
        rows = self._fetch(
            "get_tags",
            "SELECT tag_key, tag_value FROM tags WHERE uuid = %s ORDER BY tag_key",
            (key_uuid,),
        )
        return {row[0]: row[1] for row in rows}

    # ------------------------------------------------------------- grants

    def insert_grant(self, grant: GrantRecord) -> None:
        """Raises NotFoundException if the key is missing, AlreadyExistsException if the
        grant id or token is taken."""
        self._write(
            "insert_grant",
            lambda conn: conn.execute(
                f"INSERT INTO grants ({_GRANT_COLUMNS}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                _grant_values(grant),
            ),
            exists=f"Grant '{grant.grant_id}' or its token already exists.",
            missing=f"Key '{grant.key_uuid}' does not exist.",
        )

    def _grants(self, operation: str, clause: str, params: tuple[object, ...] | list[object]) -> list[GrantRecord]:
        """Grants matching ``WHERE clause`` (which may end in ORDER BY / LIMIT)."""
        rows = self._fetch(operation, f"{_SELECT_GRANTS} WHERE {clause}", params)
        try:
            return [_grant_from_row(row) for row in rows]
        except (ValueError, TypeError) as exc:
            raise _internal(operation, exc) from exc

    def get_grant(self, key_uuid: uuid.UUID, grant_id: str) -> GrantRecord | None:
        found = self._grants("get_grant", "grant_id = %s AND uuid = %s", (grant_id, key_uuid))
        return found[0] if found else None

    def get_grant_by_token(self, token: str) -> GrantRecord | None:
        found = self._grants("get_grant_by_token", "token = %s", (token,))
        return found[0] if found else None

    def find_grant_by_name(self, key_uuid: uuid.UUID, name: str) -> list[GrantRecord]:
        """Every grant of the key with that name, ordered by grant_id."""
        return self._grants(
            "find_grant_by_name", "uuid = %s AND name = %s ORDER BY grant_id", (key_uuid, name)
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
        where = "uuid = %s AND grant_id > %s"
        params: list[object] = [key_uuid, after or ""]
        if grant_id is not None:
            where += " AND grant_id = %s"
            params.append(grant_id)
        if grantee_principal is not None:
            where += " AND grantee_principal = %s"
            params.append(grantee_principal)
        params.append(max(limit, 0))
        return self._grants("list_grants", f"{where} ORDER BY grant_id LIMIT %s", params)

    def grants_for_key(self, key_uuid: uuid.UUID) -> tuple[GrantRecord, ...]:
        """Every grant of the key ordered by grant_id (empty for an unknown key), cached."""
        return self._cached(
            ("grants", key_uuid),
            lambda: tuple(self._grants("grants_for_key", "uuid = %s ORDER BY grant_id", (key_uuid,))),
        )

    def list_retirable_grants(
        self, retiring_principal: str, *, limit: int, after: str | None = None
    ) -> list[GrantRecord]:
        return self._grants(
            "list_retirable_grants",
            "retiring_principal = %s AND grant_id > %s ORDER BY grant_id LIMIT %s",
            (retiring_principal, after or "", max(limit, 0)),
        )

    def delete_grant(self, grant_id: str) -> bool:
        """Remove one grant; False when it did not exist."""
        deleted = self._write(
            "delete_grant",
            lambda conn: conn.execute("DELETE FROM grants WHERE grant_id = %s", (grant_id,)).rowcount,
        )
        return deleted > 0

    # ------------------------------------------------------------- audit checkpoints

    def get_audit_checkpoint(self, log_id: str) -> AuditCheckpoint | None:
        rows = self._fetch(
            "get_audit_checkpoint",
            f"SELECT {_CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE log_id = %s",
            (log_id,),
        )
        return _checkpoint_from_row(rows[0]) if rows else None

    def list_audit_checkpoint_ids(self) -> list[str]:
        """Every chain with a stored checkpoint (its log id), ordered."""
        rows = self._fetch(
            "list_audit_checkpoint_ids", "SELECT log_id FROM audit_checkpoints ORDER BY log_id", ()
        )
        return [row[0] for row in rows]

    def put_audit_checkpoint(self, checkpoint: AuditCheckpoint) -> None:
        """Store the newest checkpoint of a chain, replacing the previous one."""
        self._write(
            "put_audit_checkpoint",
            lambda conn: conn.execute(
                f"INSERT INTO audit_checkpoints ({_CHECKPOINT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (log_id) DO UPDATE SET seq = excluded.seq, "
                "chain_hash = excluded.chain_hash, mac = excluded.mac, "
                "file_name = excluded.file_name, time = excluded.time",
                (
                    checkpoint.log_id,
                    checkpoint.sequence,
                    checkpoint.chain_hash,
                    checkpoint.mac,
                    checkpoint.file_name,
                    _aware(checkpoint.time),
                ),
            ),
        )

    # ------------------------------------------------------------- key usage

    def add_usage(self, counts: Iterable[UsageCount], last_uses: Mapping[uuid.UUID, KeyLastUse]) -> None:
        """Add counts and keep each key's newer last use, in one transaction. The usage
        tables are never cached, so this sends no NOTIFY (caches stay warm)."""
        count_rows = [
            (_aware(c.hour), "" if c.key_uuid is None else str(c.key_uuid), c.operation, c.account, c.count)
            for c in counts
        ]
        use_rows = [(k, u.operation, _aware(u.time), u.request_id, k) for k, u in last_uses.items()]
        if not (count_rows or use_rows):
            return

        def body(conn: psycopg.Connection[Any]) -> None:
            with conn.cursor() as cur:
                if count_rows:
                    cur.executemany(
                        "INSERT INTO usage_counts (hour, uuid, operation, account, count) "
                        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (hour, uuid, operation, account) "
                        "DO UPDATE SET count = usage_counts.count + excluded.count",
                        count_rows,
                    )
                if use_rows:
                    # Only keys that still exist (a purged key has no last use); the newer use wins.
                    cur.executemany(
                        "INSERT INTO key_last_use (uuid, operation, time, request_id) "
                        "SELECT %s, %s, %s, %s WHERE EXISTS (SELECT 1 FROM keys WHERE uuid = %s) "
                        "ON CONFLICT (uuid) DO UPDATE SET operation = excluded.operation, "
                        "time = excluded.time, request_id = excluded.request_id "
                        "WHERE excluded.time >= key_last_use.time",
                        use_rows,
                    )

        self._write("add_usage", body, announce=False)

    def get_key_last_use(self, key_uuid: uuid.UUID) -> KeyLastUse | None:
        rows = self._fetch(
            "get_key_last_use",
            "SELECT operation, time, request_id FROM key_last_use WHERE uuid = %s",
            (key_uuid,),
        )
        return KeyLastUse(rows[0][0], rows[0][1], rows[0][2]) if rows else None

    def usage_tracking_start(self) -> datetime:
        rows = self._fetch("usage_tracking_start", "SELECT started_at FROM usage_tracking WHERE id = 1", ())
        started: datetime = rows[0][0]
        return started

    def list_usage(self, since: datetime, until: datetime) -> list[UsageCount]:
        rows = self._fetch(
            "list_usage",
            "SELECT hour, uuid, operation, account, count FROM usage_counts "
            "WHERE hour >= %s AND hour < %s ORDER BY hour, uuid, operation, account",
            (_aware(since), _aware(until)),
        )
        return [UsageCount(uuid.UUID(r[1]) if r[1] else None, r[2], r[3], r[0], r[4]) for r in rows]

    def list_key_lifetimes(self, since: datetime, until: datetime) -> list[KeyLifetime]:
        """Keys that existed in [since, until), ordered by UUID; a live key with its
        current tags and aliases, a purged one with those it had when purged."""
        rows = self._fetch(
            "list_key_lifetimes",
            "SELECT l.uuid, l.key_manager, l.created_at, l.deleted_at, "
            "CASE WHEN l.deleted_at IS NULL THEN (SELECT coalesce(jsonb_object_agg(tag_key, tag_value), "
            "'{}'::jsonb) FROM tags WHERE uuid = l.uuid) ELSE coalesce(l.tags, '{}'::jsonb) END, "
            "CASE WHEN l.deleted_at IS NULL THEN (SELECT coalesce(jsonb_agg(name ORDER BY name), "
            "'[]'::jsonb) FROM aliases WHERE uuid = l.uuid) ELSE coalesce(l.aliases, '[]'::jsonb) END "
            "FROM key_lifetimes AS l WHERE l.created_at < %s AND (l.deleted_at IS NULL OR l.deleted_at > %s) "
            "ORDER BY l.uuid",
            (_aware(until), _aware(since)),
        )
        try:
            return [
                KeyLifetime(r[0], _KEY_MANAGERS[r[1]], r[2], r[3], dict(sorted(r[4].items())), tuple(r[5]))
                for r in rows
            ]
        except (KeyError, AttributeError, TypeError) as exc:
            raise _internal("list_key_lifetimes", exc) from exc

    # ------------------------------------------------------------- migrate-catalog support

    def is_empty(self) -> bool:
        """Whether no table holds a row (migrate-catalog copies only into an empty catalog)."""
        rows = self._fetch(
            "is_empty",
            "SELECT NOT (EXISTS (SELECT 1 FROM keys) OR EXISTS (SELECT 1 FROM aliases) "
            "OR EXISTS (SELECT 1 FROM grants) OR EXISTS (SELECT 1 FROM audit_checkpoints))",
            (),
        )
        return bool(rows[0][0])

    def lock_for_import(self) -> None:
        """Inside a transaction: keep other writers out of every table until it ends."""
        if self._tx() is None:
            raise KMSInternalException("lock_for_import needs a transaction")
        self._write(
            "lock_for_import",
            lambda conn: conn.execute(
                "LOCK TABLE keys, key_versions, aliases, tags, grants, audit_checkpoints "
                "IN EXCLUSIVE MODE"
            ),
        )


class _Retry(Exception):
    """Internal: the write collided with another transaction and is run again."""
