"""SqliteCatalog against the Catalog contract: rows, paging, cascades, due queries, concurrency."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmkeys.catalog import AliasRecord, Catalog, KeyRecord, SqliteCatalog, VersionRecord
from hsmkeys.catalog.sqlite import SCHEMA_VERSION
from hsmkeys.errors import AlreadyExistsException, KMSInternalException, NotFoundException
from hsmkeys.models import KeySpec, KeyState, KeyUsage, KeyVersionRef, Origin, RotationType

T0 = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)


def make_key(key_uuid: uuid.UUID | None = None, **changes: object) -> KeyRecord:
    key = KeyRecord(
        key_uuid=key_uuid or uuid.uuid4(),
        spec=KeySpec.SYMMETRIC_DEFAULT,
        usage=KeyUsage.ENCRYPT_DECRYPT,
        origin=Origin.AWS_KMS,
        state=KeyState.ENABLED,
        description="test key",
        created_at=T0,
        current_version=1,
    )
    return dataclasses.replace(key, **changes)  # type: ignore[arg-type]


def first_version(key: KeyRecord) -> VersionRecord:
    return VersionRecord(key.key_uuid, 1, key.created_at)


def add(catalog: Catalog, **changes: Any) -> KeyRecord:
    key = make_key(**changes)
    catalog.insert_key(key, first_version(key))
    return key


def alias(name: str, key: KeyRecord, when: datetime = T0) -> AliasRecord:
    return AliasRecord(name=name, key_uuid=key.key_uuid, created_at=when, updated_at=when)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "catalog.db"


@pytest.fixture
def catalog(db_path: Path) -> Iterator[SqliteCatalog]:
    cat = SqliteCatalog(db_path)
    yield cat
    cat.close()


# ------------------------------------------------------------------ opening


def test_open_creates_file_and_parent_directories(db_path: Path, catalog: SqliteCatalog) -> None:
    assert db_path.is_file()
    assert catalog.schema_version == SCHEMA_VERSION


def test_memory_catalog_is_usable() -> None:
    cat = SqliteCatalog(":memory:")
    key = add(cat)
    assert cat.get_key(key.key_uuid) == key
    cat.close()


def test_reopening_keeps_data_and_runs_no_migration_twice(db_path: Path) -> None:
    first = SqliteCatalog(db_path)
    key = add(first)
    first.close()
    second = SqliteCatalog(db_path)
    third = SqliteCatalog(db_path)
    assert second.get_key(key.key_uuid) == key
    assert second.schema_version == third.schema_version == SCHEMA_VERSION
    second.close()
    third.close()


def test_file_from_a_newer_schema_is_refused(db_path: Path) -> None:
    SqliteCatalog(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    raw.commit()
    raw.close()
    with pytest.raises(KMSInternalException):
        SqliteCatalog(db_path)


def test_opening_a_directory_is_internal_error(tmp_path: Path) -> None:
    with pytest.raises(KMSInternalException):
        SqliteCatalog(tmp_path)


_CHILD = """
import sys, uuid
from datetime import UTC, datetime
from hsmkeys.catalog import KeyRecord, SqliteCatalog, VersionRecord
from hsmkeys.errors import KMSError
from hsmkeys.models import KeySpec, KeyState, KeyUsage, Origin
print("ready", flush=True)
for line in sys.stdin:
    try:
        cat = SqliteCatalog(line.strip())
        u = uuid.uuid4()
        now = datetime.now(UTC)
        cat.insert_key(
            KeyRecord(u, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT, Origin.AWS_KMS,
                      KeyState.ENABLED, "", now, 1),
            VersionRecord(u, 1, now),
        )
        print("ok", cat.schema_version, flush=True)
        cat.close()
    except KMSError as exc:
        print("failed", repr(exc), repr(exc.__cause__), flush=True)
"""


def test_processes_opening_a_fresh_file_together_all_succeed(tmp_path: Path) -> None:
    workers, rounds = 4, 10
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        for n in range(rounds):
            fresh = tmp_path / f"round{n}" / "catalog.db"
            for child in children:  # all children get the path before any answers
                assert child.stdin is not None
                child.stdin.write(f"{fresh}\n")
                child.stdin.flush()
            answers = [child.stdout.readline().strip() for child in children if child.stdout]
            assert answers == [f"ok {SCHEMA_VERSION}"] * workers, f"round {n}: {answers}"
            cat = SqliteCatalog(fresh)
            assert cat.count_keys() == workers
            cat.close()
    finally:
        for child in children:
            child.communicate(timeout=30)


# ------------------------------------------------------------------ keys


def test_insert_then_get_round_trips_every_field(catalog: SqliteCatalog) -> None:
    plus_two = timezone(timedelta(hours=2))
    key = add(
        catalog,
        spec=KeySpec.RSA_3072,
        usage=KeyUsage.SIGN_VERIFY,
        state=KeyState.PENDING_DELETION,
        description="ünïcode ✓",
        created_at=datetime(2025, 3, 4, 5, 6, 7, 1, tzinfo=plus_two),
        rotation_period_days=90,
        next_rotation_at=T0 + timedelta(days=90),
        deletion_date=T0 + timedelta(days=7, microseconds=999999),
        pending_window_days=7,
        policy='{"Version": "2012-10-17"}',
    )
    got = catalog.get_key(key.key_uuid)
    assert got == key
    assert got is not None and got.created_at.utcoffset() == timedelta(0)


@settings(max_examples=50, deadline=None)
@given(
    when=st.datetimes(
        min_value=datetime(1970, 1, 1),
        max_value=datetime(2300, 1, 1),
        timezones=st.just(UTC),
    ),
    optional=st.none() | st.datetimes(timezones=st.just(UTC)),
)
def test_timestamps_round_trip_exactly(when: datetime, optional: datetime | None) -> None:
    cat = SqliteCatalog(":memory:")
    key = add(cat, created_at=when, next_rotation_at=optional, deletion_date=optional)
    assert cat.get_key(key.key_uuid) == key
    cat.close()


def test_get_missing_key_is_none(catalog: SqliteCatalog) -> None:
    assert catalog.get_key(uuid.uuid4()) is None


def test_insert_existing_uuid_is_already_exists_and_keeps_the_row(catalog: SqliteCatalog) -> None:
    key = add(catalog, description="original")
    with pytest.raises(AlreadyExistsException):
        catalog.insert_key(dataclasses.replace(key, description="other"), first_version(key))
    assert catalog.get_key(key.key_uuid) == key


def test_insert_with_first_version_of_another_key_is_refused(catalog: SqliteCatalog) -> None:
    key = make_key()
    with pytest.raises(KMSInternalException):
        catalog.insert_key(key, VersionRecord(uuid.uuid4(), 1, T0))
    assert catalog.count_keys() == 0


def test_naive_datetime_is_refused(catalog: SqliteCatalog) -> None:
    with pytest.raises(KMSInternalException):
        add(catalog, created_at=datetime(2026, 1, 1))
    assert catalog.count_keys() == 0


def test_update_key_replaces_every_column(catalog: SqliteCatalog) -> None:
    key = add(catalog)
    changed = dataclasses.replace(
        key,
        state=KeyState.DISABLED,
        description="changed",
        current_version=3,
        rotation_period_days=365,
        next_rotation_at=T0 + timedelta(days=365),
        deletion_date=T0,
        pending_window_days=30,
        policy="{}",
    )
    catalog.update_key(changed)
    assert catalog.get_key(key.key_uuid) == changed
    catalog.update_key(key)
    assert catalog.get_key(key.key_uuid) == key


def test_update_missing_key_is_not_found(catalog: SqliteCatalog) -> None:
    with pytest.raises(NotFoundException):
        catalog.update_key(make_key())


def test_list_keys_pages_in_uuid_string_order(catalog: SqliteCatalog) -> None:
    keys = [add(catalog) for _ in range(8)]
    pages: list[list[KeyRecord]] = []
    after: uuid.UUID | None = None
    while page := catalog.list_keys(limit=3, after=after):
        pages.append(page)
        after = page[-1].key_uuid
    assert [len(p) for p in pages] == [3, 3, 2]
    assert [k for p in pages for k in p] == sorted(keys, key=lambda k: str(k.key_uuid))
    assert catalog.count_keys() == 8
    assert catalog.list_keys(limit=0) == []


def test_list_keys_can_leave_out_purging_keys_and_keep_pages_full(catalog: SqliteCatalog) -> None:
    keys = sorted((add(catalog) for _ in range(9)), key=lambda k: str(k.key_uuid))
    purging = {keys[i].key_uuid for i in (0, 1, 4, 8)}
    for key in keys:
        if key.key_uuid in purging:
            catalog.update_key(dataclasses.replace(key, state=KeyState.PURGING))
    visible = [k for k in keys if k.key_uuid not in purging]
    pages: list[list[KeyRecord]] = []
    after: uuid.UUID | None = None
    while page := catalog.list_keys(limit=2, after=after, exclude_purging=True):
        pages.append(page)
        after = page[-1].key_uuid
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [k for p in pages for k in p] == visible
    assert len(catalog.list_keys(limit=100)) == 9  # the default still lists every key


def test_delete_key_cascades_to_versions_aliases_and_tags(catalog: SqliteCatalog) -> None:
    doomed, kept = add(catalog), add(catalog)
    for key in (doomed, kept):
        catalog.add_version(VersionRecord(key.key_uuid, 2, T0, RotationType.ON_DEMAND))
        catalog.insert_alias(alias(f"alias/{key.key_uuid}", key))
        catalog.put_tags(key.key_uuid, {"team": "a"})
    catalog.delete_key(doomed.key_uuid)
    assert catalog.get_key(doomed.key_uuid) is None
    assert catalog.list_versions(doomed.key_uuid) == []
    assert catalog.get_alias(f"alias/{doomed.key_uuid}") is None
    assert catalog.count_aliases(doomed.key_uuid) == 0
    assert catalog.get_tags(doomed.key_uuid) == {}
    assert catalog.all_version_refs() == {KeyVersionRef(kept.key_uuid, v) for v in (1, 2)}
    assert catalog.get_tags(kept.key_uuid) == {"team": "a"}


def test_delete_missing_key_is_not_an_error(catalog: SqliteCatalog) -> None:
    catalog.delete_key(uuid.uuid4())


def test_keys_due_rotation_are_enabled_keys_with_next_rotation_at_or_before_now(
    catalog: SqliteCatalog,
) -> None:
    now = T0 + timedelta(days=365)
    later_due = add(catalog, next_rotation_at=now)
    earlier_due = add(catalog, next_rotation_at=now - timedelta(days=1))
    add(catalog, next_rotation_at=now + timedelta(microseconds=1))
    add(catalog, next_rotation_at=None)
    add(catalog, state=KeyState.DISABLED, next_rotation_at=now - timedelta(days=1))
    add(catalog, state=KeyState.PENDING_DELETION, next_rotation_at=now - timedelta(days=1))
    assert catalog.keys_due_rotation(now) == [earlier_due, later_due]


def test_keys_due_purge_are_pending_deletions_due_and_every_purging_key(
    catalog: SqliteCatalog,
) -> None:
    now = T0 + timedelta(days=30)
    due = add(catalog, state=KeyState.PENDING_DELETION, deletion_date=now, pending_window_days=30)
    add(catalog, state=KeyState.PENDING_DELETION, deletion_date=now + timedelta(seconds=1))
    purging = add(catalog, state=KeyState.PURGING, deletion_date=now + timedelta(days=3))
    add(catalog, state=KeyState.DISABLED, deletion_date=now - timedelta(days=1))
    assert {k.key_uuid for k in catalog.keys_due_purge(now)} == {due.key_uuid, purging.key_uuid}


# ------------------------------------------------------------------ versions


def test_add_version_makes_it_current_and_lists_ascending(catalog: SqliteCatalog) -> None:
    key = add(catalog)
    v2 = VersionRecord(key.key_uuid, 2, T0 + timedelta(days=1), RotationType.AUTOMATIC)
    v3 = VersionRecord(key.key_uuid, 3, T0 + timedelta(days=2), RotationType.ON_DEMAND)
    catalog.add_version(v2)
    catalog.add_version(v3)
    assert catalog.list_versions(key.key_uuid) == [first_version(key), v2, v3]
    stored = catalog.get_key(key.key_uuid)
    assert stored is not None and stored.current_version == 3
    assert [v.ref for v in catalog.list_versions(key.key_uuid)] == [
        KeyVersionRef(key.key_uuid, n) for n in (1, 2, 3)
    ]


def test_add_existing_version_is_already_exists_and_changes_nothing(
    catalog: SqliteCatalog,
) -> None:
    key = add(catalog)
    catalog.add_version(VersionRecord(key.key_uuid, 2, T0))
    with pytest.raises(AlreadyExistsException):
        catalog.add_version(VersionRecord(key.key_uuid, 1, T0))
    stored = catalog.get_key(key.key_uuid)
    assert stored is not None and stored.current_version == 2


def test_add_version_to_missing_key_is_not_found(catalog: SqliteCatalog) -> None:
    with pytest.raises(NotFoundException):
        catalog.add_version(VersionRecord(uuid.uuid4(), 2, T0))
    assert catalog.all_version_refs() == set()


# ------------------------------------------------------------------ aliases


def test_alias_name_is_unique(catalog: SqliteCatalog) -> None:
    one, two = add(catalog), add(catalog)
    catalog.insert_alias(alias("alias/app", one))
    with pytest.raises(AlreadyExistsException):
        catalog.insert_alias(alias("alias/app", two))
    assert catalog.get_alias("alias/app") == alias("alias/app", one)


def test_alias_to_missing_key_is_not_found(catalog: SqliteCatalog) -> None:
    with pytest.raises(NotFoundException):
        catalog.insert_alias(alias("alias/app", make_key()))


def test_update_alias_points_it_at_another_key(catalog: SqliteCatalog) -> None:
    one, two = add(catalog), add(catalog)
    catalog.insert_alias(alias("alias/app", one))
    moved = AliasRecord("alias/app", two.key_uuid, T0, T0 + timedelta(hours=1))
    catalog.update_alias(moved)
    assert catalog.get_alias("alias/app") == moved
    assert (catalog.count_aliases(one.key_uuid), catalog.count_aliases(two.key_uuid)) == (0, 1)


def test_update_missing_alias_or_to_missing_key_is_not_found(catalog: SqliteCatalog) -> None:
    key = add(catalog)
    with pytest.raises(NotFoundException):
        catalog.update_alias(alias("alias/none", key))
    catalog.insert_alias(alias("alias/app", key))
    with pytest.raises(NotFoundException):
        catalog.update_alias(alias("alias/app", make_key()))
    assert catalog.get_alias("alias/app") == alias("alias/app", key)


def test_delete_alias_removes_it_and_missing_alias_is_not_found(catalog: SqliteCatalog) -> None:
    key = add(catalog)
    catalog.insert_alias(alias("alias/app", key))
    catalog.delete_alias("alias/app")
    assert catalog.get_alias("alias/app") is None
    with pytest.raises(NotFoundException):
        catalog.delete_alias("alias/app")


def test_list_aliases_pages_by_name_optionally_for_one_key(catalog: SqliteCatalog) -> None:
    one, two = add(catalog), add(catalog)
    names = ["alias/b", "alias/a", "alias/d", "alias/c", "alias/e"]
    for i, name in enumerate(names):
        catalog.insert_alias(alias(name, one if i % 2 == 0 else two))
    first = catalog.list_aliases(limit=2)
    rest = catalog.list_aliases(limit=10, after=first[-1].name)
    assert [a.name for a in first + rest] == sorted(names)
    mine = catalog.list_aliases(limit=10, key_uuid=one.key_uuid)
    assert [a.name for a in mine] == ["alias/b", "alias/d", "alias/e"]
    assert [
        a.name for a in catalog.list_aliases(limit=1, after="alias/b", key_uuid=one.key_uuid)
    ] == ["alias/d"]
    assert catalog.count_aliases(one.key_uuid) == 3


# ------------------------------------------------------------------ tags


def test_put_tags_adds_and_overwrites(catalog: SqliteCatalog) -> None:
    key = add(catalog)
    catalog.put_tags(key.key_uuid, {"b": "1", "a": "2"})
    catalog.put_tags(key.key_uuid, {"b": "3", "c": ""})
    tags = catalog.get_tags(key.key_uuid)
    assert tags == {"a": "2", "b": "3", "c": ""}
    assert list(tags) == ["a", "b", "c"]


def test_delete_tags_removes_named_tags_and_ignores_absent_ones(catalog: SqliteCatalog) -> None:
    key = add(catalog)
    catalog.put_tags(key.key_uuid, {"a": "1", "b": "2", "c": "3"})
    catalog.delete_tags(key.key_uuid, ["a", "c", "zzz"])
    assert catalog.get_tags(key.key_uuid) == {"b": "2"}


def test_put_tags_on_missing_key_is_not_found(catalog: SqliteCatalog) -> None:
    with pytest.raises(NotFoundException):
        catalog.put_tags(uuid.uuid4(), {"a": "1"})


# ------------------------------------------------------------------ transactions


def test_error_inside_transaction_rolls_back_every_call(catalog: SqliteCatalog) -> None:
    key = make_key()
    with pytest.raises(RuntimeError), catalog.transaction():
        catalog.insert_key(key, first_version(key))
        catalog.put_tags(key.key_uuid, {"a": "1"})
        raise RuntimeError("crash before commit")
    assert catalog.get_key(key.key_uuid) is None
    assert catalog.get_tags(key.key_uuid) == {}


def test_nested_transaction_joins_the_outer_one(catalog: SqliteCatalog) -> None:
    key = make_key()
    with pytest.raises(RuntimeError), catalog.transaction():
        with catalog.transaction():
            catalog.insert_key(key, first_version(key))
        assert catalog.get_key(key.key_uuid) == key
        raise RuntimeError("outer fails after the nested block finished")
    assert catalog.get_key(key.key_uuid) is None


def test_failed_call_inside_transaction_undoes_only_itself(catalog: SqliteCatalog) -> None:
    existing = add(catalog)
    fresh = make_key()
    with catalog.transaction():
        catalog.insert_key(fresh, first_version(fresh))
        with pytest.raises(AlreadyExistsException):
            catalog.insert_key(existing, first_version(existing))
    assert catalog.get_key(fresh.key_uuid) == fresh
    assert catalog.count_keys() == 2


def test_two_catalogs_on_one_file_see_each_others_commits(db_path: Path) -> None:
    worker_a, worker_b = SqliteCatalog(db_path), SqliteCatalog(db_path)
    key = add(worker_a)
    assert worker_b.get_key(key.key_uuid) == key
    disabled = dataclasses.replace(key, state=KeyState.DISABLED)
    worker_b.update_key(disabled)
    assert worker_a.get_key(key.key_uuid) == disabled
    worker_b.add_version(VersionRecord(key.key_uuid, 2, T0))
    stored = worker_a.get_key(key.key_uuid)
    assert stored is not None and stored.current_version == 2
    worker_a.close()
    worker_b.close()


def test_uncommitted_transaction_is_invisible_to_another_catalog(db_path: Path) -> None:
    worker_a, worker_b = SqliteCatalog(db_path), SqliteCatalog(db_path)
    key = make_key()
    with worker_a.transaction():
        worker_a.insert_key(key, first_version(key))
        assert worker_b.get_key(key.key_uuid) is None
    assert worker_b.get_key(key.key_uuid) == key
    worker_a.close()
    worker_b.close()


def test_writer_waits_for_another_catalogs_transaction(db_path: Path) -> None:
    worker_a, worker_b = SqliteCatalog(db_path), SqliteCatalog(db_path)
    first, second = make_key(), make_key()
    errors: list[BaseException] = []

    def write_second() -> None:
        try:
            worker_b.insert_key(second, first_version(second))
        except BaseException as exc:
            errors.append(exc)

    with worker_a.transaction():
        worker_a.insert_key(first, first_version(first))
        thread = threading.Thread(target=write_second)
        thread.start()
    thread.join(timeout=30)
    assert errors == []
    assert worker_a.count_keys() == 2
    worker_a.close()
    worker_b.close()


def test_one_catalog_is_usable_from_many_threads(catalog: SqliteCatalog) -> None:
    keys = [add(catalog) for _ in range(4)]
    errors: list[BaseException] = []

    def hammer(key: KeyRecord) -> None:
        try:
            for i in range(50):
                assert catalog.get_key(key.key_uuid) is not None
                with catalog.transaction():
                    catalog.put_tags(key.key_uuid, {"n": str(i)})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert all(catalog.get_tags(k.key_uuid) == {"n": "49"} for k in keys)


# ------------------------------------------------------------------ errors


def test_use_after_close_is_internal_error(db_path: Path) -> None:
    cat = SqliteCatalog(db_path)
    cat.close()
    with pytest.raises(KMSInternalException):
        cat.get_key(uuid.uuid4())
    with pytest.raises(KMSInternalException):
        cat.put_tags(uuid.uuid4(), {"a": "b"})


def test_unreadable_row_is_internal_error(db_path: Path, catalog: SqliteCatalog) -> None:
    key = add(catalog)
    raw = sqlite3.connect(db_path)
    raw.execute("UPDATE keys SET state = 'Bogus'")
    raw.commit()
    raw.close()
    with pytest.raises(KMSInternalException):
        catalog.get_key(key.key_uuid)
    with pytest.raises(KMSInternalException):
        catalog.list_keys(limit=10)
