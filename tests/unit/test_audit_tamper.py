"""verify_audit_logs: every way of tampering with the files is detected and named."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import shutil
import tempfile
from dataclasses import replace
from datetime import UTC, datetime, timedelta
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
    audit_log_files,
    verify_audit_logs,
)
from hsmkeys.catalog.base import AuditCheckpoint

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def event(i: int) -> AuditEvent:
    return AuditEvent(
        time=T0 + timedelta(seconds=i),
        request_id=f"req-{i}",
        principal="arn:aws:iam::111122223333:user/alice",
        operation="Encrypt",
        key_arns=("arn:aws:kms:eu-west-1:111122223333:key/k1",),
        key_version=1,
        decision="allow key-policy:Sid1",
        source="10.0.0.7",
    )


class Log:
    """A closed audit log in ``path`` (possibly rotated) and its catalog checkpoint."""

    def __init__(self, path: Path, events: int = 8, *, rotate_every: int | None = None) -> None:
        self.path = path
        self.store = MemoryCheckpoints()
        with AuditLog(path, hmac_sha256, checkpoints=self.store, checkpoint_lines=3, checkpoint_seconds=SLOW) as log:
            for i in range(events):
                log.record(event(i))
                if rotate_every and (i + 1) % rotate_every == 0:
                    log.rotate()

    @property
    def files(self) -> list[Path]:
        return audit_log_files(self.path)

    @property
    def checkpoint(self) -> AuditCheckpoint:
        return self.store.stored[str(self.path.resolve())]

    def lines(self, path: Path | None = None) -> list[bytes]:
        return (path or self.path).read_bytes().splitlines(keepends=True)

    def write(self, lines: list[bytes], path: Path | None = None) -> None:
        (path or self.path).write_bytes(b"".join(lines))

    def verify(self, *, catalog: bool = True) -> AuditVerification:
        return verify_audit_logs(self.files, hmac_sha256, checkpoint=self.checkpoint if catalog else None)


def rechain(lines: list[bytes], start: int) -> list[bytes]:
    """What an attacker without the HSM key can do: recompute every hash after ``start``."""
    out = list(lines[:start])
    prev = hashlib.sha256(out[-1]).hexdigest() if out else "0" * 64
    for raw in lines[start:]:
        obj: dict[str, Any] = json.loads(raw)
        obj["chain" if obj.get("checkpoint") else "prev"] = prev
        line = (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()
        out.append(line)
        prev = hashlib.sha256(line).hexdigest()
    return out


@pytest.fixture
def log(tmp_path: Path) -> Log:
    return Log(tmp_path / "audit.log")


def test_untouched_log_is_intact_with_and_without_the_catalog(log: Log) -> None:
    assert log.verify() == AuditVerification(True, 12, None, "intact", None, 12)
    assert log.verify(catalog=False).ok


def test_edited_field_names_the_edited_line(log: Log) -> None:
    lines = log.lines()
    lines[3] = lines[3].replace(b'"Encrypt"', b'"Decrypt"')
    log.write(lines)
    result = log.verify()
    assert not result.ok and result.first_bad_line == 4 and "edited" in result.reason
    assert result.file == log.path


def test_edit_with_recomputed_hashes_fails_the_next_checkpoint_mac(log: Log) -> None:
    lines = log.lines()
    lines[3] = lines[3].replace(b"alice", b"mallory")
    log.write(rechain(lines, 3))
    result = log.verify()
    assert not result.ok and result.first_bad_line == 5 and "checkpoint MAC" in result.reason


def test_inserted_line_is_detected(log: Log) -> None:
    lines = log.lines()
    forged = json.loads(lines[2])
    forged["request_id"] = "forged"
    forged_line = (json.dumps(forged, sort_keys=True, separators=(",", ":")) + "\n").encode()
    log.write([*lines[:3], forged_line, *lines[3:]])
    result = log.verify()
    assert not result.ok and result.first_bad_line == 4 and "inserted" in result.reason


def test_deleted_middle_line_is_named_removed(log: Log) -> None:
    lines = log.lines()
    del lines[5]
    log.write(lines)
    result = log.verify()
    assert not result.ok and result.first_bad_line == 6 and "removed" in result.reason


def test_swapped_lines_are_named_reordered(log: Log) -> None:
    lines = log.lines()
    lines[2], lines[3] = lines[3], lines[2]
    log.write(lines)
    result = log.verify()
    assert not result.ok and result.first_bad_line == 3 and "reordered" in result.reason


def test_duplicated_line_is_named_duplicated(log: Log) -> None:
    lines = log.lines()
    log.write([*lines[:3], lines[2], *lines[3:]])
    result = log.verify()
    assert not result.ok and result.first_bad_line == 4 and "duplicated" in result.reason


@pytest.mark.parametrize("dropped", [1, 2, 5])
def test_dropped_tail_lines_are_named_truncated(log: Log, dropped: int) -> None:
    log.write(log.lines()[:-dropped])
    result = log.verify()
    assert not result.ok and result.file == log.path
    assert "truncated" in result.reason


def test_tail_cut_to_unsigned_lines_fails_even_without_the_catalog(log: Log) -> None:
    log.write(log.lines()[:-2])
    result = log.verify(catalog=False)
    assert not result.ok and "unsigned" in result.reason


def test_line_cut_mid_way_is_named_torn(log: Log) -> None:
    log.path.write_bytes(log.path.read_bytes()[:-10])
    result = log.verify()
    assert not result.ok and result.first_bad_line == 12 and "torn" in result.reason


def test_file_truncated_to_zero_bytes_is_named_emptied(log: Log) -> None:
    log.path.write_bytes(b"")
    result = log.verify(catalog=False)
    assert not result.ok and result.file == log.path and "emptied" in result.reason


def test_deleted_file_is_named_missing(log: Log) -> None:
    log.path.unlink()
    result = verify_audit_logs([log.path], hmac_sha256, checkpoint=log.checkpoint)
    assert not result.ok and result.file == log.path and "missing" in result.reason


def test_replayed_older_copy_is_named_older_copy(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    store = MemoryCheckpoints()
    with AuditLog(path, hmac_sha256, checkpoints=store, checkpoint_seconds=SLOW) as writer:
        writer.record(event(1))
        writer.checkpoint()
        old = path.read_bytes()
        writer.record(event(2))
    path.write_bytes(old)
    checkpoint = store.stored[str(path.resolve())]
    result = verify_audit_logs([path], hmac_sha256, checkpoint=checkpoint)
    assert not result.ok and "older copy" in result.reason
    assert verify_audit_logs([path], hmac_sha256, checkpoint=None).ok  # only the catalog can tell


def test_new_chain_where_the_catalog_knew_one_is_named_restarted(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    first = Log(path, events=10)
    checkpoint = first.checkpoint
    path.unlink()
    with AuditLog(path, hmac_sha256, checkpoint_seconds=SLOW) as fresh:  # no catalog: a genesis
        fresh.record(event(1))
    checkpoint = replace(checkpoint, time=checkpoint.time - timedelta(seconds=5))
    result = verify_audit_logs([path], hmac_sha256, checkpoint=checkpoint)
    assert not result.ok and "new chain" in result.reason


def test_forged_checkpoint_fails_its_mac(log: Log) -> None:
    lines = log.lines()[:-3]  # cut the tail and close it with a forged checkpoint
    forged = {
        "chain": hashlib.sha256(lines[-1]).hexdigest(),
        "checkpoint": True,
        "kind": "close",
        "mac": "00" * 32,
        "seq": json.loads(lines[-1])["seq"] + 1,
        "time": "2026-03-01T12:00:00.000000Z",
    }
    log.write([*lines, (json.dumps(forged, sort_keys=True, separators=(",", ":")) + "\n").encode()])
    result = log.verify(catalog=False)
    assert not result.ok and result.first_bad_line == len(lines) + 1
    assert "checkpoint MAC" in result.reason


def test_checkpoint_signed_with_another_key_fails(log: Log) -> None:
    result = verify_audit_logs(
        log.files, lambda data: hmac.new(b"x" * 32, data, hashlib.sha256).digest(), checkpoint=None
    )
    assert not result.ok and result.first_bad_line == 1 and "checkpoint MAC" in result.reason


def test_lines_removed_from_the_start_are_detected(log: Log) -> None:
    log.write(log.lines()[1:])
    result = log.verify()
    assert not result.ok and result.first_bad_line == 1 and "start" in result.reason


def test_catalog_checkpoint_of_a_different_chain_is_named_replaced(log: Log) -> None:
    foreign = replace(log.checkpoint, chain_hash="ab" * 32)
    result = verify_audit_logs(log.files, hmac_sha256, checkpoint=foreign)
    assert not result.ok and "replaced" in result.reason


# --- several files ------------------------------------------------------------------------


@pytest.fixture
def rotated(tmp_path: Path) -> Log:
    return Log(tmp_path / "audit.log", events=9, rotate_every=3)


def test_rotated_files_verify_in_order(rotated: Log) -> None:
    assert len(rotated.files) == 4
    result = rotated.verify()
    assert result.ok, result


def test_missing_middle_file_is_named(rotated: Log) -> None:
    files = rotated.files
    result = verify_audit_logs([files[0], *files[2:]], hmac_sha256, checkpoint=rotated.checkpoint)
    assert not result.ok and result.file == files[2] and "file before it is missing" in result.reason


def test_files_given_twice_or_out_of_order_are_named_replay(rotated: Log) -> None:
    files = rotated.files
    result = verify_audit_logs([files[0], files[1], files[1], *files[2:]], hmac_sha256, checkpoint=None)
    assert not result.ok and "replay" in result.reason
    swapped = verify_audit_logs([files[1], files[0], *files[2:]], hmac_sha256, checkpoint=None)
    assert not swapped.ok and swapped.file == files[0]


def test_older_file_put_in_place_of_the_live_one_is_detected(rotated: Log) -> None:
    files = rotated.files
    shutil.copy(files[0], rotated.path)
    result = rotated.verify()
    assert not result.ok and result.file == rotated.path


def test_live_file_replaced_by_a_new_chain_is_named(rotated: Log) -> None:
    rotated.path.unlink()
    with AuditLog(rotated.path, hmac_sha256, checkpoint_seconds=SLOW) as fresh:
        fresh.record(event(1))
    result = verify_audit_logs(rotated.files, hmac_sha256, checkpoint=None)
    assert not result.ok and "new chain" in result.reason


# --- any single change is detected ---------------------------------------------------------

@functools.cache
def pristine() -> tuple[dict[str, bytes], AuditCheckpoint]:
    """A rotated, closed log built once: file name -> bytes, and its catalog checkpoint."""
    with tempfile.TemporaryDirectory() as directory:
        built = Log(Path(directory) / "audit.log", events=10, rotate_every=4)
        return {path.name: path.read_bytes() for path in built.files}, built.checkpoint


def mutate(data: bytes, choice: st.DataObject) -> bytes:
    lines = data.splitlines(keepends=True)
    how = choice.draw(st.sampled_from(["flip", "drop", "duplicate", "swap"]))
    if how == "flip":
        at = choice.draw(st.integers(0, len(data) - 1))
        mask = choice.draw(st.integers(1, 255))
        return data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :]
    i = choice.draw(st.integers(0, len(lines) - 1))
    if how == "drop":
        del lines[i]
    elif how == "duplicate":
        lines.insert(i, lines[i])
    else:
        j = choice.draw(st.integers(0, len(lines) - 1).filter(lambda j: j != i))
        lines[i], lines[j] = lines[j], lines[i]
    return b"".join(lines)


@given(st.data())
def test_any_single_change_to_a_rotated_log_fails_verification(choice: st.DataObject) -> None:
    files, checkpoint = pristine()
    names = sorted(files)  # rotated names sort by time; "audit.log" itself sorts first
    ordered = [*names[1:], names[0]]
    target = choice.draw(st.sampled_from(ordered))
    with tempfile.TemporaryDirectory() as directory:
        paths = []
        for name in ordered:
            path = Path(directory) / name
            data = files[name]
            path.write_bytes(mutate(data, choice) if name == target else data)
            paths.append(path)
        assert not verify_audit_logs(paths, hmac_sha256, checkpoint=None).ok
        assert not verify_audit_logs(paths, hmac_sha256, checkpoint=checkpoint).ok


@pytest.mark.parametrize(
    "change",
    [
        lambda o: o.update(mac="\u00e9" * 64),
        lambda o: o.update(kind=["close"]),
        lambda o: o.update(seq=True),
        lambda o: o.update(chain=None),
        lambda o: o.update(follows="x"),
        lambda o: o.update(checkpoint=1),
    ],
)
def test_hostile_checkpoint_fields_are_reported_not_raised(log: Log, change: Any) -> None:
    lines = log.lines()
    obj = json.loads(lines[-1])
    change(obj)
    lines[-1] = (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()
    log.write(lines)
    result = log.verify()
    assert not result.ok and result.first_bad_line == len(lines)


def test_hostile_break_marker_is_reported_not_raised(log: Log) -> None:
    lines = log.lines()
    marker = {
        "break": ["x"],
        "expected_chain": None,
        "expected_seq": None,
        "found_seq": None,
        "prev": hashlib.sha256(lines[-1]).hexdigest(),
        "seq": 99,
        "time": "t",
    }
    log.write([*lines, (json.dumps(marker, sort_keys=True, separators=(",", ":")) + "\n").encode()])
    result = log.verify()
    assert not result.ok and result.first_bad_line == len(lines) + 1
