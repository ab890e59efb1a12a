"""Two worker processes sharing one token and catalog (``--workers 2``)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from server_harness import RawResponse, ServerProcess, kms_call, send

from hsmkeys.audit import writer_log_path

pytestmark = pytest.mark.server

MAX_TRIES = 200


def on_each_worker(call: Callable[[], RawResponse], workers: int = 2) -> dict[str, RawResponse]:
    """Repeat ``call`` (fresh connections) until each of ``workers`` pids has answered once."""
    seen: dict[str, RawResponse] = {}
    for _ in range(MAX_TRIES):
        response = call()
        seen.setdefault(response.worker, response)
        if len(seen) == workers:
            return seen
    raise AssertionError(f"only workers {sorted(seen)} answered in {MAX_TRIES} requests")


def test_two_distinct_worker_processes_answer(kms_server_two_workers: ServerProcess) -> None:
    seen = on_each_worker(lambda: send(kms_server_two_workers, "GET", "/healthz"))
    assert all(r.status == 200 for r in seen.values())
    assert str(kms_server_two_workers.process.pid) not in seen  # the supervisor never serves


def test_key_created_on_one_worker_is_usable_on_the_other(
    kms_server_two_workers: ServerProcess,
) -> None:
    server = kms_server_two_workers
    created = kms_call(server, "CreateKey", {"Description": "cross-worker"})
    assert created.status == 200
    key_arn = created.json["KeyMetadata"]["Arn"]
    sealed = on_each_worker(
        lambda: kms_call(server, "Encrypt", {"KeyId": key_arn, "Plaintext": "aGVsbG8="})
    )
    for worker, response in sealed.items():
        assert response.status == 200, (worker, response.body)
        blob = response.json["CiphertextBlob"]
        # Every worker decrypts what every worker encrypted.
        opened = on_each_worker(lambda b=blob: kms_call(server, "Decrypt", {"CiphertextBlob": b}))
        assert {r.json["Plaintext"] for r in opened.values()} == {"aGVsbG8="}


def test_disable_on_one_worker_is_refused_at_once_by_the_other(
    kms_server_two_workers: ServerProcess,
) -> None:
    server = kms_server_two_workers
    key_arn = kms_call(server, "CreateKey", {}).json["KeyMetadata"]["Arn"]
    # Warm both workers' handle caches for this key first.
    on_each_worker(lambda: kms_call(server, "Encrypt", {"KeyId": key_arn, "Plaintext": "eA=="}))
    disabled_by = kms_call(server, "DisableKey", {"KeyId": key_arn})
    assert disabled_by.status == 200
    refused = on_each_worker(
        lambda: kms_call(server, "Encrypt", {"KeyId": key_arn, "Plaintext": "eA=="})
    )
    assert {r.error_code for r in refused.values()} == {"DisabledException"}
    assert disabled_by.worker in refused


def test_alias_and_rotation_are_shared(kms_server_two_workers: ServerProcess) -> None:
    server = kms_server_two_workers
    key_arn = kms_call(server, "CreateKey", {}).json["KeyMetadata"]["Arn"]
    alias = f"alias/workers-{uuid.uuid4().hex[:8]}"
    assert (
        kms_call(server, "CreateAlias", {"AliasName": alias, "TargetKeyId": key_arn}).status == 200
    )
    # KMS names the key by key id or ARN here, never by alias.
    assert kms_call(server, "RotateKeyOnDemand", {"KeyId": alias}).error_code == "NotFoundException"
    assert kms_call(server, "RotateKeyOnDemand", {"KeyId": key_arn}).status == 200
    seen = on_each_worker(lambda: kms_call(server, "ListKeyRotations", {"KeyId": key_arn}))
    assert all(len(r.json["Rotations"]) == 1 for r in seen.values())
    encrypted = on_each_worker(
        lambda: kms_call(server, "Encrypt", {"KeyId": alias, "Plaintext": "eA=="})
    )
    assert {r.json["KeyId"] for r in encrypted.values()} == {key_arn}


def _lock_holders(lock_file: Path) -> list[int]:
    """Pids holding a flock on ``lock_file``, from /proc/locks."""
    inode = lock_file.stat().st_ino
    holders = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].endswith(f":{inode}"):
            holders.append(int(fields[4]))
    return holders


def test_exactly_one_worker_holds_the_maintenance_lock(
    kms_server_two_workers: ServerProcess,
) -> None:
    server = kms_server_two_workers
    workers = {int(pid) for pid in on_each_worker(lambda: send(server, "GET", "/healthz"))}
    lock_file = server.audit_log.parent / "catalog.sqlite3.maintenance.lock"
    deadline = time.monotonic() + 10
    while not lock_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    holders = _lock_holders(lock_file)
    assert len(holders) == 1
    assert holders[0] in workers


def test_each_worker_serves_its_own_metrics(kms_server_two_workers: ServerProcess) -> None:
    server = kms_server_two_workers
    on_each_worker(lambda: kms_call(server, "GenerateRandom", {"NumberOfBytes": 1}))
    pages = on_each_worker(lambda: send(server, "GET", "/metrics"))
    series = 'hsmkeys_requests_total{operation="GenerateRandom",outcome="Success"}'
    assert all(series in page.body.decode() for page in pages.values())


def test_a_killed_worker_is_replaced(kms_server_two_workers: ServerProcess) -> None:
    server = kms_server_two_workers
    before = on_each_worker(lambda: send(server, "GET", "/healthz"))
    victim = int(next(iter(before)))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        try:
            now = on_each_worker(lambda: send(server, "GET", "/healthz"))
        except (AssertionError, OSError):
            now = {}
        if len(now) == 2 and str(victim) not in now:
            break
        assert time.monotonic() < deadline, "no replacement worker answered"
        time.sleep(0.2)
    key_arn = kms_call(server, "CreateKey", {}).json["KeyMetadata"]["Arn"]
    answered = on_each_worker(
        lambda: kms_call(server, "Encrypt", {"KeyId": key_arn, "Plaintext": "eA=="})
    )
    assert all(r.status == 200 for r in answered.values())


def test_each_worker_writes_its_own_audit_chain(kms_server_two_workers: ServerProcess) -> None:
    server = kms_server_two_workers
    key_arn = kms_call(server, "CreateKey", {}).json["KeyMetadata"]["Arn"]
    answered = on_each_worker(lambda: kms_call(server, "Encrypt", {"KeyId": key_arn, "Plaintext": "aGk="}))
    chains = [server.audit_log, writer_log_path(server.audit_log, 2)]
    deadline = time.monotonic() + 10
    while not all(path.exists() for path in chains):
        assert time.monotonic() < deadline, "a worker's chain file never appeared"
        time.sleep(0.05)
    request_ids = {response.headers["x-amzn-requestid"] for response in answered.values()}
    found: dict[str, Path] = {}
    for path in chains:
        lines = path.read_bytes().splitlines(keepends=True)
        records = [json.loads(line) for line in lines]
        assert records[0].get("kind") == "genesis"  # a chain of its own from its first line
        for before, record in zip(lines, records[1:], strict=False):
            assert record["seq"] == json.loads(before)["seq"] + 1
            assert record.get("prev", record.get("chain")) == hashlib.sha256(before).hexdigest()
        found.update({r["request_id"]: path for r in records if r.get("request_id") in request_ids})
    # Both workers' Encrypts are audited, each in its own worker's chain.
    assert set(found) == request_ids and set(found.values()) == set(chains)
