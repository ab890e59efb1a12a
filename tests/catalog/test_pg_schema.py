"""PostgresCatalog's schema migrations, connection settings and selection from the config."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from pgserver import PASSWORD, PASSWORD_ROLE, PgServer
from records import add_key

from hsmkeys.catalog import SqliteCatalog, open_catalog
from hsmkeys.catalog import postgres as catalog_postgres
from hsmkeys.catalog.postgres import PostgresCatalog, redacted
from hsmkeys.config import Settings
from hsmkeys.errors import ConfigError, KMSInternalException

CHILD = Path(__file__).with_name("pg_child.py")
OpenPg = Callable[[], PostgresCatalog]


def _applied(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def test_opening_applies_every_migration_once(open_pg: OpenPg, pg_dsn: str) -> None:
    first = open_pg()
    assert first.schema_version == catalog_postgres.SCHEMA_VERSION
    open_pg()  # a second open finds nothing to do
    assert _applied(pg_dsn) == list(range(1, catalog_postgres.SCHEMA_VERSION + 1))


def test_processes_opening_a_new_database_at_once_migrate_it_exactly_once(pg_dsn: str) -> None:
    start = time.time() + 1.5  # after every child has imported psycopg
    children = [
        subprocess.Popen(
            [sys.executable, str(CHILD), "migrate", pg_dsn, repr(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outcomes = [child.communicate(timeout=60) for child in children]
    assert [c.returncode for c in children] == [0] * 4, [err for _, err in outcomes]
    assert [out.strip() for out, _ in outcomes] == [str(catalog_postgres.SCHEMA_VERSION)] * 4
    assert _applied(pg_dsn) == list(range(1, catalog_postgres.SCHEMA_VERSION + 1))


def test_a_database_with_a_newer_schema_is_refused(open_pg: OpenPg, pg_dsn: str) -> None:
    open_pg()
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (catalog_postgres.SCHEMA_VERSION + 1,))
    with pytest.raises(KMSInternalException):
        PostgresCatalog(pg_dsn)


def test_an_unreachable_server_is_an_internal_error(pg_server: PgServer) -> None:
    with pytest.raises(KMSInternalException):
        PostgresCatalog(f"postgresql://postgres@127.0.0.1:{pg_server.port}/no_such_database")


def test_the_password_reaches_the_server_and_is_needed(pg_server: PgServer, pg_dsn: str) -> None:
    dsn = pg_dsn.replace("postgres@", f"{PASSWORD_ROLE}@")
    with pytest.raises(KMSInternalException):
        PostgresCatalog(dsn)
    catalog = PostgresCatalog(dsn, password=PASSWORD)
    try:
        key = add_key(catalog)
        assert catalog.get_key(key.key_uuid) == key
    finally:
        catalog.close()


def test_redacted_dsn_has_no_password() -> None:
    shown = redacted("postgresql://u:hunter2@db.example:5433/cat?sslmode=require")
    assert "hunter2" not in shown and "db.example" in shown and "5433" in shown


# ------------------------------------------------------------------ selection by the config

_CONFIG = """
hsm: {module: /usr/lib/softhsm/libsofthsm2.so, token_label: t, pin_env: PIN}
catalog: %s
"""


def _settings(tmp_path: Path, catalog: str, extra: str = "", env: dict[str, str] | None = None) -> Settings:
    file = tmp_path / "hsmkeys.yaml"
    file.write_text(_CONFIG % catalog + extra)
    return Settings.load(file, env=env or {})


def test_a_sqlite_path_still_selects_sqlite(tmp_path: Path) -> None:
    settings = _settings(tmp_path, "var/catalog.db")
    assert settings.catalog == tmp_path.resolve() / "var/catalog.db" and settings.catalog_url is None
    catalog = open_catalog(settings)
    try:
        assert isinstance(catalog, SqliteCatalog)
    finally:
        catalog.close()


def test_a_postgresql_url_selects_postgres_with_the_password_from_the_environment(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = pg_dsn.replace("postgres@", f"{PASSWORD_ROLE}@")
    settings = _settings(tmp_path, url)
    assert settings.catalog_url == url
    assert settings.catalog.parent == tmp_path.resolve() / "var"  # host-local files go there
    monkeypatch.setenv("HSMKEYS_CATALOG_PASSWORD", PASSWORD)
    catalog = open_catalog(settings)
    try:
        assert isinstance(catalog, PostgresCatalog) and catalog.count_keys() == 0
    finally:
        catalog.close()


def test_the_password_may_come_from_a_private_file(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HSMKEYS_CATALOG_PASSWORD", raising=False)
    secret = tmp_path / "catalog.password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    url = pg_dsn.replace("postgres@", f"{PASSWORD_ROLE}@")
    settings = _settings(tmp_path, url, f"catalog_password_file: {secret.name}\n")
    assert settings.catalog_password() == PASSWORD
    catalog = open_catalog(settings)
    catalog.close()
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="catalog_password_file"):
        settings.catalog_password()


def test_the_environment_may_name_the_postgresql_catalog(tmp_path: Path) -> None:
    url = "postgresql://hsmkeys@db.internal:5432/kms"
    settings = _settings(tmp_path, "var/catalog.db", env={"HSMKEYS_CATALOG": url})
    assert settings.catalog_url == url


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://hsmkeys:hunter2@db:5432/kms",
        "postgresql://hsmkeys@db:5432/kms?password=hunter2",
    ],
)
def test_a_password_in_the_url_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match="no password") as raised:
        _settings(tmp_path, url)
    assert "hunter2" not in str(raised.value)


def test_a_password_file_for_a_sqlite_catalog_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="catalog_password_file"):
        _settings(tmp_path, "var/catalog.db", "catalog_password_file: pw\n")
