"""Closed-loop load generator for AWS JSON 1.1 (KMS) endpoints: the same for every server.

Each client process holds ONE keep-alive HTTP/1.1 connection (``http.client``) and
replays ONE SigV4-signed request (botocore's signer, signed once per process). The
signature is re-made when it is older than ``resign_after`` seconds, well inside
the 5-minute skew window every SigV4 server allows, so a replay is always a request
the server must accept. Each client sends a fixed number of requests after a
warm-up; all clients start together (a barrier) and the figure is

    req/s = successful requests / (last client's end - common start)

Any non-2xx answer or dropped connection is counted as an error (the connection is
re-opened) and reported; a run with errors is not a valid measurement.

Importing this module is cheap (no botocore, no pkcs11) so that ``bench.py`` can
spawn clients without loading the HSM library. Standalone use::

    .venv/bin/python scripts/loadgen.py --endpoint http://127.0.0.1:7300 \
        --key-id <uuid> --clients 4 --requests 5000
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing.synchronize import Barrier
from typing import Any
from urllib.parse import urlsplit

CONTENT_TYPE = "application/x-amz-json-1.1"
WORKER_HEADER = "x-hsmkeys-worker"  # which server process answered (absent on moto)
_READY_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One load run: who to hit, with what, how hard."""

    endpoint: str  # http://HOST:PORT
    access_key_id: str
    secret_access_key: str
    region: str
    target: str  # KMS operation, e.g. "Encrypt"
    payload: dict[str, Any]  # request JSON (bytes already base64)
    clients: int = 4
    requests_per_client: int = 2500
    warmup_per_client: int = 100
    resign_after: float = 60.0
    timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class ClientResult:
    ok: int
    errors: int
    started: float  # time.time() after the barrier
    ended: float
    latencies_us: list[float]
    workers: dict[str, int]
    first_error: str | None


@dataclass(frozen=True, slots=True)
class LoadResult:
    clients: int
    requests: int  # successful, measured
    errors: int
    seconds: float
    req_per_s: float
    p50_ms: float
    p99_ms: float
    workers: dict[str, int] = field(default_factory=dict)  # answers per server process
    first_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def encrypt_payload(key_id: str, plaintext: bytes = b"\x00" * 32) -> dict[str, Any]:
    """The Encrypt request body every run uses (32-byte plaintext, no context)."""
    return {"KeyId": key_id, "Plaintext": base64.b64encode(plaintext).decode("ascii")}


def signed_headers(spec: LoadSpec, body: bytes) -> dict[str, str]:
    """SigV4 headers for POST / with ``body``, made by botocore's own signer."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    netloc = urlsplit(spec.endpoint).netloc
    request = AWSRequest(
        method="POST",
        url=spec.endpoint.rstrip("/") + "/",
        data=body,
        headers={
            "Host": netloc,
            "Content-Type": CONTENT_TYPE,
            "X-Amz-Target": f"TrentService.{spec.target}",
        },
    )
    SigV4Auth(Credentials(spec.access_key_id, spec.secret_access_key), "kms", spec.region).add_auth(
        request
    )
    headers = {name: str(value) for name, value in request.headers.items()}
    headers["Content-Length"] = str(len(body))
    return headers


def _connect(spec: LoadSpec) -> http.client.HTTPConnection:
    parts = urlsplit(spec.endpoint)
    assert parts.hostname is not None and parts.port is not None, spec.endpoint
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=spec.timeout)


def _client(spec: LoadSpec, barrier: Barrier, results: mp.Queue[ClientResult | str]) -> None:
    """One client process: warm up, wait for the others, send the measured requests."""
    try:
        body = json.dumps(spec.payload).encode("utf-8")
        headers = signed_headers(spec, body)
        signed_at = time.monotonic()
        conn = _connect(spec)
        ok = errors = 0
        first_error: str | None = None
        workers: Counter[str] = Counter()
        latencies: list[float] = []

        def send(measure: bool) -> None:
            nonlocal conn, ok, errors, first_error, headers, signed_at
            if time.monotonic() - signed_at > spec.resign_after:
                headers = signed_headers(spec, body)
                signed_at = time.monotonic()
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/", body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = _connect(spec)
                return
            elapsed = time.perf_counter() - t0
            if response.status != 200 or b"CiphertextBlob" not in data:
                errors += 1
                first_error = first_error or f"HTTP {response.status}: {data[:200]!r}"
                return
            if measure:
                ok += 1
                latencies.append(elapsed * 1e6)
                worker = response.getheader(WORKER_HEADER)
                if worker is not None:
                    workers[worker] += 1

        for _ in range(spec.warmup_per_client):
            send(False)
        if errors and first_error is not None:
            results.put(f"warm-up failed: {first_error}")
            barrier.abort()
            return
        barrier.wait(_READY_TIMEOUT_S)
        started = time.time()
        for _ in range(spec.requests_per_client):
            send(True)
        ended = time.time()
        conn.close()
        results.put(ClientResult(ok, errors, started, ended, latencies, dict(workers), first_error))
    except Exception as exc:  # reported to the parent, which fails the run
        results.put(f"client {os.getpid()} failed: {type(exc).__name__}: {exc}")
        barrier.abort()


def run_load(spec: LoadSpec) -> LoadResult:
    """Run ``spec.clients`` client processes (spawned) against the endpoint; aggregate."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(spec.clients)
    results: mp.Queue[ClientResult | str] = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(spec, barrier, results), daemon=True) for _ in range(spec.clients)]
    for proc in procs:
        proc.start()
    collected: list[ClientResult] = []
    failures: list[str] = []
    deadline = time.monotonic() + _READY_TIMEOUT_S + spec.timeout * spec.requests_per_client
    try:
        while len(collected) + len(failures) < spec.clients:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError("load generator clients did not finish in time")
            try:
                item = results.get(timeout=min(remaining, 5.0))
            except Exception:  # queue.Empty: check the clients are still alive
                if not any(p.is_alive() for p in procs):
                    raise RuntimeError("load generator clients died without reporting") from None
                continue
            if isinstance(item, str):
                failures.append(item)
            else:
                collected.append(item)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if failures:
        raise RuntimeError("; ".join(failures[:3]))
    ok = sum(r.ok for r in collected)
    errors = sum(r.errors for r in collected)
    seconds = max(r.ended for r in collected) - min(r.started for r in collected)
    latencies = sorted(x for r in collected for x in r.latencies_us)
    workers: Counter[str] = Counter()
    for r in collected:
        workers.update(r.workers)
    return LoadResult(
        clients=spec.clients,
        requests=ok,
        errors=errors,
        seconds=seconds,
        req_per_s=ok / seconds if seconds > 0 else 0.0,
        p50_ms=statistics.median(latencies) / 1000 if latencies else 0.0,
        p99_ms=latencies[int(0.99 * (len(latencies) - 1))] / 1000 if latencies else 0.0,
        workers=dict(workers),
        first_error=next((r.first_error for r in collected if r.first_error), None),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--endpoint", required=True, help="http://HOST:PORT")
    parser.add_argument("--key-id", required=True)
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=10_000, help="total, split across clients")
    parser.add_argument("--warmup", type=int, default=100, help="per client")
    args = parser.parse_args(argv)
    access_key = os.environ.get("AWS_ACCESS_KEY_ID", "")
    secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    if not access_key or not secret_key:
        print("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", file=sys.stderr)
        return 2
    spec = LoadSpec(
        endpoint=args.endpoint,
        access_key_id=access_key,
        secret_access_key=secret_key,
        region=args.region,
        target="Encrypt",
        payload=encrypt_payload(args.key_id),
        clients=args.clients,
        requests_per_client=max(1, args.requests // args.clients),
        warmup_per_client=args.warmup,
    )
    result = run_load(spec)
    print(json.dumps(result.as_dict()))
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
