"""``hsmkeys migrate-catalog``: copy a SQLite catalog into an empty PostgreSQL one.

Everything is copied through the Catalog protocol (keys with their policies and
imported-material fields, versions, aliases, tags, grants) plus the audit
checkpoints, in ONE target transaction that first locks every table and refuses a
target holding any row. Before it commits, the copy is verified: the row counts and a
SHA-256 over a canonical rendering of every record, computed the same way on both
sides, must match, else nothing is committed.

Stop every writer of the source first: the source is read as it is, not snapshotted.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from hsmkeys.catalog.base import Catalog, GrantRecord, KeyRecord
from hsmkeys.catalog.postgres import PostgresCatalog, redacted
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.errors import KMSInternalException, KMSInvalidStateException, ValidationException

PAGE = 1000


@dataclass(frozen=True, slots=True)
class CatalogSummary:
    """Row counts per table and the SHA-256 (hex) of every record, in a fixed order."""

    keys: int
    versions: int
    aliases: int
    tags: int
    grants: int
    checkpoints: int
    digest: str


def _plain(value: Any) -> Any:
    """``value`` as JSON-able data that is equal for equal records of either backend."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if hasattr(value, "items"):  # dict or the read-only mappings of grants
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return value


def _all_keys(catalog: Catalog) -> Iterator[KeyRecord]:
    after: uuid.UUID | None = None
    while True:
        page = catalog.list_keys(limit=PAGE, after=after)
        yield from page
        if len(page) < PAGE:
            return
        after = page[-1].key_uuid


def _all_grants(catalog: Catalog, key_uuid: uuid.UUID) -> Iterator[GrantRecord]:
    after: str | None = None
    while True:
        page = catalog.list_grants(key_uuid, limit=PAGE, after=after)
        yield from page
        if len(page) < PAGE:
            return
        after = page[-1].grant_id


def _all_aliases(catalog: Catalog) -> Iterator[Any]:
    after: str | None = None
    while True:
        page = catalog.list_aliases(limit=PAGE, after=after)
        yield from page
        if len(page) < PAGE:
            return
        after = page[-1].name


def summarize(catalog: Catalog, checkpoint_ids: list[str]) -> CatalogSummary:
    """Counts and digest of everything ``migrate`` copies."""
    digest = hashlib.sha256()
    counts = dict.fromkeys(("keys", "versions", "aliases", "tags", "grants", "checkpoints"), 0)

    def add(kind: str, record: Any) -> None:
        counts[kind] += 1
        line = json.dumps([kind, _plain(record)], sort_keys=True, separators=(",", ":"))
        digest.update(line.encode("utf-8") + b"\n")

    for key in _all_keys(catalog):
        add("keys", key)
        for version in catalog.list_versions(key.key_uuid):
            add("versions", version)
        for tag in catalog.get_tags(key.key_uuid).items():
            add("tags", tag)
        for grant in _all_grants(catalog, key.key_uuid):
            add("grants", grant)
    for alias in _all_aliases(catalog):
        add("aliases", alias)
    for log_id in sorted(checkpoint_ids):
        checkpoint = catalog.get_audit_checkpoint(log_id)
        if checkpoint is not None:
            add("checkpoints", checkpoint)
    return CatalogSummary(digest=digest.hexdigest(), **counts)


def sqlite_checkpoint_ids(path: Path) -> list[str]:
    """The chains with a checkpoint in a SQLite catalog file (read-only)."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return [row[0] for row in conn.execute("SELECT log_id FROM audit_checkpoints ORDER BY log_id")]
    except sqlite3.Error as exc:
        raise KMSInternalException(f"cannot read the checkpoints of {path}: {exc}") from exc
    finally:
        conn.close()


def copy_catalog(source: SqliteCatalog, checkpoint_ids: list[str], target: PostgresCatalog) -> CatalogSummary:
    """Copy ``source`` into the empty ``target`` and verify it, in one target transaction.

    Raises KMSInvalidStateException if the target holds any row, KMSInternalException
    if the verification fails (nothing is committed then).
    """
    with target.transaction():
        target.lock_for_import()
        if not target.is_empty():
            raise KMSInvalidStateException("The target catalog is not empty; migrate only into a new database.")
        for key in _all_keys(source):
            versions = source.list_versions(key.key_uuid)
            if not versions:
                raise KMSInternalException(f"Key '{key.key_uuid}' has no version in the source.")
            target.insert_key(key, versions[0])
            for version in versions[1:]:
                target.add_version(version)  # moves current_version; update_key restores it
            for version in versions:  # AES-GCM use counts: a reset would allow IV reuse
                spent = source.encryptions_reserved(version.ref)
                if spent:
                    target.reserve_encryptions(version.ref, spent, spent)
            target.update_key(key)
            tags = source.get_tags(key.key_uuid)
            if tags:
                target.put_tags(key.key_uuid, tags)
            for grant in _all_grants(source, key.key_uuid):
                target.insert_grant(grant)
        for alias in _all_aliases(source):
            target.insert_alias(alias)
        for log_id in checkpoint_ids:
            checkpoint = source.get_audit_checkpoint(log_id)
            if checkpoint is not None:
                target.put_audit_checkpoint(checkpoint)
        expected = summarize(source, checkpoint_ids)
        copied = summarize(target, target.list_audit_checkpoint_ids())
        if copied != expected:
            raise KMSInternalException(
                f"The copy does not match its source (source {expected}, copy {copied}); nothing was committed."
            )
    return copied


def migrate_catalog(source: str, target: str, *, password: str | None = None) -> CatalogSummary:
    """``migrate-catalog --from sqlite:PATH --to postgresql://...``; see the module docstring.

    Raises ValidationException for a malformed or missing source or a target that is
    not a postgresql:// URL.
    """
    if not source.startswith("sqlite:"):
        raise ValidationException("--from must be sqlite:PATH")
    path = Path(source.removeprefix("sqlite:")).expanduser()
    if not path.is_file():
        raise ValidationException(f"--from: no SQLite catalog at {path}")
    if not target.startswith(("postgresql://", "postgres://")):
        raise ValidationException(f"--to must be a postgresql:// URL, got {redacted(target)}")
    reader = SqliteCatalog(path)  # opening brings an older file to the current schema
    try:
        checkpoint_ids = sqlite_checkpoint_ids(path)
        writer = PostgresCatalog(target, password=password, pool_size=1)
        try:
            return copy_catalog(reader, checkpoint_ids, writer)
        finally:
            writer.close()
    finally:
        reader.close()
