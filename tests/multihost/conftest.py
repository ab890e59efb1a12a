"""Fixtures of the multi-host suite: catalogs of both backends opened as separate hosts
would open them (PostgreSQL: ``pg_dsn`` from tests/conftest.py, a database per test)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hsmkeys.catalog.base import Catalog
from hsmkeys.catalog.postgres import PostgresCatalog
from hsmkeys.catalog.sqlite import SqliteCatalog

OpenCatalog = Callable[[], Catalog]


@pytest.fixture(params=["sqlite", "postgresql"])
def open_catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenCatalog]:
    """Opens another catalog object on one store: a second process (SQLite) or host
    (PostgreSQL), each with its own connections."""
    opened: list[Catalog] = []
    dsn = str(request.getfixturevalue("pg_dsn")) if request.param == "postgresql" else ""

    def open_one() -> Catalog:
        catalog: Catalog = PostgresCatalog(dsn, pool_size=2) if dsn else SqliteCatalog(tmp_path / "catalog.db")
        opened.append(catalog)
        return catalog

    yield open_one
    for catalog in opened:
        catalog.close()
