"""The catalog: key state, versions, aliases and tags. The contract is in ``base``."""

from hsmkeys.catalog.base import AliasRecord, Catalog, KeyRecord, VersionRecord
from hsmkeys.catalog.sqlite import SqliteCatalog

__all__ = ["AliasRecord", "Catalog", "KeyRecord", "SqliteCatalog", "VersionRecord"]
