"""The audit log: line format, chain verification, tamper detection, concurrent writers."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import multiprocessing
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsmkeys import audit
from hsmkeys.audit import (
    GENESIS_PREV,
    AuditEvent,
    AuditLog,
    verify_audit_log,
    verify_audit_logs,
)
from hsmkeys.errors import KMSInternalException

KEY = b"k" * 32
T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
ARN = "arn:aws:kms:eu-west-1:111122223333:key/0d2b4c1e-0000-4000-8000-000000000001"


def hmac_sha256(data: bytes) -> bytes:
    return hmac.new(KEY, data, hashlib.sha256).digest()


def other_key_mac(data: bytes) -> bytes:
    return hmac.new(b"x" * 32, data, hashlib.sha256).digest()


def event(i: int = 0, **changes: object) -> AuditEvent:
    base = AuditEvent(
        time=T0 + timedelta(seconds=i),
        request_id=f"req-{i}",
        principal="arn:aws:iam::111122223333:user/alice",
        operation="Encrypt",
        key_arn=ARN,
        key_version=1,
        source="10.0.0.7",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def write_log(path: Path, count: int) -> None:
    with AuditLog(path, hmac_sha256) as log:
        for i in range(count):
            log.record(event(i))


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.log"


# --- format ---------------------------------------------------------------------------


def test_first_line_is_genesis_then_one_canonical_line_per_event(log_path: Path) -> None:
    write_log(log_path, 2)
    raw = lines_of(log_path)
    assert len(raw) == 3
    objs = [json.loads(line) for line in raw]
    for line, obj in zip(raw, objs, strict=True):
        canonical = json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"
        assert line == canonical.encode()
    assert objs[0] == {
        "follows": None,
        "genesis": True,
        "mac": objs[0]["mac"],
        "prev": GENESIS_PREV,
        "time": "2026-03-01T12:00:00.123456Z",
    }
    assert objs[1] == {
        "key_arn": ARN,
        "key_version": 1,
        "mac": objs[1]["mac"],
        "operation": "Encrypt",
        "outcome": "Success",
        "prev": objs[0]["mac"],
        "principal": "arn:aws:iam::111122223333:user/alice",
        "request_id": "req-0",
        "source": "10.0.0.7",
        "time": "2026-03-01T12:00:00.123456Z",
    }
    assert objs[2]["prev"] == objs[1]["mac"]


def test_mac_is_hmac_of_previous_mac_and_line_without_mac(log_path: Path) -> None:
    write_log(log_path, 3)
    prev = GENESIS_PREV
    for line in lines_of(log_path):
        obj = json.loads(line)
        tag = obj.pop("mac")
        body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        assert tag == hmac_sha256(bytes.fromhex(prev) + body).hex()
        prev = tag


def test_time_is_written_in_utc_with_microseconds(log_path: Path) -> None:
    plus2 = timezone(timedelta(hours=2))
    with AuditLog(log_path, hmac_sha256) as log:
        log.record(event(time=datetime(2026, 3, 1, 14, 0, 0, tzinfo=plus2)))
    assert json.loads(lines_of(log_path)[1])["time"] == "2026-03-01T12:00:00.000000Z"


def test_naive_event_time_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        event(time=datetime(2026, 3, 1, 12, 0, 0))


def test_audit_event_has_no_field_for_secrets() -> None:
    names = {f.name for f in dataclasses.fields(AuditEvent)}
    assert names == {
        "time",
        "request_id",
        "principal",
        "operation",
        "key_arn",
        "key_version",
        "outcome",
        "source",
    }


text = st.text(st.characters(codec="utf-8"), max_size=40)


@settings(max_examples=60, deadline=None)
@given(principal=st.none() | text, operation=text, outcome=text, source=st.none() | text)
def test_any_text_round_trips_as_one_verifiable_line(
    tmp_path_factory: pytest.TempPathFactory,
    principal: str | None,
    operation: str,
    outcome: str,
    source: str | None,
) -> None:
    path = tmp_path_factory.mktemp("prop") / "audit.log"
    ev = event(principal=principal, operation=operation, outcome=outcome, source=source)
    with AuditLog(path, hmac_sha256) as log:
        log.record(ev)
    raw = lines_of(path)
    assert len(raw) == 2
    obj = json.loads(raw[1])
    assert (obj["principal"], obj["operation"], obj["outcome"], obj["source"]) == (
        principal,
        operation,
        outcome,
        source,
    )
    assert verify_audit_log(path, hmac_sha256).ok


# --- verification and tampering ----------------------------------------------------------


def test_untouched_log_verifies_with_exact_line_count(log_path: Path) -> None:
    write_log(log_path, 5)
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.lines, result.first_bad_line) == (True, 6, None)


def test_reopened_log_continues_the_same_chain(log_path: Path) -> None:
    write_log(log_path, 2)
    write_log(log_path, 2)
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.lines) == (True, 5)


def test_empty_file_verifies_with_no_lines(log_path: Path) -> None:
    log_path.touch()
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.lines) == (True, 0)


def test_missing_file_is_reported_not_ok(log_path: Path) -> None:
    result = verify_audit_log(log_path, hmac_sha256)
    assert not result.ok
    assert result.first_bad_line is None


def test_edited_line_is_named(log_path: Path) -> None:
    write_log(log_path, 5)
    raw = lines_of(log_path)
    raw[3] = raw[3].replace(b'"outcome":"Success"', b'"outcome":"AccessDeniedException"')
    rewrite(log_path, raw)
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.first_bad_line) == (False, 4)
    assert "mac mismatch" in result.reason


def test_reformatted_line_is_named_even_with_same_content(log_path: Path) -> None:
    write_log(log_path, 3)
    raw = lines_of(log_path)
    raw[2] = json.dumps(json.loads(raw[2]), sort_keys=True).encode() + b"\n"
    rewrite(log_path, raw)
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.first_bad_line) == (False, 3)


def test_deleted_line_breaks_the_chain_at_the_next_line(log_path: Path) -> None:
    write_log(log_path, 5)
    raw = lines_of(log_path)
    del raw[2]
    rewrite(log_path, raw)
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.first_bad_line) == (False, 3)
    assert "chain broken" in result.reason


def test_deleted_genesis_line_is_named(log_path: Path) -> None:
    write_log(log_path, 3)
    rewrite(log_path, lines_of(log_path)[1:])
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.first_bad_line) == (False, 1)


def test_inserted_copy_of_a_line_is_named(log_path: Path) -> None:
    write_log(log_path, 4)
    raw = lines_of(log_path)
    raw.insert(3, raw[2])
    rewrite(log_path, raw)
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.first_bad_line) == (False, 4)


def test_inserted_forged_line_is_named(log_path: Path) -> None:
    write_log(log_path, 4)
    raw = lines_of(log_path)
    forged = json.loads(raw[2])
    forged.update(prev=forged["mac"], request_id="req-forged")
    raw.insert(3, (json.dumps(forged, sort_keys=True, separators=(",", ":")) + "\n").encode())
    rewrite(log_path, raw)
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.first_bad_line) == (False, 4)
    assert "mac mismatch" in result.reason


def test_swapped_lines_are_named(log_path: Path) -> None:
    write_log(log_path, 5)
    raw = lines_of(log_path)
    raw[2], raw[3] = raw[3], raw[2]
    rewrite(log_path, raw)
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.first_bad_line) == (False, 3)


def test_truncated_last_line_is_named(log_path: Path) -> None:
    write_log(log_path, 3)
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-20])
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.first_bad_line) == (False, 4)
    assert "truncated" in result.reason


@pytest.mark.parametrize(
    "garbage", [b"hello\n", b"[1,2]\n", b"\xff\xfe\n", b"\n", b'{"mac":"00"}\n']
)
def test_garbage_line_is_named(log_path: Path, garbage: bytes) -> None:
    write_log(log_path, 3)
    raw = lines_of(log_path)
    raw.insert(2, garbage)
    rewrite(log_path, raw)
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.first_bad_line) == (False, 3)


def test_log_checked_with_another_key_fails_at_first_line(log_path: Path) -> None:
    write_log(log_path, 2)
    result = verify_audit_log(log_path, other_key_mac)
    assert (result.ok, result.first_bad_line) == (False, 1)


# --- concurrent writers ---------------------------------------------------------------


def _append_many(path: str, tag: str, count: int, barrier: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    with AuditLog(Path(path), hmac_sha256) as log:
        for i in range(count):
            log.record(event(i, request_id=f"{tag}-{i}"))


def _append_with_inherited(log: AuditLog, tag: str, count: int, barrier: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    for i in range(count):
        log.record(event(i, request_id=f"{tag}-{i}"))


def _request_ids(path: Path) -> list[str]:
    return [json.loads(line).get("request_id", "") for line in lines_of(path)[1:]]


def _run_processes(target: Callable[..., None], first_arg: object, count: int) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    procs = [
        ctx.Process(target=target, args=(first_arg, f"p{n}", count, barrier)) for n in range(3)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]


def test_three_processes_appending_keep_one_valid_chain(log_path: Path) -> None:
    count = 400
    _run_processes(_append_many, str(log_path), count)
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.lines) == (True, 3 * count + 1), result.reason
    ids = _request_ids(log_path)
    assert sorted(ids) == sorted(f"p{n}-{i}" for n in range(3) for i in range(count))


def test_log_opened_before_fork_is_safe_in_child_processes(log_path: Path) -> None:
    count = 300
    log = AuditLog(log_path, hmac_sha256)
    log.record(event(request_id="parent"))
    _run_processes(_append_with_inherited, log, count)
    log.record(event(request_id="parent-after"))
    log.close()
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.lines) == (True, 3 * count + 3), result.reason


def test_threads_sharing_one_log_keep_one_valid_chain(log_path: Path) -> None:
    count = 300
    log = AuditLog(log_path, hmac_sha256)

    def worker(tag: str) -> None:
        for i in range(count):
            log.record(event(i, request_id=f"{tag}-{i}"))

    threads = [threading.Thread(target=worker, args=(f"t{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.lines) == (True, 4 * count + 1)


def test_writers_alternating_chain_to_each_others_lines(log_path: Path) -> None:
    a = AuditLog(log_path, hmac_sha256)
    b = AuditLog(log_path, hmac_sha256)
    for i in range(5):
        a.record(event(i, request_id=f"a{i}"))
        b.record(event(i, request_id=f"b{i}"))
    a.close()
    b.close()
    assert verify_audit_log(log_path, hmac_sha256) == audit.AuditVerification(True, 11, None, "ok")


class _PreadSpy:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes_read = 0
        self.calls = 0
        real = os.pread

        def spy(fd: int, n: int, offset: int) -> bytes:
            self.calls += 1
            self.bytes_read += n
            return real(fd, n, offset)

        monkeypatch.setattr(os, "pread", spy)


def test_own_last_write_is_cached_so_the_file_is_not_reread(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(log_path, hmac_sha256)
    log.record(event(0))
    spy = _PreadSpy(monkeypatch)
    for i in range(1, 10):
        log.record(event(i))
    log.close()
    assert spy.calls == 0


def test_another_writers_line_is_read_from_the_tail_only(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_log(log_path, 2000)
    size = log_path.stat().st_size
    spy = _PreadSpy(monkeypatch)
    write_log(log_path, 1)
    assert 0 < spy.bytes_read <= 4096 < size
    assert verify_audit_log(log_path, hmac_sha256).ok


def test_line_longer_than_the_tail_chunk_is_chained_correctly(log_path: Path) -> None:
    with AuditLog(log_path, hmac_sha256) as log:
        log.record(event(0, principal="p" * 20_000))
    write_log(log_path, 1)
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.lines) == (True, 3)


# --- rotation, damage, failures ---------------------------------------------------------


def test_renamed_file_is_recreated_with_genesis_following_the_old_file(log_path: Path) -> None:
    log = AuditLog(log_path, hmac_sha256)
    log.record(event(0))
    log.record(event(1))
    rotated = log_path.with_suffix(".log.1")
    log_path.rename(rotated)
    log.record(event(2))
    log.close()
    old_last = json.loads(lines_of(rotated)[-1])["mac"]
    new_lines = lines_of(log_path)
    assert json.loads(new_lines[0])["follows"] == old_last
    assert len(new_lines) == 2
    assert verify_audit_log(log_path, hmac_sha256).ok
    result = verify_audit_logs([rotated, log_path], hmac_sha256)
    assert (result.ok, result.lines) == (True, 5)


def test_rotated_file_with_dropped_tail_fails_the_link_check(log_path: Path) -> None:
    log = AuditLog(log_path, hmac_sha256)
    for i in range(3):
        log.record(event(i))
    rotated = log_path.with_suffix(".log.1")
    log_path.rename(rotated)
    log.record(event(3))
    log.close()
    rewrite(rotated, lines_of(rotated)[:-1])
    assert verify_audit_log(rotated, hmac_sha256).ok
    result = verify_audit_logs([rotated, log_path], hmac_sha256)
    assert (result.ok, result.first_bad_line) == (False, 1)
    assert str(log_path) in result.reason


def test_rotated_files_checked_out_of_order_fail(log_path: Path) -> None:
    log = AuditLog(log_path, hmac_sha256)
    log.record(event(0))
    log_path.rename(log_path.with_suffix(".log.2"))
    log.record(event(1))
    log_path.rename(log_path.with_suffix(".log.1"))
    log.record(event(2))
    log.close()
    oldest, middle = log_path.with_suffix(".log.2"), log_path.with_suffix(".log.1")
    assert verify_audit_logs([oldest, middle, log_path], hmac_sha256).ok
    assert not verify_audit_logs([oldest, log_path, middle], hmac_sha256).ok
    assert not verify_audit_logs([oldest, log_path], hmac_sha256).ok


def test_deleted_file_is_recreated(log_path: Path) -> None:
    log = AuditLog(log_path, hmac_sha256)
    log.record(event(0))
    log_path.unlink()
    log.record(event(1))
    log.close()
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.lines) == (True, 2)
    assert _request_ids(log_path) == ["req-1"]


def test_file_truncated_in_place_restarts_with_genesis(log_path: Path) -> None:
    log = AuditLog(log_path, hmac_sha256)
    log.record(event(0))
    os.truncate(log_path, 0)  # logrotate copytruncate
    log.record(event(1))
    log.close()
    first = json.loads(lines_of(log_path)[0])
    assert (first["genesis"], first["follows"]) == (True, None)
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.lines) == (True, 2)


def test_damaged_tail_is_still_reported_after_writing_resumes(log_path: Path) -> None:
    write_log(log_path, 2)
    with log_path.open("ab") as f:
        f.write(b'{"key_arn":"torn')
    write_log(log_path, 2)
    raw = lines_of(log_path)
    assert raw[3] == b'{"key_arn":"torn\n'
    assert json.loads(raw[4])["genesis"] is True
    result = verify_audit_log(log_path, hmac_sha256)
    assert (result.ok, result.first_bad_line) == (False, 4)


def test_record_after_close_is_an_internal_error(log_path: Path) -> None:
    log = AuditLog(log_path, hmac_sha256)
    log.close()
    log.close()
    with pytest.raises(KMSInternalException):
        log.record(event(0))


def test_unwritable_location_is_an_internal_error(tmp_path: Path) -> None:
    with pytest.raises(KMSInternalException):
        AuditLog(tmp_path / "missing-dir" / "audit.log", hmac_sha256)


def test_new_file_is_private_to_the_owner(log_path: Path) -> None:
    AuditLog(log_path, hmac_sha256).close()
    assert log_path.stat().st_mode & 0o077 == 0
