"""The per-process read cache of SqliteCatalog (keys, aliases, grants): a commit in one catalog is
seen at once by every other."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from test_catalog_grants import grant
from test_catalog_sqlite import T0, add, alias

from hsmkeys.catalog import VersionRecord
from hsmkeys.catalog import sqlite as catalog_sqlite
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.models import KeyState


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[SqliteCatalog, SqliteCatalog]]:
    """Two catalogs on one file: each has its own connection, cache and counter mapping,
    exactly as two server workers do."""
    path = tmp_path / "catalog.db"
    a, b = SqliteCatalog(path), SqliteCatalog(path)
    yield a, b
    a.close()
    b.close()


def test_state_change_in_one_catalog_is_seen_at_once_by_another(
    pair: tuple[SqliteCatalog, SqliteCatalog],
) -> None:
    a, b = pair
    key = add(a)
    assert b.get_key(key.key_uuid) == key  # now cached in b
    a.update_key(replace(key, state=KeyState.DISABLED))
    got = b.get_key(key.key_uuid)
    assert got is not None and got.state is KeyState.DISABLED


def test_a_missing_key_is_not_remembered_after_another_catalog_creates_it(
    pair: tuple[SqliteCatalog, SqliteCatalog],
) -> None:
    a, b = pair
    key_uuid = uuid.uuid4()
    assert b.get_key(key_uuid) is None
    key = add(a, key_uuid=key_uuid)
    assert b.get_key(key_uuid) == key


def test_alias_retarget_and_delete_are_seen_at_once(
    pair: tuple[SqliteCatalog, SqliteCatalog],
) -> None:
    a, b = pair
    first, second = add(a), add(a)
    a.insert_alias(alias("alias/app", first))
    assert b.get_alias("alias/app") is not None
    a.update_alias(replace(alias("alias/app", second), updated_at=T0 + timedelta(days=1)))
    got = b.get_alias("alias/app")
    assert got is not None and got.key_uuid == second.key_uuid
    a.delete_alias("alias/app")
    assert b.get_alias("alias/app") is None


def test_rotation_is_seen_at_once(pair: tuple[SqliteCatalog, SqliteCatalog]) -> None:
    a, b = pair
    key = add(a)
    assert b.get_key(key.key_uuid) == key
    a.add_version(VersionRecord(key.key_uuid, 2, T0))
    got = b.get_key(key.key_uuid)
    assert got is not None and got.current_version == 2


def test_cached_answer_does_not_query_the_database(
    pair: tuple[SqliteCatalog, SqliteCatalog],
) -> None:
    a, _ = pair
    key = add(a)
    a.get_key(key.key_uuid)
    statements: list[str] = []
    a._conn.set_trace_callback(statements.append)
    assert a.get_key(key.key_uuid) == key
    assert statements == []


def test_reads_inside_a_transaction_bypass_the_cache(
    pair: tuple[SqliteCatalog, SqliteCatalog],
) -> None:
    a, _ = pair
    key = add(a)
    a.get_key(key.key_uuid)
    with a.transaction():
        a.update_key(replace(key, description="changed"))
        got = a.get_key(key.key_uuid)
        assert got is not None and got.description == "changed"
    got = a.get_key(key.key_uuid)
    assert got is not None and got.description == "changed"


def test_rolled_back_change_is_never_served(pair: tuple[SqliteCatalog, SqliteCatalog]) -> None:
    a, b = pair
    key = add(a)
    with pytest.raises(RuntimeError), a.transaction():
        a.update_key(replace(key, description="lost"))
        raise RuntimeError("abort")
    assert a.get_key(key.key_uuid) == key
    assert b.get_key(key.key_uuid) == key


def test_writer_outside_sqlitecatalog_is_seen_after_the_maximum_age(
    pair: tuple[SqliteCatalog, SqliteCatalog], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = pair
    key = add(a)
    a.get_key(key.key_uuid)
    raw = sqlite3.connect(a._conn.execute("PRAGMA database_list").fetchone()[2])
    raw.execute("UPDATE keys SET description = 'by hand'")
    raw.commit()
    raw.close()
    assert a.get_key(key.key_uuid) == key  # not bumped: still the cached answer
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + catalog_sqlite.CACHE_MAX_AGE_SECONDS + 1)
    got = a.get_key(key.key_uuid)
    assert got is not None and got.description == "by hand"


def _disable_in_child(path: str, key_uuid: str) -> None:
    cat = SqliteCatalog(path)
    key = cat.get_key(uuid.UUID(key_uuid))
    assert key is not None
    cat.update_key(replace(key, state=KeyState.DISABLED))
    cat.close()


def test_change_made_by_another_process_is_seen_at_once(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    cat = SqliteCatalog(path)
    key = add(cat)
    assert cat.get_key(key.key_uuid) == key
    child = multiprocessing.get_context("spawn").Process(
        target=_disable_in_child, args=(str(path), str(key.key_uuid))
    )
    child.start()
    child.join(60)
    assert child.exitcode == 0
    got = cat.get_key(key.key_uuid)
    assert got is not None and got.state is KeyState.DISABLED
    cat.close()


def test_grant_created_or_deleted_by_another_catalog_is_seen_at_once(
    pair: tuple[SqliteCatalog, SqliteCatalog],
) -> None:
    a, b = pair
    key = add(a)
    assert b.grants_for_key(key.key_uuid) == ()  # the empty answer is now cached in b
    record = grant(key)
    a.insert_grant(record)
    assert b.grants_for_key(key.key_uuid) == (record,)
    a.delete_grant(record.grant_id)
    assert b.grants_for_key(key.key_uuid) == ()


def test_key_deletion_by_another_catalog_drops_its_cached_grants(
    pair: tuple[SqliteCatalog, SqliteCatalog],
) -> None:
    a, b = pair
    key = add(a)
    a.insert_grant(grant(key))
    assert len(b.grants_for_key(key.key_uuid)) == 1
    a.delete_key(key.key_uuid)
    assert b.grants_for_key(key.key_uuid) == ()


def test_grant_written_outside_sqlitecatalog_is_seen_after_the_maximum_age(
    pair: tuple[SqliteCatalog, SqliteCatalog], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = pair
    key = add(a)
    record = grant(key)
    a.insert_grant(record)
    assert a.grants_for_key(key.key_uuid) == (record,)
    raw = sqlite3.connect(a._conn.execute("PRAGMA database_list").fetchone()[2])
    raw.execute("DELETE FROM grants")
    raw.commit()
    raw.close()
    assert a.grants_for_key(key.key_uuid) == (record,)  # not bumped: still the cached answer
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + catalog_sqlite.CACHE_MAX_AGE_SECONDS + 1)
    assert a.grants_for_key(key.key_uuid) == ()


def _grant_in_child(path: str, key_uuid: str, grant_id: str) -> None:
    cat = SqliteCatalog(path)
    key = cat.get_key(uuid.UUID(key_uuid))
    assert key is not None
    cat.insert_grant(replace(grant(key), grant_id=grant_id))
    cat.close()


def test_grant_made_by_another_process_is_seen_at_once(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    cat = SqliteCatalog(path)
    key = add(cat)
    assert cat.grants_for_key(key.key_uuid) == ()
    grant_id = "a" * 64
    child = multiprocessing.get_context("spawn").Process(
        target=_grant_in_child, args=(str(path), str(key.key_uuid), grant_id)
    )
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert [g.grant_id for g in cat.grants_for_key(key.key_uuid)] == [grant_id]
    cat.close()
