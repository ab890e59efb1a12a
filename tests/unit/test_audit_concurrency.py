"""The audit writer under threads, forked processes and its background checkpoint timer."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from audit_helpers import SLOW, MemoryCheckpoints, hmac_sha256

from hsmkeys.audit import AuditEvent, AuditLog, audit_log_files, verify_audit_logs


def event(request_id: str) -> AuditEvent:
    return AuditEvent(
        time=datetime.now(UTC), request_id=request_id, principal=None, operation="Decrypt"
    )


def record_from_threads(log: AuditLog, prefix: str, threads: int, each: int) -> None:
    def work(t: int) -> None:
        for i in range(each):
            log.record(event(f"{prefix}-{t}-{i}"))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def request_ids(paths: list[Path]) -> list[str]:
    return [
        obj["request_id"]
        for path in paths
        for obj in map(json.loads, path.read_bytes().splitlines())
        if "request_id" in obj
    ]


def test_threads_appending_to_one_log_give_one_valid_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    store = MemoryCheckpoints()
    with AuditLog(path, hmac_sha256, checkpoints=store, checkpoint_lines=25) as log:
        record_from_threads(log, "t", threads=4, each=50)
    ids = request_ids([path])
    assert len(ids) == len(set(ids)) == 200
    result = verify_audit_logs([path], hmac_sha256, checkpoint=store.get_audit_checkpoint(log.log_id))
    assert result.ok, result


def _child(log: AuditLog, name: str) -> None:
    # Uses the log inherited through fork: it must reopen the file and lock on its own.
    record_from_threads(log, name, threads=2, each=40)
    log.close()


def test_forked_processes_and_threads_appending_to_one_log_give_one_valid_chain(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    store = MemoryCheckpoints()
    log = AuditLog(path, hmac_sha256, checkpoints=store, checkpoint_lines=30, max_bytes=16_000)
    fork = multiprocessing.get_context("fork")
    children = [fork.Process(target=_child, args=(log, f"p{n}")) for n in range(2)]
    for child in children:
        child.start()
    record_from_threads(log, "parent", threads=2, each=40)
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    log.close()
    files = audit_log_files(path)
    assert len(files) > 1  # rotation happened while other processes were writing
    ids = request_ids(files)
    assert len(ids) == len(set(ids)) == 3 * 80
    # The children stored their checkpoints in their own copy of the store: check with
    # the parent's (its close came last) and without any.
    assert verify_audit_logs(files, hmac_sha256, checkpoint=None).ok
    result = verify_audit_logs(files, hmac_sha256, checkpoint=store.get_audit_checkpoint(log.log_id))
    assert result.ok, result


def test_timer_signs_an_idle_tail_within_checkpoint_seconds(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    store = MemoryCheckpoints()
    with AuditLog(path, hmac_sha256, checkpoints=store, checkpoint_seconds=0.3) as log:
        log.record(event("idle"))
        assert "request_id" in json.loads(path.read_bytes().splitlines()[-1])  # unsigned yet
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            last = json.loads(path.read_bytes().splitlines()[-1])
            stored = store.get_audit_checkpoint(log.log_id)
            if stored is not None and stored.sequence == last["seq"]:
                break  # signed in the file, then stored in the catalog
            time.sleep(0.02)
        assert last.get("kind") == "timer"
        assert store.stored[log.log_id].sequence == last["seq"]
        assert verify_audit_logs([path], hmac_sha256, checkpoint=None).ok


def test_close_stops_the_timer_thread(tmp_path: Path) -> None:
    before = threading.active_count()
    log = AuditLog(tmp_path / "audit.log", hmac_sha256, checkpoint_seconds=SLOW)
    log.record(event("one"))
    assert threading.active_count() == before + 1
    log.close()
    assert threading.active_count() == before
    last = json.loads((tmp_path / "audit.log").read_bytes().splitlines()[-1])
    assert last["kind"] == "close"


def test_two_writers_in_one_process_share_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with (
        AuditLog(path, hmac_sha256, checkpoint_seconds=SLOW) as first,
        AuditLog(path, hmac_sha256, checkpoint_seconds=SLOW) as second,
    ):
        for i in range(5):
            first.record(event(f"a{i}"))
            second.record(event(f"b{i}"))
        second.rotate()
        first.record(event("after-rotate"))  # follows the rotation done by the other writer
    files = audit_log_files(path)
    assert len(files) == 2 and "after-rotate" in request_ids([path])
    assert verify_audit_logs(files, hmac_sha256, checkpoint=None).ok


def _child_records_one(log: AuditLog) -> None:
    log.record(event("child"))
    log.close()


def test_fork_while_the_timer_is_pending_keeps_one_chain_and_the_parent_still_signs(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, hmac_sha256, checkpoint_seconds=0.3)
    log.record(event("parent-before"))  # unsigned: the parent's timer is armed
    child = multiprocessing.get_context("fork").Process(target=_child_records_one, args=(log,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    log.record(event("parent-after"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if json.loads(path.read_bytes().splitlines()[-1]).get("kind") == "timer":
            break
        time.sleep(0.02)
    assert json.loads(path.read_bytes().splitlines()[-1]).get("kind") == "timer"
    log.close()
    assert request_ids([path]) == ["parent-before", "child", "parent-after"]
    assert verify_audit_logs([path], hmac_sha256, checkpoint=None).ok
