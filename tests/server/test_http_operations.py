"""Operating the server: /healthz, /metrics, the audit log, graceful shutdown, and
ephemeral credentials."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import threading
import time
from typing import Any

import pytest
from server_harness import (
    ADMIN_ARN,
    ServerProcess,
    kms_call,
    make_client,
    send,
    start_server,
)

pytestmark = pytest.mark.server


def test_healthz(kms_server: ServerProcess) -> None:
    out = send(kms_server, "GET", "/healthz")
    assert out.status == 200
    assert out.json == {"status": "ok"}


def test_metrics_count_requests_by_operation_and_outcome(
    kms_server: ServerProcess, kms: Any
) -> None:
    kms.generate_random(NumberOfBytes=4)
    kms_call(kms_server, "DescribeKey", {})  # a ValidationException
    out = send(kms_server, "GET", "/metrics")
    assert out.status == 200
    assert out.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = out.body.decode()
    assert "# TYPE hsmkeys_requests_total counter" in text
    success = re.search(
        r'^hsmkeys_requests_total\{operation="GenerateRandom",outcome="Success"\} (\d+)$',
        text,
        re.M,
    )
    assert success is not None and int(success[1]) >= 1
    assert re.search(
        r'^hsmkeys_requests_total\{operation="DescribeKey",outcome="ValidationException"\} \d+$',
        text,
        re.M,
    )
    assert 'hsmkeys_request_duration_seconds_bucket{operation="GenerateRandom",le="+Inf"}' in text


def _audit_lines(server: ServerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.audit_log.read_text().splitlines()]


def _wait_for_request_ids(server: ServerProcess, ids: set[str]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        lines = _audit_lines(server)
        if ids <= {line.get("request_id") for line in lines} or time.monotonic() > deadline:
            return lines


def test_audit_log_has_one_line_per_request_and_no_plaintext(
    kms_server: ServerProcess, kms: Any
) -> None:
    key = kms.create_key()["KeyMetadata"]
    marker = b"PLAINTEXT-MARKER-" + os.urandom(8).hex().encode()
    responses = [
        kms_call(
            kms_server,
            "Encrypt",
            {
                "KeyId": key["Arn"],
                "Plaintext": base64.b64encode(marker).decode(),
                "EncryptionContext": {"ctx": "value"},
            },
        )
    ]
    blob = responses[0].json["CiphertextBlob"]
    responses.append(kms_call(kms_server, "Decrypt", {"CiphertextBlob": blob}))
    responses.append(
        kms_call(kms_server, "GenerateDataKey", {"KeyId": key["Arn"], "KeySpec": "AES_256"})
    )
    responses.append(kms_call(kms_server, "Decrypt", {"CiphertextBlob": "AAAA" * 20}))  # refused
    unsigned = [
        send(kms_server, "POST", "/", b"{}", {"X-Amz-Target": "TrentService.ListKeys"}) for _ in range(5)
    ]
    ids = {r.headers["x-amzn-requestid"] for r in responses}
    assert len(ids) == len(responses)

    lines = _wait_for_request_ids(kms_server, ids)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_id.setdefault(line.get("request_id", ""), []).append(line)
    for response in responses:
        entries = by_id.get(response.headers["x-amzn-requestid"], [])
        assert len(entries) == 1, (response.status, response.body[:200], entries)
    encrypt_line = by_id[responses[0].headers["x-amzn-requestid"]][0]
    assert encrypt_line["operation"] == "Encrypt"
    assert encrypt_line["outcome"] == "Success"
    assert encrypt_line["principal"] == ADMIN_ARN
    assert encrypt_line["key_arns"] == [key["Arn"]]
    assert encrypt_line["decision"].startswith("allow ")
    assert encrypt_line["seq"] >= 1 and len(encrypt_line["prev"]) == 64
    assert (
        by_id[responses[3].headers["x-amzn-requestid"]][0]["outcome"]
        == "InvalidCiphertextException"
    )
    # Unauthenticated refusals get no line each: one summary per source per second, with a count.
    for response in unsigned:
        assert response.headers["x-amzn-requestid"] not in by_id
    deadline = time.monotonic() + 5
    summaries: list[dict[str, Any]] = []
    while not summaries and time.monotonic() < deadline:
        summaries = [
            line for line in _audit_lines(kms_server)
            if line.get("outcome") == "MissingAuthenticationTokenException" and line.get("count")
        ]
        time.sleep(0.1)
    assert summaries and summaries[0]["principal"] is None and summaries[0]["source"] == "127.0.0.1"
    assert sum(line["count"] for line in summaries) >= len(unsigned)

    raw = kms_server.audit_log.read_bytes()
    data_key = base64.b64decode(responses[2].json["Plaintext"])
    for secret in (marker, base64.b64encode(marker), data_key, base64.b64encode(data_key)):
        assert secret not in raw
    assert b"value" not in raw  # nor the encryption context


def test_sigterm_lets_an_in_flight_request_finish_then_exits_cleanly() -> None:
    # Empty credentials make the server generate a pair; the instance takes the printed one.
    server = start_server(env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
    try:
        printed = dict(line.split("=", 1) for line in server.output if line.startswith("AWS_"))
        assert printed == {
            "AWS_ACCESS_KEY_ID": server.access_key_id,
            "AWS_SECRET_ACCESS_KEY": server.secret_access_key,
        }
        client = make_client(server)
        assert len(client.generate_random(NumberOfBytes=8)["Plaintext"]) == 8
        store = server.audit_log.parent
        assert store.is_dir()

        result: dict[str, Any] = {}

        def slow_call() -> None:
            try:  # RSA-4096 generation in SoftHSM2 takes ~1-2 s, occasionally much less
                result["out"] = client.create_key(KeySpec="RSA_4096", KeyUsage="SIGN_VERIFY")
            except Exception as exc:  # reported by the assertion below
                result["error"] = exc

        for _ in range(5):  # until a request is still running when SIGTERM is sent
            result.clear()
            thread = threading.Thread(target=slow_call)
            thread.start()
            time.sleep(0.2)
            if thread.is_alive():
                break
            thread.join()
        else:
            pytest.fail("every RSA-4096 CreateKey finished within 0.2 s")
        server.process.send_signal(signal.SIGTERM)
        thread.join(timeout=30)
        assert "error" not in result, result
        assert result["out"]["KeyMetadata"]["KeySpec"] == "RSA_4096"
        assert server.process.wait(timeout=30) == 0
        assert not store.exists(), "the ephemeral store was not removed"
    finally:
        server.stop()


def test_every_served_operation_of_the_model_is_audited_by_name(kms_server: ServerProcess) -> None:
    """One request per operation the server serves (most of them refused for their empty
    body): each gets exactly one outcome line, named by its KMS operation."""
    from hsmkeys.operations import OPERATIONS

    sent: dict[str, str] = {}
    for name in sorted(OPERATIONS):
        response = kms_call(kms_server, name, {})
        assert response.status < 500, (name, response.status)
        sent[response.headers["x-amzn-requestid"]] = name
    lines = _wait_for_request_ids(kms_server, set(sent))
    for request_id, name in sent.items():
        done = [x for x in lines if x.get("request_id") == request_id and x.get("phase") == "done"]
        assert len(done) == 1 and done[0]["operation"] == name, (name, done)
        assert done[0]["principal"] == ADMIN_ARN
