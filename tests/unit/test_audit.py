"""The audit log writer: line format, checkpoints, rotation, recovery markers, failures."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from audit_helpers import SLOW, MemoryCheckpoints, hmac_sha256
from hypothesis import given
from hypothesis import strategies as st

from hsmkeys.audit import (
    AuditEvent,
    AuditLog,
    AuditVerification,
    _event_fields,
    _event_parts,
    _line,
    audit_log_files,
    verify_audit_logs,
)
from hsmkeys.catalog.base import AuditCheckpoint
from hsmkeys.errors import KMSInternalException

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
ARN = "arn:aws:kms:eu-west-1:111122223333:key/0d2b4c1e-0000-4000-8000-000000000001"
ARN2 = "arn:aws:kms:eu-west-1:111122223333:key/0d2b4c1e-0000-4000-8000-000000000002"


def event(i: int = 0, **changes: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "time": T0 + timedelta(seconds=i),
        "request_id": f"req-{i}",
        "principal": "arn:aws:iam::111122223333:user/alice",
        "operation": "Encrypt",
        "key_arns": (ARN,),
        "key_version": 1,
        "decision": "allow key-policy:Sid1",
        "source": "10.0.0.7",
    }
    fields.update(changes)
    return AuditEvent(**fields)


def objects(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def verify(
    paths: list[Path], store: MemoryCheckpoints | None = None, log_id: Path | None = None
) -> AuditVerification:
    checkpoint = None
    if store is not None:
        checkpoint = store.get_audit_checkpoint(str((log_id or paths[-1]).resolve()))
    return verify_audit_logs(paths, hmac_sha256, checkpoint=checkpoint)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.log"


# --- the event -------------------------------------------------------------------------


def test_event_with_naive_time_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        event(time=datetime(2026, 3, 1, 12, 0))


def test_event_with_unknown_phase_is_rejected() -> None:
    with pytest.raises(ValueError, match="phase"):
        event(phase="maybe")


def test_event_fields_are_the_documented_ones_in_order() -> None:
    names = [f for f in AuditEvent.__dataclass_fields__]
    assert names == [
        "time",
        "request_id",
        "principal",
        "operation",
        "phase",
        "key_arns",
        "key_version",
        "outcome",
        "decision",
        "source",
        "count",
    ]


# --- format ----------------------------------------------------------------------------


def test_new_log_starts_with_a_signed_genesis_and_chains_lines_by_sha256(log_path: Path) -> None:
    with AuditLog(log_path, hmac_sha256, checkpoint_seconds=SLOW) as log:
        log.record(event(1, operation="ReEncrypt", key_arns=(ARN, ARN2), phase="intent", outcome="Pending"))
        log.record(event(2, time=datetime(2026, 3, 1, 13, 0, tzinfo=timezone(timedelta(hours=1)))))
    raw = log_path.read_bytes().splitlines(keepends=True)
    lines = [json.loads(r) for r in raw]
    assert [line["seq"] for line in lines] == [1, 2, 3, 4]
    genesis, intent, done, final = lines
    assert genesis["checkpoint"] is True and genesis["kind"] == "genesis"
    assert genesis["chain"] == "0" * 64
    assert intent == {
        "count": None,
        "decision": "allow key-policy:Sid1",
        "key_arns": [ARN, ARN2],
        "key_version": 1,
        "operation": "ReEncrypt",
        "outcome": "Pending",
        "phase": "intent",
        "prev": hashlib.sha256(raw[0]).hexdigest(),
        "principal": "arn:aws:iam::111122223333:user/alice",
        "request_id": "req-1",
        "seq": 2,
        "source": "10.0.0.7",
        "time": "2026-03-01T12:00:01.123456Z",
    }
    assert done["time"] == "2026-03-01T12:00:00.000000Z"  # converted to UTC
    assert done["prev"] == hashlib.sha256(raw[1]).hexdigest()
    assert final["kind"] == "close" and final["chain"] == hashlib.sha256(raw[2]).hexdigest()
    for line in raw:  # canonical: sorted keys, compact, ASCII
        assert line == (json.dumps(json.loads(line), sort_keys=True, separators=(",", ":")) + "\n").encode()


def test_checkpoint_mac_is_the_hsm_mac_of_the_line_without_it(log_path: Path) -> None:
    calls: list[bytes] = []

    def mac(data: bytes) -> bytes:
        calls.append(data)
        return hmac_sha256(data)

    with AuditLog(log_path, mac, checkpoint_seconds=SLOW) as log:
        for i in range(5):
            log.record(event(i))
        assert len(calls) == 1  # the genesis only: events cost no HSM call
    final = objects(log_path)[-1]
    tag = final.pop("mac")
    body = json.dumps(final, sort_keys=True, separators=(",", ":")).encode()
    assert calls[-1] == b"hsmkeys-audit-checkpoint-v1\n" + body
    assert tag == hmac_sha256(calls[-1]).hex()


def test_checkpoint_every_checkpoint_lines_lines(log_path: Path) -> None:
    with AuditLog(log_path, hmac_sha256, checkpoint_lines=3, checkpoint_seconds=SLOW) as log:
        for i in range(7):
            log.record(event(i))
    kinds = [o.get("kind", "event") for o in objects(log_path)]
    assert kinds == ["genesis", "event", "event", "event", "lines"] + ["event"] * 3 + ["lines"] + ["event", "close"]


def test_line_appended_after_checkpoint_seconds_is_signed_at_once(log_path: Path) -> None:
    with AuditLog(log_path, hmac_sha256, checkpoint_seconds=1e-9) as log:
        log.record(event(1))
        assert objects(log_path)[-1]["kind"] == "interval"


def test_forced_checkpoint_is_written_and_stored(log_path: Path) -> None:
    store = MemoryCheckpoints()
    with AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW) as log:
        log.record(event(1))
        written = log.checkpoint()
        assert store.stored[log.log_id] == written
    last = log_path.read_bytes().splitlines(keepends=True)[2]
    assert written.sequence == 3 and written.chain_hash == hashlib.sha256(last).hexdigest()
    assert written.mac == json.loads(last)["mac"] and written.file_name == "audit.log"
    assert written.log_id == str(log_path.resolve())


def test_close_stores_the_final_checkpoint_and_verifies_against_it(log_path: Path) -> None:
    store = MemoryCheckpoints()
    with AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW) as log:
        for i in range(3):
            log.record(event(i))
    stored = store.stored[str(log_path.resolve())]
    assert stored.sequence == 5 == objects(log_path)[-1]["seq"]
    result = verify([log_path], store)
    assert result.ok and result.lines == 5 and result.last_checkpoint == 5, result


def test_reopening_a_signed_log_continues_its_chain(log_path: Path) -> None:
    store = MemoryCheckpoints()
    for round_ in range(3):
        with AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW) as log:
            log.record(event(round_))
    assert [o["seq"] for o in objects(log_path)] == list(range(1, 8))
    assert verify([log_path], store).ok


@pytest.mark.parametrize("arns", [1, 30, 200])  # lines of ~0.4, ~2.7 and ~17 KiB
def test_another_writer_between_lines_of_any_length_is_followed_without_a_break(log_path: Path, arns: int) -> None:
    """Two writers on one file (two server workers): each re-reads the tail the other
    left, whatever the length of the last line (the tail is read in growing chunks)."""
    many = tuple(f"{ARN[:-3]}{n:03d}" for n in range(arns))
    store = MemoryCheckpoints()
    with (
        AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW) as first,
        AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW) as second,
    ):
        for i in range(6):
            (first if i % 2 else second).record(event(i, key_arns=many))
    lines = objects(log_path)
    assert not any("break" in o for o in lines)
    assert [o["seq"] for o in lines] == list(range(1, len(lines) + 1))
    assert verify([log_path], store).ok


def test_a_whole_line_without_its_newline_is_a_damaged_tail_continuing_its_seq(log_path: Path) -> None:
    store = MemoryCheckpoints()
    with AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW) as log:
        log.record(event(1))
    whole = log_path.read_bytes().splitlines()[-1]
    seq = json.loads(whole)["seq"]
    with log_path.open("ab") as handle:
        handle.write(whole.replace(f'"seq":{seq}'.encode(), f'"seq":{seq + 1}'.encode()))  # no newline
    with AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW) as log:
        log.record(event(2))
    marker = next(o for o in objects(log_path) if "break" in o)
    assert marker["break"] == "damaged-tail" and marker["found_seq"] == seq + 1


def test_fsync_lines_is_accepted_and_changes_no_format(log_path: Path) -> None:
    with AuditLog(log_path, hmac_sha256, fsync_lines=True, checkpoint_seconds=SLOW) as log:
        log.record(event(1))
    assert verify([log_path]).ok


# --- rotation --------------------------------------------------------------------------


def test_rotate_links_the_new_file_to_the_old_ones_last_line(log_path: Path) -> None:
    store = MemoryCheckpoints()
    with AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW) as log:
        log.record(event(1))
        rotated = log.rotate()
        log.record(event(2))
    assert rotated.parent == log_path.parent and rotated.name.startswith("audit.log.")
    old_raw = rotated.read_bytes().splitlines(keepends=True)
    assert json.loads(old_raw[-1])["kind"] == "rotate"
    first = objects(log_path)[0]
    assert first["kind"] == "link" and first["follows"] == rotated.name
    assert first["seq"] == json.loads(old_raw[-1])["seq"] + 1
    assert first["chain"] == hashlib.sha256(old_raw[-1]).hexdigest()
    assert audit_log_files(log_path) == [rotated, log_path]
    result = verify([rotated, log_path], store)
    assert result.ok and result.lines == len(old_raw) + 3, result


def test_max_bytes_rotates_automatically_and_files_list_oldest_first(log_path: Path) -> None:
    store = MemoryCheckpoints()
    with AuditLog(
        log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW, max_bytes=2000
    ) as log:
        for i in range(30):
            log.record(event(i))
    files = audit_log_files(log_path)
    assert len(files) >= 3
    seqs = [o["seq"] for f in files for o in objects(f)]
    assert seqs == list(range(1, len(seqs) + 1))
    assert all(f.stat().st_size < 2000 + 1000 for f in files)
    assert verify(files, store).ok


def test_verifying_only_the_live_file_after_rotation_is_ok(log_path: Path) -> None:
    store = MemoryCheckpoints()
    with AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW) as log:
        log.record(event(1))
        log.rotate()
        log.record(event(2))
    assert verify([log_path], store).ok


def test_audit_log_files_ignores_unrelated_names(log_path: Path) -> None:
    for name in ("audit.log.bak", "audit.log.20260301T120000.000000Z.gz", "other.log.20260301T120000.000000Z"):
        (log_path.parent / name).write_text("x")
    kept = log_path.parent / "audit.log.20260301T120000.000000Z"
    kept.write_text("x")
    assert audit_log_files(log_path) == [kept, log_path]


# --- recovery: the writer never hides damage behind a fresh chain -------------------------


def test_deleted_log_gets_a_break_marker_continuing_the_catalog_chain(log_path: Path) -> None:
    store = MemoryCheckpoints()
    with AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW) as log:
        log.record(event(1))
    before = store.stored[str(log_path.resolve())]
    log_path.unlink()
    with AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW) as log:
        log.record(event(2))
    marker = objects(log_path)[0]
    assert marker["break"] == "missing"
    assert marker["seq"] == before.sequence + 1 and marker["prev"] == before.chain_hash
    assert marker["expected_seq"] == before.sequence
    result = verify([log_path], store)
    assert not result.ok and result.first_bad_line == 1
    assert "missing (deleted)" in result.reason


def test_emptied_log_gets_a_break_marker(log_path: Path) -> None:
    store = MemoryCheckpoints()
    with AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW) as log:
        log.record(event(1))
    log_path.write_bytes(b"")
    AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW).close()
    assert objects(log_path)[0]["break"] == "emptied"
    result = verify([log_path], store)
    assert not result.ok and "empty (emptied)" in result.reason


def test_damaged_tail_is_terminated_and_marked_then_reported_first(log_path: Path) -> None:
    store = MemoryCheckpoints()
    with AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW) as log:
        log.record(event(1))
    good = len(objects(log_path))
    with log_path.open("ab") as handle:
        handle.write(b'{"seq":99,"torn')
    with AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW) as log:
        log.record(event(2))
    raw = log_path.read_bytes().splitlines()
    assert raw[good] == b'{"seq":99,"torn'
    assert json.loads(raw[good + 1])["break"] == "damaged-tail"
    result = verify([log_path], store)
    assert not result.ok and result.first_bad_line == good + 1, result


def test_older_copy_put_back_gets_a_behind_catalog_marker(log_path: Path, tmp_path: Path) -> None:
    store = MemoryCheckpoints()
    copy = tmp_path / "copy"
    with AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW) as log:
        log.record(event(1))
        log.checkpoint()
        shutil.copy(log_path, copy)
        log.record(event(2))
    shutil.copy(copy, log_path)
    AuditLog(log_path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW).close()
    marker = objects(log_path)[-2]
    assert marker["break"] == "behind-catalog"
    assert not verify([log_path], store).ok


def test_without_a_catalog_a_missing_log_starts_a_genesis(log_path: Path) -> None:
    with AuditLog(log_path, hmac_sha256, checkpoint_seconds=SLOW) as log:
        log.record(event(1))
    assert objects(log_path)[0]["kind"] == "genesis"


def test_log_deleted_while_open_gets_a_break_marker_on_the_next_line(log_path: Path) -> None:
    with AuditLog(log_path, hmac_sha256, checkpoint_seconds=SLOW) as log:
        log.record(event(1))
        log_path.unlink()
        log.record(event(2))
    first = objects(log_path)[0]
    assert first["break"] == "missing" and first["expected_seq"] == 2


# --- failures: fail closed, say nothing about internals ------------------------------------


def test_record_raises_internal_error_when_the_path_became_a_directory(log_path: Path) -> None:
    log = AuditLog(log_path, hmac_sha256, checkpoint_seconds=SLOW)
    try:
        log_path.rename(log_path.with_name("moved"))
        log_path.mkdir()
        with pytest.raises(KMSInternalException) as caught:
            log.record(event(1))
        assert caught.value.message == "audit log write failed"
        assert str(log_path.parent) not in str(caught.value)
    finally:
        log.close()


def test_opening_a_directory_raises_internal_error(log_path: Path) -> None:
    log_path.mkdir()
    with pytest.raises(KMSInternalException, match="audit log cannot be opened"):
        AuditLog(log_path, hmac_sha256)


def test_record_raises_internal_error_when_the_disk_rejects_the_write(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(log_path, hmac_sha256, checkpoint_seconds=SLOW)
    size = log_path.stat().st_size

    def full(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(KMSInternalException, match="audit log write failed"):
        log.record(event(1))
    monkeypatch.undo()
    log.record(event(2))  # recovers once the disk has room
    log.close()
    assert log_path.stat().st_size > size
    assert verify([log_path]).ok


def test_record_on_a_closed_log_raises_internal_error(log_path: Path) -> None:
    log = AuditLog(log_path, hmac_sha256)
    log.close()
    log.close()  # idempotent
    with pytest.raises(KMSInternalException, match="closed"):
        log.record(event(1))


def test_record_raises_internal_error_when_the_hsm_mac_fails(log_path: Path) -> None:
    from hsmkeys.errors import NotFoundException

    fail = False

    def mac(data: bytes) -> bytes:
        if fail:
            raise NotFoundException("audit key gone")
        return hmac_sha256(data)

    log = AuditLog(log_path, mac, checkpoint_seconds=1e-9)
    fail = True
    with pytest.raises(KMSInternalException):
        log.record(event(1))
    fail = False
    log.close()


def test_a_failing_checkpoint_store_does_not_fail_the_record(log_path: Path) -> None:
    class Broken(MemoryCheckpoints):
        def put_audit_checkpoint(self, checkpoint: AuditCheckpoint) -> None:
            raise KMSInternalException("catalog down")

    with AuditLog(log_path, hmac_sha256, checkpoints=Broken(), checkpoint_seconds=1e-9) as log:
        log.record(event(1))
    assert verify([log_path]).ok


_text = st.text(max_size=40)  # any code point: quotes, backslashes, controls, non-ASCII


@given(
    request_id=_text,
    principal=st.none() | _text,
    operation=_text,
    key_arns=st.lists(_text, max_size=3),
    key_version=st.none() | st.integers(min_value=0, max_value=2**32),
    outcome=_text,
    decision=st.none() | _text,
    source=st.none() | _text,
    count=st.none() | st.integers(min_value=0, max_value=10**9),
    phase=st.sampled_from(["intent", "done"]),
    offset_minutes=st.sampled_from([None, 0, 120, -330]),
    seq=st.integers(min_value=1, max_value=2**40),
)
def test_event_line_template_writes_the_canonical_json_line(
    request_id: str,
    principal: str | None,
    operation: str,
    key_arns: list[str],
    key_version: int | None,
    outcome: str,
    decision: str | None,
    source: str | None,
    count: int | None,
    phase: str,
    offset_minutes: int | None,
    seq: int,
) -> None:
    tz = UTC if offset_minutes is None else timezone(timedelta(minutes=offset_minutes))
    ev = AuditEvent(
        time=T0.astimezone(tz), request_id=request_id, principal=principal, operation=operation, phase=phase,
        key_arns=tuple(key_arns), key_version=key_version, outcome=outcome, decision=decision, source=source,
        count=count,
    )
    head, middle, end = _event_parts(ev)
    chain = "ab" * 32
    templated = f'{head}"prev":"{chain}",{middle}"seq":{seq},{end}\n'.encode("ascii")
    assert templated == _line({**_event_fields(ev), "seq": seq, "prev": chain})
