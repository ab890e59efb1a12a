"""Fixtures of the catalog contract suite: every test that takes ``catalog`` or
``open_catalog`` runs against SQLite and against PostgreSQL.

One throwaway PostgreSQL server serves the whole session (``pg_server`` in
tests/conftest.py; see tests/pgserver.py); each test gets its own database (``pg_dsn``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from records import OpenCatalog

from hsmkeys.catalog.base import Catalog
from hsmkeys.catalog.postgres import PostgresCatalog
from hsmkeys.catalog.sqlite import SqliteCatalog


@pytest.fixture
def open_pg(pg_dsn: str) -> Iterator[Callable[[], PostgresCatalog]]:
    """Opens PostgresCatalog instances on this test's database, as separate hosts would."""
    opened: list[PostgresCatalog] = []

    def open_one() -> PostgresCatalog:
        cat = PostgresCatalog(pg_dsn, pool_size=4)
        opened.append(cat)
        return cat

    yield open_one
    for cat in opened:
        cat.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_catalog(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[OpenCatalog]:
    """Opens another catalog object on the same store: a second connection/cache, as a
    second worker (SQLite) or host (PostgreSQL) has."""
    if backend == "postgresql":
        open_pg: Callable[[], PostgresCatalog] = request.getfixturevalue("open_pg")
        yield open_pg
        return
    opened: list[SqliteCatalog] = []

    def open_sqlite() -> SqliteCatalog:
        cat = SqliteCatalog(tmp_path / "catalog.db")
        opened.append(cat)
        return cat

    yield open_sqlite
    for cat in opened:
        cat.close()


@pytest.fixture
def catalog(open_catalog: OpenCatalog) -> Catalog:
    return open_catalog()
