"""The catalog: key state, versions, aliases and tags. The contract is in ``base``.

``sqlite`` is the embedded default; ``postgres`` (the ``postgres`` extra: psycopg and
psycopg-pool) serves several hosts from one database. ``open_catalog`` picks one from
the settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hsmkeys.catalog.base import AliasRecord, Catalog, KeyRecord, VersionRecord
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.errors import ConfigError

if TYPE_CHECKING:
    from hsmkeys.config import Settings

__all__ = ["AliasRecord", "Catalog", "KeyRecord", "SqliteCatalog", "VersionRecord", "open_catalog"]


def open_catalog(settings: Settings) -> Catalog:
    """The catalog the settings name: PostgreSQL for a ``postgresql://`` URL, else SQLite.

    Raises ConfigError if the URL needs the ``postgres`` extra and it is not installed,
    or the password file cannot be read; the catalog's own errors otherwise.
    """
    if settings.catalog_url is None:
        return SqliteCatalog(settings.catalog)
    try:
        from hsmkeys.catalog.postgres import PostgresCatalog
    except ImportError as exc:
        raise ConfigError(
            f"catalog: a postgresql:// catalog needs psycopg and psycopg-pool "
            f"(pip install 'hsmkeys[postgres]'): {exc}"
        ) from None
    catalog = PostgresCatalog(settings.catalog_url, password=settings.catalog_password())
    # This host's own files (maintenance lock, default TLS pair) go beside settings.catalog.
    settings.catalog.parent.mkdir(parents=True, exist_ok=True)
    return catalog
