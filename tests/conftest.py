"""Fixtures shared by the in-memory suites (tests/unit, tests/cli): a KeyStore on the
in-memory HSM, a SQLite catalog in tmp_path and a fake clock. The SoftHSM2 and server
fixtures come from the hsmkeys pytest plugin (hsmkeys/testing/plugin.py). The PostgreSQL
ones (tests/catalog, tests/multihost): one throwaway server per session (pgserver.py),
a fresh database per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from pgserver import PgServer, running_server

from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.clock import FakeClock
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.keystore import KeyStore

# CI shares 2 cores with SoftHSM2 and server processes: a slow example is not a bug.
settings.register_profile(
    "hsmkeys", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("hsmkeys")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """Started on first use only: suites that never ask for it start no PostgreSQL."""
    with running_server() as server:
        yield server


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database of its own for this test."""
    name = pg_server.create_database()
    yield pg_server.dsn(name)
    pg_server.drop_database(name)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def memory_hsm_backend() -> MemoryHsm:
    return MemoryHsm()


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[SqliteCatalog]:
    cat = SqliteCatalog(tmp_path / "catalog.db")
    yield cat
    cat.close()


@pytest.fixture
def store(memory_hsm_backend: MemoryHsm, catalog: SqliteCatalog, clock: FakeClock) -> KeyStore:
    return KeyStore(hsm=memory_hsm_backend, catalog=catalog, clock=clock)
