"""SqliteCatalog grants and audit checkpoints, and the migration that added them."""

from __future__ import annotations

import dataclasses
import secrets
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_catalog_sqlite import T0, add, alias, make_key

from hsmkeys.catalog import SqliteCatalog
from hsmkeys.catalog import sqlite as catalog_sqlite
from hsmkeys.catalog.base import AuditCheckpoint, GrantRecord, KeyRecord
from hsmkeys.errors import AlreadyExistsException, KMSInternalException, NotFoundException
from hsmkeys.models import KeySpec, KeyState, KeyUsage, Origin

ALICE = "arn:aws:iam::111122223333:role/alice"
BOB = "arn:aws:iam::111122223333:role/bob"
RETIRER = "arn:aws:iam::111122223333:role/retirer"


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
        log_id=log_id,
        sequence=41,
        chain_hash="ab" * 32,
        mac="cd" * 32,
        file_name="audit.log",
        time=T0,
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "catalog.db"


@pytest.fixture
def catalog(db_path: Path) -> Iterator[SqliteCatalog]:
    cat = SqliteCatalog(db_path)
    yield cat
    cat.close()


# ------------------------------------------------------------------ grants


def test_insert_grant_then_every_lookup_returns_it(catalog: SqliteCatalog) -> None:
    key = add(catalog)
    record = grant(
        key,
        name="nightly-batch",
        retiring_principal=RETIRER,
        encryption_context_equals={"Department": "IT", "ünï": "✓"},
        encryption_context_subset={"App": "batch"},
    )
    catalog.insert_grant(record)
    assert catalog.get_grant(key.key_uuid, record.grant_id) == record
    assert catalog.get_grant_by_token(record.token) == record
    assert catalog.find_grant_by_name(key.key_uuid, "nightly-batch") == [record]
    assert catalog.list_grants(key.key_uuid, limit=10) == [record]
    assert catalog.grants_for_key(key.key_uuid) == (record,)
    assert catalog.list_retirable_grants(RETIRER, limit=10) == [record]


@pytest.mark.parametrize(
    ("equals", "subset"),
    [(None, None), ({}, None), (None, {}), ({"a": "1"}, None), (None, {"b": "2"}), ({}, {"c": ""})],
)
def test_constraints_round_trip_keeping_absent_apart_from_empty(
    catalog: SqliteCatalog, equals: dict[str, str] | None, subset: dict[str, str] | None
) -> None:
    key = add(catalog)
    record = grant(key, encryption_context_equals=equals, encryption_context_subset=subset)
    catalog.insert_grant(record)
    got = catalog.get_grant(key.key_uuid, record.grant_id)
    assert got is not None
    assert got.encryption_context_equals == equals
    assert got.encryption_context_subset == subset
    assert (got.encryption_context_equals is None) == (equals is None)
    assert (got.encryption_context_subset is None) == (subset is None)


def test_optional_fields_absent_round_trip_as_none(catalog: SqliteCatalog) -> None:
    key = add(catalog)
    record = grant(key, operations=("GenerateDataKey",))
    catalog.insert_grant(record)
    got = catalog.get_grant(key.key_uuid, record.grant_id)
    assert got == record
    assert got is not None and got.name is None and got.retiring_principal is None
    assert got.operations == ("GenerateDataKey",)


def test_grant_on_missing_key_is_not_found(catalog: SqliteCatalog) -> None:
    record = grant(make_key())
    with pytest.raises(NotFoundException):
        catalog.insert_grant(record)
    assert catalog.get_grant_by_token(record.token) is None


def test_grant_token_is_unique_across_keys(catalog: SqliteCatalog) -> None:
    one, two = add(catalog), add(catalog)
    first = grant(one)
    catalog.insert_grant(first)
    with pytest.raises(AlreadyExistsException):
        catalog.insert_grant(grant(two, token=first.token))
    assert catalog.grants_for_key(two.key_uuid) == ()
    assert catalog.get_grant_by_token(first.token) == first


def test_grant_id_is_unique(catalog: SqliteCatalog) -> None:
    one, two = add(catalog), add(catalog)
    first = grant(one)
    catalog.insert_grant(first)
    with pytest.raises(AlreadyExistsException):
        catalog.insert_grant(grant(two, grant_id=first.grant_id))
    assert catalog.grants_for_key(two.key_uuid) == ()


def test_get_grant_of_another_key_is_none(catalog: SqliteCatalog) -> None:
    one, two = add(catalog), add(catalog)
    record = grant(one)
    catalog.insert_grant(record)
    assert catalog.get_grant(two.key_uuid, record.grant_id) is None
    assert catalog.get_grant(one.key_uuid, "0" * 64) is None
    assert catalog.get_grant_by_token("no-such-token") is None


def test_find_grant_by_name_returns_every_grant_of_that_key_with_the_name(
    catalog: SqliteCatalog,
) -> None:
    one, two = add(catalog), add(catalog)
    same = sorted((grant(one, name="app"), grant(one, name="app")), key=lambda g: g.grant_id)
    for record in (*same, grant(one, name="other"), grant(one), grant(two, name="app")):
        catalog.insert_grant(record)
    assert catalog.find_grant_by_name(one.key_uuid, "app") == same
    assert catalog.find_grant_by_name(one.key_uuid, "missing") == []


def test_list_grants_pages_by_grant_id_with_markers(catalog: SqliteCatalog) -> None:
    key, other = add(catalog), add(catalog)
    mine = [grant(key) for _ in range(7)]
    for record in (*mine, grant(other)):
        catalog.insert_grant(record)
    pages: list[list[GrantRecord]] = []
    after: str | None = None
    while page := catalog.list_grants(key.key_uuid, limit=3, after=after):
        pages.append(page)
        after = page[-1].grant_id
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [g for p in pages for g in p] == sorted(mine, key=lambda g: g.grant_id)
    assert catalog.list_grants(key.key_uuid, limit=0) == []


def test_list_grants_filters_by_grant_id_and_grantee(catalog: SqliteCatalog) -> None:
    key, other = add(catalog), add(catalog)
    alices = sorted((grant(key), grant(key)), key=lambda g: g.grant_id)
    bobs = [grant(key, grantee_principal=BOB)]
    elsewhere = grant(other, grantee_principal=BOB)
    for record in (*alices, *bobs, elsewhere):
        catalog.insert_grant(record)
    assert catalog.list_grants(key.key_uuid, limit=10, grantee_principal=ALICE) == alices
    assert catalog.list_grants(key.key_uuid, limit=10, grantee_principal=BOB) == bobs
    assert catalog.list_grants(key.key_uuid, limit=10, grant_id=alices[1].grant_id) == [alices[1]]
    assert catalog.list_grants(key.key_uuid, limit=10, grant_id=elsewhere.grant_id) == []
    both = catalog.list_grants(
        key.key_uuid, limit=10, grant_id=alices[0].grant_id, grantee_principal=BOB
    )
    assert both == []
    paged = catalog.list_grants(
        key.key_uuid, limit=1, after=alices[0].grant_id, grantee_principal=ALICE
    )
    assert paged == [alices[1]]


def test_list_retirable_grants_spans_keys_and_pages(catalog: SqliteCatalog) -> None:
    keys = [add(catalog) for _ in range(3)]
    retirable = [grant(k, retiring_principal=RETIRER) for k in keys for _ in range(2)]
    for record in (*retirable, grant(keys[0], retiring_principal=BOB), grant(keys[1])):
        catalog.insert_grant(record)
    first = catalog.list_retirable_grants(RETIRER, limit=4)
    rest = catalog.list_retirable_grants(RETIRER, limit=4, after=first[-1].grant_id)
    assert [len(first), len(rest)] == [4, 2]
    assert first + rest == sorted(retirable, key=lambda g: g.grant_id)
    assert catalog.list_retirable_grants(RETIRER, limit=4, after=rest[-1].grant_id) == []
    assert catalog.list_retirable_grants("nobody", limit=4) == []


def test_delete_grant_reports_whether_it_existed(catalog: SqliteCatalog) -> None:
    key = add(catalog)
    kept, doomed = grant(key), grant(key)
    catalog.insert_grant(kept)
    catalog.insert_grant(doomed)
    assert catalog.delete_grant(doomed.grant_id) is True
    assert catalog.delete_grant(doomed.grant_id) is False
    assert catalog.get_grant_by_token(doomed.token) is None
    assert catalog.grants_for_key(key.key_uuid) == (kept,)


def test_grants_die_with_their_key(catalog: SqliteCatalog) -> None:
    doomed, kept = add(catalog), add(catalog)
    doomed_grant = grant(doomed, name="n", retiring_principal=RETIRER)
    kept_grant = grant(kept, name="n", retiring_principal=RETIRER)
    catalog.insert_grant(doomed_grant)
    catalog.insert_grant(kept_grant)
    assert len(catalog.grants_for_key(doomed.key_uuid)) == 1  # cached before the delete
    catalog.delete_key(doomed.key_uuid)
    assert catalog.grants_for_key(doomed.key_uuid) == ()
    assert catalog.get_grant_by_token(doomed_grant.token) is None
    assert catalog.find_grant_by_name(doomed.key_uuid, "n") == []
    assert catalog.list_retirable_grants(RETIRER, limit=10) == [kept_grant]
    assert catalog.delete_grant(doomed_grant.grant_id) is False
    # The token of a deleted key's grant is free again (no row is left behind).
    catalog.insert_grant(grant(kept, token=doomed_grant.token))


def test_grants_for_unknown_key_is_empty(catalog: SqliteCatalog) -> None:
    assert catalog.grants_for_key(uuid.uuid4()) == ()


def test_returned_grants_cannot_be_mutated(catalog: SqliteCatalog) -> None:
    key = add(catalog)
    catalog.insert_grant(grant(key, encryption_context_equals={"a": "1"}))
    (cached,) = catalog.grants_for_key(key.key_uuid)
    assert cached.encryption_context_equals is not None
    with pytest.raises(TypeError):
        cached.encryption_context_equals["a"] = "2"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cached.operations = ("Sign",)  # type: ignore[misc]
    assert isinstance(cached.operations, tuple)
    (again,) = catalog.grants_for_key(key.key_uuid)
    assert again.encryption_context_equals == {"a": "1"}


def test_grants_for_key_is_answered_from_the_cache(catalog: SqliteCatalog) -> None:
    key = add(catalog)
    record = grant(key)
    catalog.insert_grant(record)
    catalog.grants_for_key(key.key_uuid)
    statements: list[str] = []
    catalog._conn.set_trace_callback(statements.append)
    assert catalog.grants_for_key(key.key_uuid) == (record,)
    assert statements == []
    catalog._conn.set_trace_callback(None)


def test_grants_for_key_inside_a_transaction_sees_its_own_writes(catalog: SqliteCatalog) -> None:
    key = add(catalog)
    assert catalog.grants_for_key(key.key_uuid) == ()
    record = grant(key)
    with pytest.raises(RuntimeError), catalog.transaction():
        catalog.insert_grant(record)
        assert catalog.grants_for_key(key.key_uuid) == (record,)
        raise RuntimeError("abort")
    assert catalog.grants_for_key(key.key_uuid) == ()


def test_unreadable_grant_row_is_internal_error(db_path: Path, catalog: SqliteCatalog) -> None:
    key = add(catalog)
    record = grant(key)
    catalog.insert_grant(record)
    raw = sqlite3.connect(db_path)
    raw.execute("UPDATE grants SET operations = 'not json'")
    raw.commit()
    raw.close()
    with pytest.raises(KMSInternalException):
        catalog.get_grant(key.key_uuid, record.grant_id)
    with pytest.raises(KMSInternalException):
        catalog.list_grants(key.key_uuid, limit=10)


def test_naive_grant_time_is_refused(catalog: SqliteCatalog) -> None:
    key = add(catalog)
    with pytest.raises(KMSInternalException):
        catalog.insert_grant(grant(key, created_at=T0.replace(tzinfo=None)))
    assert catalog.grants_for_key(key.key_uuid) == ()


# ------------------------------------------------------------------ audit checkpoints


def test_checkpoint_put_then_get_and_replace(catalog: SqliteCatalog) -> None:
    assert catalog.get_audit_checkpoint("/logs/a") is None
    first = checkpoint("/logs/a")
    other = checkpoint("/logs/b", sequence=7, file_name="b.log")
    catalog.put_audit_checkpoint(first)
    catalog.put_audit_checkpoint(other)
    assert catalog.get_audit_checkpoint("/logs/a") == first
    newer = checkpoint(
        "/logs/a",
        sequence=99,
        chain_hash="ef" * 32,
        mac="01" * 32,
        file_name="audit.log.1",
        time=T0 + timedelta(hours=1, microseconds=1),
    )
    catalog.put_audit_checkpoint(newer)
    assert catalog.get_audit_checkpoint("/logs/a") == newer
    assert catalog.get_audit_checkpoint("/logs/b") == other


def test_checkpoint_is_seen_by_another_catalog(db_path: Path, catalog: SqliteCatalog) -> None:
    catalog.put_audit_checkpoint(checkpoint())
    other = SqliteCatalog(db_path)
    assert other.get_audit_checkpoint(checkpoint().log_id) == checkpoint()
    other.close()


def test_checkpoint_with_naive_time_is_refused(catalog: SqliteCatalog) -> None:
    with pytest.raises(KMSInternalException):
        catalog.put_audit_checkpoint(checkpoint(time=T0.replace(tzinfo=None)))
    assert catalog.get_audit_checkpoint(checkpoint().log_id) is None


# ------------------------------------------------------------------ migration


def test_catalog_at_the_first_schema_version_migrates_in_place(db_path: Path) -> None:
    """A file written by the first release (schema 1: no grants, checkpoints or import
    columns) opens with today's code, its rows intact."""
    raw = sqlite3.connect(db_path)
    for statement in catalog_sqlite.MIGRATIONS[0]:
        raw.execute(statement)
    raw.execute("CREATE TABLE schema_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)")
    raw.execute("INSERT INTO schema_version VALUES (1, 1)")
    key = KeyRecord(
        key_uuid=uuid.uuid4(), spec=KeySpec.SYMMETRIC_DEFAULT, usage=KeyUsage.ENCRYPT_DECRYPT,
        origin=Origin.AWS_KMS, state=KeyState.ENABLED, description="from the old schema",
        created_at=T0, current_version=1, policy="{}",
    )
    micros = int((T0 - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1_000_000)
    raw.execute(
        "INSERT INTO keys (uuid, spec, usage, origin, state, description, created_at, current_version, policy) "
        "VALUES (?, 'SYMMETRIC_DEFAULT', 'ENCRYPT_DECRYPT', 'AWS_KMS', 'Enabled', ?, ?, 1, '{}')",
        (str(key.key_uuid), key.description, micros),
    )
    raw.execute("INSERT INTO key_versions VALUES (?, 1, ?, NULL)", (str(key.key_uuid), micros))
    raw.execute("INSERT INTO aliases VALUES ('alias/old', ?, ?, ?)", (str(key.key_uuid), micros, micros))
    raw.execute("INSERT INTO tags VALUES (?, 'team', 'a')", (str(key.key_uuid),))
    raw.commit()
    tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    raw.close()
    assert "grants" not in tables and "audit_checkpoints" not in tables

    new = SqliteCatalog(db_path)
    assert new.schema_version == catalog_sqlite.SCHEMA_VERSION
    assert new.get_key(key.key_uuid) == key
    assert new.get_alias("alias/old") == alias("alias/old", key)
    assert new.get_tags(key.key_uuid) == {"team": "a"}
    record = grant(key)
    new.insert_grant(record)
    new.put_audit_checkpoint(checkpoint())
    assert new.grants_for_key(key.key_uuid) == (record,)
    assert new.get_audit_checkpoint(checkpoint().log_id) == checkpoint()
    new.delete_key(key.key_uuid)  # the cascade holds for a key made before the migration
    assert new.get_grant_by_token(record.token) is None
    new.close()
