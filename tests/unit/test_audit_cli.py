"""``hsmkeys audit verify`` / ``audit rotate`` on a KeyStore over the in-memory HSM."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hsmkeys.audit import AuditEvent, AuditLog, audit_log_chains, audit_log_files, writer_log_path
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.cli import main
from hsmkeys.hsm.base import AUDIT_KEY_REF
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.keystore import KeyStore


@dataclass
class Setup:
    config: Path
    log: Path
    hsm: MemoryHsm
    catalog: SqliteCatalog

    def run(self, *argv: str, store: KeyStore | None = None) -> int:
        opened = store or KeyStore(hsm=self.hsm, catalog=self.catalog)
        return main(["--config", str(self.config), *argv], open_store=lambda: contextlib.nullcontext(opened))


def event(i: int) -> AuditEvent:
    return AuditEvent(
        time=datetime(2026, 3, 1, 12, 0, i, tzinfo=UTC),
        request_id=f"req-{i}",
        principal="arn:aws:iam::111122223333:user/alice",
        operation="Sign",
        decision="allow key-policy:Sid1",
    )


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    for name in ("HSMKEYS_CONFIG", "HSMKEYS_AUDIT_LOG", "HSMKEYS_CATALOG"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "hsmkeys.yaml"
    config.write_text(
        "hsm:\n  module: /nonexistent/libsofthsm2.so\n  token_label: t\n  pin_env: HSMKEYS_TEST_PIN\n"
        "catalog: catalog.db\naudit_log: audit.log\n"
    )
    catalog = SqliteCatalog(tmp_path / "catalog.db")
    yield Setup(config, tmp_path / "audit.log", MemoryHsm(), catalog)
    catalog.close()


def write_log(setup: Setup, events: int = 4) -> None:
    """Lines written by the writer side: the MAC key is made in the HSM on first use."""
    signer = KeyStore(hsm=setup.hsm, catalog=setup.catalog)
    with AuditLog(setup.log, signer.audit_mac, checkpoints=setup.catalog, checkpoint_seconds=3600) as log:
        for i in range(events):
            log.record(event(i))
            if i == 1:
                log.rotate()


def test_audit_verify_checks_the_configured_log_and_its_rotated_files(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(setup)
    assert len(audit_log_files(setup.log)) == 2
    assert setup.run("audit", "verify") == 0
    out = capsys.readouterr().out
    total = sum(len(f.read_bytes().splitlines()) for f in audit_log_files(setup.log))
    last = json.loads(setup.log.read_bytes().splitlines()[-1])["seq"]
    assert out.strip() == f"intact: {total} line(s), last checkpoint seq {last}"


def test_audit_verify_uses_the_catalog_checkpoint_to_catch_a_clean_cut(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(setup)
    lines = setup.log.read_bytes().splitlines(keepends=True)
    last_seq = json.loads(lines[-1])["seq"]
    # Cut back to the link checkpoint: a valid-looking, signed file, but shorter than the catalog says.
    setup.log.write_bytes(lines[0])
    assert setup.run("--json", "audit", "verify") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["file"] == str(setup.log)
    assert "truncated" in report["reason"] and report["catalog_checkpoint"] == last_seq


def test_audit_verify_names_a_deleted_log(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    write_log(setup)
    setup.log.unlink()
    assert setup.run("audit", "verify") == 1
    assert "missing" in capsys.readouterr().out


def test_audit_verify_never_creates_the_audit_key_or_touches_files(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(setup)
    before = {f: f.read_bytes() for f in tmp_path.iterdir() if f.name.startswith("audit.log")}
    empty_hsm = MemoryHsm()  # the token lost its audit key
    assert setup.run("audit", "verify", store=KeyStore(hsm=empty_hsm, catalog=setup.catalog)) == 2
    assert "NotFoundException" in capsys.readouterr().err
    assert not empty_hsm.has_key(AUDIT_KEY_REF)
    after = {f: f.read_bytes() for f in tmp_path.iterdir() if f.name.startswith("audit.log")}
    assert after == before


def test_audit_rotate_renames_the_log_and_starts_a_linked_file(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    signer = KeyStore(hsm=setup.hsm, catalog=setup.catalog)
    log = AuditLog(setup.log, signer.audit_mac, checkpoints=setup.catalog, checkpoint_seconds=3600)
    store = KeyStore(hsm=setup.hsm, catalog=setup.catalog, audit=log)
    log.record(event(1))
    assert setup.run("audit", "rotate", store=store) == 0
    assert "rotated:" in capsys.readouterr().out
    log.close()
    assert len(audit_log_files(setup.log)) == 2
    assert setup.run("audit", "verify") == 0


# ------------------------------------------------------------------ one chain per worker


def write_chain(setup: Setup, writer: int, events: int = 3) -> Path:
    """A worker's own chain, as `serve --workers N` writes it (worker n: <audit_log>.w<n>)."""
    signer = KeyStore(hsm=setup.hsm, catalog=setup.catalog)
    path = writer_log_path(setup.log, writer)
    with AuditLog(path, signer.audit_mac, checkpoints=setup.catalog, checkpoint_seconds=3600) as log:
        for i in range(events):
            log.record(event(i))
    return path


def test_writer_paths_and_the_chains_found_beside_the_log(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    assert writer_log_path(log, 1) == log and writer_log_path(log, 12) == tmp_path / "audit.log.w12"
    with pytest.raises(ValueError):
        writer_log_path(log, 0)
    for name in ("audit.log", "audit.log.w2", "audit.log.w3.20261202T010203.000004Z",
                 "audit.log.20261202T010203.000004Z", "audit.log.w1", "audit.log.w02", "audit.log.wx",
                 "audit.log.w5.bak", "other.log.w6"):  # fmt: skip
        (tmp_path / name).write_text("")
    known = [str((tmp_path / "audit.log.w7").resolve()), str((tmp_path / "elsewhere.log.w8").resolve())]
    assert audit_log_chains(log, known) == [log, log.with_name("audit.log.w2"), log.with_name("audit.log.w3"),
                                            log.with_name("audit.log.w7")]  # fmt: skip


def test_audit_verify_checks_every_workers_chain_and_rotate_rotates_them_all(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(setup)
    second = write_chain(setup, 2)
    assert setup.run("audit", "verify") == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[0] for line in out] == [str(setup.log), str(second)]
    assert all(": intact: " in line for line in out)

    signer = KeyStore(hsm=setup.hsm, catalog=setup.catalog)
    log = AuditLog(setup.log, signer.audit_mac, checkpoints=setup.catalog, checkpoint_seconds=3600)
    assert setup.run("audit", "rotate", store=KeyStore(hsm=setup.hsm, catalog=setup.catalog, audit=log)) == 0
    log.close()
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert len(audit_log_files(second)) == 2  # the worker's chain was rotated too
    assert setup.run("--json", "audit", "verify") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and [c["log"] for c in report["chains"]] == [str(setup.log), str(second)]


def test_a_deleted_workers_chain_is_found_missing_from_the_catalogs_checkpoint(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(setup)
    second = write_chain(setup, 2)
    second.unlink()  # every file of the chain: only the catalog still knows it
    assert setup.run("audit", "verify") == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{setup.log}: intact: ")
    assert out[1].startswith(f"{second}: damaged: ") and "missing" in out[1]
