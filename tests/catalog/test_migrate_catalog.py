"""``hsmkeys migrate-catalog --from sqlite:PATH --to postgresql://...``: a verified copy
into an empty PostgreSQL catalog, refused for a non-empty one."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from records import RETIRER, T0, add_key, alias, checkpoint, grant

from hsmkeys.catalog.base import VersionRecord
from hsmkeys.catalog.migrate import CatalogSummary, copy_catalog, summarize
from hsmkeys.catalog.postgres import PostgresCatalog
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.cli import main
from hsmkeys.errors import KMSInternalException, KMSInvalidStateException
from hsmkeys.models import KeySpec, KeyState, KeyUsage, KeyVersionRef, Origin, RotationType

OpenPg = Callable[[], PostgresCatalog]
LOGS = ["/var/log/hsmkeys/audit.log", "/var/log/hsmkeys/other.log"]


def _populate(path: Path, keys: int = 1200) -> None:
    """More keys than one page (1000) of the copy, and one of everything else."""
    source = SqliteCatalog(path)
    try:
        with source.transaction():
            for i in range(keys):
                add_key(source, description=f"key {i}")
        rich = add_key(
            source,
            spec=KeySpec.ECC_NIST_P256,
            usage=KeyUsage.SIGN_VERIFY,
            origin=Origin.EXTERNAL,
            state=KeyState.PENDING_DELETION,
            deletion_date=T0 + timedelta(days=7),
            pending_window_days=7,
            policy='{"Version":"2012-10-17"}',
            valid_to=T0 + timedelta(days=1),
            expiration_model="KEY_MATERIAL_EXPIRES",
            material_fingerprint="aa" * 16,
        )
        rotated = add_key(source, rotation_period_days=90, next_rotation_at=T0 + timedelta(days=90))
        source.add_version(VersionRecord(rotated.key_uuid, 2, T0 + timedelta(days=1), RotationType.AUTOMATIC))
        source.add_version(VersionRecord(rotated.key_uuid, 3, T0 + timedelta(days=2), RotationType.ON_DEMAND))
        source.reserve_encryptions(KeyVersionRef(rotated.key_uuid, 2), 4096, 1 << 32)
        source.put_tags(rich.key_uuid, {"team": "payments", "env": "prod"})
        source.insert_alias(alias(rich, "alias/rich"))
        source.insert_alias(alias(rotated, "alias/rotated"))
        source.insert_grant(grant(rich, name="g", retiring_principal=RETIRER, encryption_context_subset={"a": "b"}))
        source.insert_grant(grant(rotated))
        for log_id in LOGS:
            source.put_audit_checkpoint(checkpoint(log_id, sequence=len(log_id)))
    finally:
        source.close()


def test_migrate_catalog_copies_everything_and_verifies_it(
    tmp_path: Path, pg_dsn: str, open_pg: OpenPg, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "catalog.db"
    _populate(path)
    assert main(["--json", "migrate-catalog", "--from", f"sqlite:{path}", "--to", pg_dsn]) == 0
    reported = json.loads(capsys.readouterr().out)
    assert {k: reported[k] for k in ("keys", "versions", "aliases", "tags", "grants", "checkpoints")} == {
        "keys": 1202, "versions": 1204, "aliases": 2, "tags": 2, "grants": 2, "checkpoints": 2,
    }  # fmt: skip

    source, target = SqliteCatalog(path), open_pg()
    try:
        assert summarize(target, LOGS) == summarize(source, LOGS) == CatalogSummary(**reported)
        for key in source.list_keys(limit=2000):
            assert target.get_key(key.key_uuid) == key
            assert target.list_versions(key.key_uuid) == source.list_versions(key.key_uuid)
            assert target.grants_for_key(key.key_uuid) == source.grants_for_key(key.key_uuid)
            for version in source.list_versions(key.key_uuid):
                assert target.encryptions_reserved(version.ref) == source.encryptions_reserved(version.ref)
        assert target.list_aliases(limit=10) == source.list_aliases(limit=10)
        assert [target.get_audit_checkpoint(x) for x in LOGS] == [source.get_audit_checkpoint(x) for x in LOGS]
        assert sum(target.encryptions_reserved(v.ref) for v in target.list_versions(rotated_uuid(source))) == 4096
    finally:
        source.close()


def rotated_uuid(catalog: SqliteCatalog) -> uuid.UUID:
    alias_record = catalog.get_alias("alias/rotated")
    assert alias_record is not None
    return alias_record.key_uuid


def test_a_non_empty_target_is_refused_and_left_alone(
    tmp_path: Path, pg_dsn: str, open_pg: OpenPg, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "catalog.db"
    _populate(path, keys=2)
    target = open_pg()
    target.put_audit_checkpoint(checkpoint("/elsewhere.log"))  # any row makes it non-empty
    assert main(["migrate-catalog", "--from", f"sqlite:{path}", "--to", pg_dsn]) == 2
    assert "KMSInvalidStateException" in capsys.readouterr().err
    assert target.count_keys() == 0


def test_a_copy_that_does_not_verify_is_not_committed(tmp_path: Path, open_pg: OpenPg) -> None:
    path = tmp_path / "catalog.db"
    _populate(path, keys=3)
    source, target = SqliteCatalog(path), open_pg()
    try:
        with pytest.raises(KMSInternalException, match="does not match"):
            copy_catalog(source, LOGS, _LosesGrants(target))  # type: ignore[arg-type]
        assert target.is_empty()
    finally:
        source.close()


class _LosesGrants:
    """A target whose grant writes are silently lost: only the verification can notice."""

    def __init__(self, target: PostgresCatalog) -> None:
        self._target = target

    def __getattr__(self, name: str) -> object:
        return getattr(self._target, name)

    def insert_grant(self, grant: object) -> None:
        pass


def test_bad_arguments_are_errors(tmp_path: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate-catalog", "--from", str(tmp_path / "x.db"), "--to", pg_dsn]) == 2
    assert main(["migrate-catalog", "--from", f"sqlite:{tmp_path / 'missing.db'}", "--to", pg_dsn]) == 2
    assert not (tmp_path / "missing.db").exists()
    path = tmp_path / "catalog.db"
    _populate(path, keys=1)
    assert main(["migrate-catalog", "--from", f"sqlite:{path}", "--to", "mysql://db/x"]) == 2
    assert capsys.readouterr().err.count("ValidationException") == 3


def test_copy_into_a_target_refuses_when_it_already_holds_the_keys(tmp_path: Path, open_pg: OpenPg) -> None:
    path = tmp_path / "catalog.db"
    _populate(path, keys=2)
    source, target = SqliteCatalog(path), open_pg()
    try:
        copy_catalog(source, LOGS, target)
        before = summarize(target, LOGS)
        key = source.list_keys(limit=1)[0]
        source.update_key(dataclasses.replace(key, description=str(uuid.uuid4())))
        with pytest.raises(KMSInvalidStateException):
            copy_catalog(source, LOGS, target)
        assert summarize(target, LOGS) == before
    finally:
        source.close()
