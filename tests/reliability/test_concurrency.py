"""Concurrency: 2 workers x 8 client threads doing Encrypt/Decrypt/GenerateDataKey/Sign
while an admin client rotates, disables/enables, schedules/cancels deletion and changes
policies. Zero 5xx; every refusal is the KMS error the key's state calls for; every
successful Encrypt's blob decrypts afterwards. 10 s in make test, 120 s in make soak."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from hsmkeys.testing.server import EphemeralKms, start_ephemeral_kms

from .harness import soak_number

# What a refusal may be while the admin changes the key's state: Disabled -> DisabledException,
# PendingDeletion -> KMSInvalidStateException. Nothing else is expected, and each refusal
# must fall in a time the key was in the state that calls for it.
ALLOWED_REFUSALS = {"DisabledException", "KMSInvalidStateException"}
STATE_FOR = {"DisabledException": "Disabled", "KMSInvalidStateException": "PendingDeletion"}


def _state_periods(events: list[tuple[float, float, str]], until: float) -> list[tuple[float, float, str]]:
    """(from, to, state) for one key: a change lands somewhere inside its admin call, so a
    state is possibly in force from its call's start to the end of the next change's call."""
    periods = []
    for i, (start, _, state) in enumerate(events):
        end = events[i + 1][1] if i + 1 < len(events) else until
        periods.append((start, end, state))
    return periods


@pytest.fixture(scope="module")
def kms2() -> Iterator[EphemeralKms]:
    with start_ephemeral_kms("--workers", "2") as server:
        yield server


def _client(kms: EphemeralKms) -> Any:
    return kms.client(config=Config(max_pool_connections=4, retries={"max_attempts": 1}))


def _run(kms: EphemeralKms, seconds: float) -> dict[str, Any]:
    admin = _client(kms)
    sym = admin.create_key()["KeyMetadata"]["KeyId"]
    signing = admin.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    policy = admin.get_key_policy(KeyId=sym, PolicyName="default")["Policy"]
    stop = threading.Event()
    lock = threading.Lock()
    counts: collections.Counter[str] = collections.Counter()
    unexpected: list[str] = []
    blobs: list[tuple[bytes, bytes]] = []
    refusals: list[tuple[str, str, float, float]] = []  # (key, code, request start, request end)
    changes: dict[str, list[tuple[float, float, str]]] = {"sym": [(0.0, 0.0, "Enabled")], "signing": [(0.0, 0.0, "Enabled")]}

    def changed(key: str, state: str, call: Any) -> None:
        start = time.monotonic()
        call()
        with lock:
            changes[key].append((start, time.monotonic(), state))

    def record(kind: str, detail: str | None = None) -> None:
        with lock:
            counts[kind] += 1
            if detail is not None:
                unexpected.append(detail)

    def worker(n: int) -> None:
        client = _client(kms)
        i = 0
        while not stop.is_set():
            i += 1
            op = ("Encrypt", "Decrypt", "GenerateDataKey", "Sign")[i % 4]
            started = time.monotonic()
            try:
                if op == "Encrypt":
                    pt = f"{n}-{i}".encode()
                    blob = client.encrypt(KeyId=sym, Plaintext=pt)["CiphertextBlob"]
                    with lock:
                        blobs.append((blob, pt))
                elif op == "Decrypt":
                    with lock:
                        pair = blobs[-1] if blobs else None
                    if pair is not None:
                        assert client.decrypt(CiphertextBlob=pair[0])["Plaintext"] == pair[1]
                elif op == "GenerateDataKey":
                    out = client.generate_data_key(KeyId=sym, KeySpec="AES_256")
                    with lock:
                        blobs.append((out["CiphertextBlob"], out["Plaintext"]))
                else:
                    client.sign(KeyId=signing, Message=b"m", SigningAlgorithm="ECDSA_SHA_256")
                record("ok")
            except ClientError as exc:
                code = exc.response["Error"]["Code"]
                status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
                if status >= 500 or code not in ALLOWED_REFUSALS:
                    record(f"{status} {code}", f"{op}: {status} {code} {exc.response['Error'].get('Message')}")
                else:
                    record(code)
                    with lock:
                        refusals.append(("signing" if op == "Sign" else "sym", code, started, time.monotonic()))

    def admin_loop() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                step = i % 5
                if step == 0:
                    admin.rotate_key_on_demand(KeyId=sym) if i % 50 == 0 else admin.describe_key(KeyId=sym)
                elif step == 1:
                    changed("sym", "Disabled", lambda: admin.disable_key(KeyId=sym))
                    changed("signing", "Disabled", lambda: admin.disable_key(KeyId=signing))
                elif step == 2:
                    changed("sym", "Enabled", lambda: admin.enable_key(KeyId=sym))
                    changed("signing", "Enabled", lambda: admin.enable_key(KeyId=signing))
                elif step == 3:
                    changed("sym", "PendingDeletion",
                            lambda: admin.schedule_key_deletion(KeyId=sym, PendingWindowInDays=7))
                    changed("sym", "Disabled", lambda: admin.cancel_key_deletion(KeyId=sym))
                    changed("sym", "Enabled", lambda: admin.enable_key(KeyId=sym))
                else:
                    admin.put_key_policy(KeyId=sym, PolicyName="default", Policy=policy)
                record("admin")
            except ClientError as exc:
                status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
                code = exc.response["Error"]["Code"]
                if status >= 500 or code != "LimitExceededException":
                    record(f"admin {status} {code}", f"admin: {status} {code}")
            time.sleep(0.02)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    threads.append(threading.Thread(target=admin_loop))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(30)
    finished = time.monotonic()
    for key, code, start, end in refusals:
        wanted = STATE_FOR[code]
        periods = _state_periods(changes[key], finished)
        if not any(state == wanted and p_start <= end and start <= p_end for p_start, p_end, state in periods):
            unexpected.append(f"{code} on {key} at {start:.3f}-{end:.3f}: the key was never {wanted} then")
    admin.enable_key(KeyId=sym)
    verifier = _client(kms)
    for blob, pt in blobs:
        assert verifier.decrypt(CiphertextBlob=blob)["Plaintext"] == pt
    return {"counts": dict(counts), "unexpected": unexpected, "blobs": len(blobs), "refusals_checked": len(refusals)}


def _check(result: dict[str, Any]) -> None:
    print(f"\nconcurrency: {sum(result['counts'].values())} requests, by outcome {result['counts']}, "
          f"{result['blobs']} ciphertexts decrypted afterwards, "
          f"{result['refusals_checked']} refusals matched to the key's state")
    assert result["unexpected"] == []
    assert result["counts"].get("ok", 0) > 50


@pytest.mark.server
def test_crypto_under_state_changes(kms2: EphemeralKms) -> None:
    _check(_run(kms2, 10))


@pytest.mark.soak
@pytest.mark.server
def test_crypto_under_state_changes_soak(kms2: EphemeralKms) -> None:
    _check(_run(kms2, soak_number("CONCURRENCY_SECONDS", 120, 120)))
