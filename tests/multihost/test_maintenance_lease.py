"""The catalog's maintenance lease, and the runner's loop that runs maintenance only
while holding it: of several contenders one wins; a holder that stops renewing (frozen
or killed) loses the lease once it expires, and then learns it lost it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hsmkeys.catalog.base import Catalog
from hsmkeys.catalog.postgres import PostgresCatalog
from hsmkeys.models import MaintenanceReport
from hsmkeys.server import runner
from hsmkeys.server.slowlane import SlowLane

CHILD = Path(__file__).with_name("lease_child.py")
OpenCatalog = Callable[[], Catalog]  # the open_catalog fixture (conftest.py)


def _contend(catalog: Catalog, holder: str, start: threading.Barrier, won: dict[str, bool]) -> None:
    start.wait()
    won[holder] = catalog.take_maintenance_lease(holder, 30)


def test_of_two_contenders_at_once_exactly_one_takes_the_lease(open_catalog: OpenCatalog) -> None:
    first, second = open_catalog(), open_catalog()
    for round_no in range(15):
        start = threading.Barrier(2)
        won: dict[str, bool] = {}
        threads = [
            threading.Thread(target=_contend, args=(cat, f"host-{n}-{round_no}", start, won))
            for n, cat in enumerate((first, second))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(won.values()) == [False, True], won
        winner = next(holder for holder, held in won.items() if held)
        assert first.take_maintenance_lease(winner, 30)  # the winner renews
        for holder in won:
            first.release_maintenance_lease(holder)


def test_a_holder_that_stops_renewing_loses_the_lease_once_it_expires(open_catalog: OpenCatalog) -> None:
    frozen, other = open_catalog(), open_catalog()
    assert frozen.take_maintenance_lease("frozen", 0.6)
    taken_at = time.monotonic()
    assert not other.take_maintenance_lease("other", 30)
    while not other.take_maintenance_lease("other", 30):
        time.sleep(0.02)
    assert time.monotonic() - taken_at >= 0.55
    assert not frozen.take_maintenance_lease("frozen", 0.6)  # it wakes up and learns it lost
    frozen.release_maintenance_lease("frozen")  # not the holder: changes nothing
    assert not frozen.take_maintenance_lease("frozen", 0.6)
    other.release_maintenance_lease("other")
    assert frozen.take_maintenance_lease("frozen", 0.6)  # released: free at once


def _start_holder(dsn: str, holder: str, seconds: float) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, str(CHILD), dsn, holder, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "held"
    return child


def _wait_for_lease(catalog: PostgresCatalog, holder: str, timeout: float) -> float:
    start = time.monotonic()
    while not catalog.take_maintenance_lease(holder, 30):
        assert time.monotonic() - start < timeout, "the lease was never freed"
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_sigstopped_holder_loses_the_lease_and_finds_out_when_resumed(pg_dsn: str) -> None:
    catalog = PostgresCatalog(pg_dsn, pool_size=1)
    child = _start_holder(pg_dsn, "frozen-host", 1.0)
    try:
        time.sleep(1.2)  # it renews meanwhile, so the first lease's expiry has passed
        assert not catalog.take_maintenance_lease("other-host", 30)
        os.kill(child.pid, signal.SIGSTOP)
        waited = _wait_for_lease(catalog, "other-host", timeout=5)
        assert 0.5 <= waited <= 2.0, waited
        os.kill(child.pid, signal.SIGCONT)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "lost"
    finally:
        child.kill()
        child.wait()
        catalog.close()


def test_a_killed_holder_loses_the_lease_once_it_expires(pg_dsn: str) -> None:
    catalog = PostgresCatalog(pg_dsn, pool_size=1)
    child = _start_holder(pg_dsn, "killed-host", 1.0)
    try:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert not catalog.take_maintenance_lease("other-host", 30)  # a row, not a session lock
        waited = _wait_for_lease(catalog, "other-host", timeout=5)
        assert waited <= 2.0, waited
    finally:
        child.kill()
        child.wait()
        catalog.close()


class _Host:
    """The part of a KeyStore the maintenance loop uses, over a real catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.runs = 0

    def run_maintenance(self) -> MaintenanceReport:
        self.runs += 1
        return MaintenanceReport((), ())

    def hold_maintenance_lease(self, holder: str, seconds: float) -> bool:
        return self.catalog.take_maintenance_lease(holder, seconds)

    def release_maintenance_lease(self, holder: str) -> None:
        self.catalog.release_maintenance_lease(holder)

    def use_own_hsm_session(self) -> bool:
        return True  # no HSM here: the lane thread needs no session of its own


async def _loops(hosts: list[_Host], leaders: list[runner._MaintenanceLeader], seconds: float) -> None:
    lanes = [SlowLane(host) for host in hosts]  # type: ignore[arg-type]
    tasks = [
        asyncio.create_task(runner._maintenance_loop(host, 0.02, leader, lane))  # type: ignore[arg-type]
        for host, leader, lane in zip(hosts, leaders, lanes, strict=True)
    ]
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with pytest.raises(asyncio.CancelledError):
            await task
    for lane in lanes:
        lane.close()


def test_maintenance_runs_on_one_of_two_hosts_and_moves_when_it_stops(
    open_catalog: OpenCatalog, tmp_path: Path
) -> None:
    hosts = [_Host(open_catalog()), _Host(open_catalog())]
    # Each host has its own lock file (its own disk): only the lease keeps them apart.
    locks = [runner._MaintenanceLock(tmp_path / f"host{n}.lock") for n in range(2)]
    leaders = [runner._MaintenanceLeader(h, lock, 5.0) for h, lock in zip(hosts, locks, strict=True)]  # type: ignore[arg-type]
    asyncio.run(_loops(hosts, leaders, 0.3))
    runs = sorted(h.runs for h in hosts)
    assert runs[0] == 0 and runs[1] >= 5, runs
    first = next(n for n, h in enumerate(hosts) if h.runs)
    leaders[first].release()  # a clean shutdown gives the lease up at once
    other = 1 - first
    asyncio.run(_loops([hosts[other]], [leaders[other]], 0.2))
    assert hosts[other].runs >= 3
    for leader, lock in zip(leaders, locks, strict=True):
        leader.release()
        lock.release()
