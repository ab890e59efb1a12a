"""Concurrent writers on two catalog objects (two SQLite connections, or two PostgreSQL
catalogs as on two hosts): one winner and a KMS error for the loser, never a lost
update or two current versions. The read-modify-write bodies are KeyStore's: read the
key inside ``transaction()``, check its state, write."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from functools import partial

import pytest
from records import T0, OpenCatalog, add_key, alias, grant

from hsmkeys.catalog.base import Catalog, KeyRecord, VersionRecord
from hsmkeys.errors import AlreadyExistsException, KMSError, KMSInvalidStateException
from hsmkeys.models import KeyState, RotationType

# Long enough that, without locking, both writers would read before either writes.
WINDOW = 0.05


def race(*bodies: Callable[[], object]) -> list[object]:
    """Run the bodies at once, one thread each; their results or the KMSError each raised."""
    start = threading.Barrier(len(bodies))
    results: list[object] = [None] * len(bodies)

    def run(i: int, body: Callable[[], object]) -> None:
        start.wait()
        try:
            results[i] = body()
        except KMSError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    return results


def fresh(catalog: Catalog, key: KeyRecord) -> KeyRecord:
    got = catalog.get_key(key.key_uuid)
    assert got is not None
    return got


def test_two_rotations_from_a_stale_read_have_one_winner(open_catalog: OpenCatalog) -> None:
    a, b = open_catalog(), open_catalog()
    for _ in range(5):
        key = add_key(a)
        seen = [fresh(c, key) for c in (a, b)]  # both saw version 1

        def rotate(c: Catalog, k: KeyRecord) -> int:
            c.add_version(VersionRecord(k.key_uuid, k.current_version + 1, T0, RotationType.ON_DEMAND))
            return k.current_version + 1

        results = race(partial(rotate, a, seen[0]), partial(rotate, b, seen[1]))
        assert sorted(type(r).__name__ for r in results) == ["AlreadyExistsException", "int"]
        assert [v.version for v in a.list_versions(key.key_uuid)] == [1, 2]
        assert fresh(a, key).current_version == 2


def test_two_rotations_in_transactions_both_apply_one_after_the_other(open_catalog: OpenCatalog) -> None:
    a, b = open_catalog(), open_catalog()
    key = add_key(a)

    def rotate(c: Catalog) -> int:
        with c.transaction():
            k = fresh(c, key)
            time.sleep(WINDOW)
            c.add_version(VersionRecord(k.key_uuid, k.current_version + 1, T0, RotationType.ON_DEMAND))
            return k.current_version + 1

    assert sorted(race(lambda: rotate(a), lambda: rotate(b))) == [2, 3]  # type: ignore[type-var]
    assert [v.version for v in b.list_versions(key.key_uuid)] == [1, 2, 3]
    assert fresh(b, key).current_version == 3


def test_read_modify_write_in_transactions_loses_no_update(open_catalog: OpenCatalog) -> None:
    catalogs = [open_catalog(), open_catalog()]
    key = add_key(catalogs[0], description="0")
    rounds = 8

    def increment(c: Catalog) -> None:
        for _ in range(rounds):
            with c.transaction():
                k = fresh(c, key)
                time.sleep(0.002)
                c.update_key(dataclasses.replace(k, description=str(int(k.description) + 1)))

    assert race(*(partial(increment, c) for c in catalogs)) == [None, None]
    assert fresh(catalogs[1], key).description == str(rounds * len(catalogs))


@pytest.mark.parametrize("rotation_first", [True, False])
def test_rotate_and_schedule_deletion_never_lose_the_new_version(
    open_catalog: OpenCatalog, rotation_first: bool
) -> None:
    a, b = open_catalog(), open_catalog()
    key = add_key(a)

    def rotate() -> str:
        if not rotation_first:
            time.sleep(WINDOW / 5)
        with a.transaction():
            k = fresh(a, key)
            if k.state is not KeyState.ENABLED:
                raise KMSInvalidStateException("not enabled")
            time.sleep(WINDOW)
            a.add_version(VersionRecord(k.key_uuid, k.current_version + 1, T0, RotationType.ON_DEMAND))
        return "rotated"

    def schedule_deletion() -> str:
        if rotation_first:
            time.sleep(WINDOW / 5)
        with b.transaction():
            k = fresh(b, key)
            if k.state is KeyState.PENDING_DELETION:
                raise KMSInvalidStateException("already pending deletion")
            time.sleep(WINDOW)
            b.update_key(
                dataclasses.replace(
                    k, state=KeyState.PENDING_DELETION, deletion_date=T0 + timedelta(days=7), pending_window_days=7
                )
            )
        return "scheduled"

    rotated, scheduled = race(rotate, schedule_deletion)
    final = fresh(a, key)
    versions = [v.version for v in a.list_versions(key.key_uuid)]
    assert scheduled == "scheduled" and final.state is KeyState.PENDING_DELETION
    assert final.current_version == max(versions)  # never a version newer than "current"
    if rotation_first:
        assert rotated == "rotated" and versions == [1, 2]
    else:
        assert isinstance(rotated, KMSInvalidStateException) and versions == [1]


def test_two_create_alias_of_one_name_have_one_winner(open_catalog: OpenCatalog) -> None:
    a, b = open_catalog(), open_catalog()
    keys = [add_key(a), add_key(a)]

    def create_alias(c: Catalog, k: KeyRecord) -> str:
        with c.transaction():
            fresh(c, k)
            if c.get_alias("alias/shared") is not None:
                raise AlreadyExistsException("seen before insert")
            time.sleep(WINDOW)
            c.insert_alias(alias(k, "alias/shared"))
        return str(k.key_uuid)

    results = race(lambda: create_alias(a, keys[0]), lambda: create_alias(b, keys[1]))
    winners = [r for r in results if isinstance(r, str)]
    assert len(winners) == 1
    assert sum(isinstance(r, AlreadyExistsException) for r in results) == 1
    got = b.get_alias("alias/shared")
    assert got is not None and str(got.key_uuid) == winners[0]


def test_two_grants_with_one_id_cannot_both_exist(open_catalog: OpenCatalog) -> None:
    a, b = open_catalog(), open_catalog()
    key = add_key(a)
    first = grant(key)
    second = grant(key, grant_id=first.grant_id)  # same id, other token
    results = race(lambda: a.insert_grant(first), lambda: b.insert_grant(second))
    assert sum(isinstance(r, AlreadyExistsException) for r in results) == 1
    assert len(a.grants_for_key(key.key_uuid)) == 1


def test_readers_see_a_disable_promptly_and_never_go_back(open_catalog: OpenCatalog) -> None:
    a, b = open_catalog(), open_catalog()
    key = add_key(a)
    stop = threading.Event()
    committed: list[float] = []
    observations: list[list[tuple[float, KeyState]]] = [[], []]

    def read(log: list[tuple[float, KeyState]]) -> None:
        while not stop.is_set():
            log.append((time.monotonic(), fresh(b, key).state))
            time.sleep(0.0005)

    readers = [threading.Thread(target=read, args=(log,)) for log in observations]
    for t in readers:
        t.start()
    time.sleep(0.05)
    a.update_key(dataclasses.replace(key, state=KeyState.DISABLED))
    committed.append(time.monotonic())
    time.sleep(0.2)
    stop.set()
    for t in readers:
        t.join(10)
    for log in observations:
        states = [s for _, s in log]
        assert set(states) <= {KeyState.ENABLED, KeyState.DISABLED}
        first_disabled = states.index(KeyState.DISABLED)
        assert all(s is KeyState.DISABLED for s in states[first_disabled:])  # never back to Enabled
        assert log[first_disabled][0] - committed[0] < 0.1
