"""Closed-loop load generator for AWS JSON 1.1 (KMS) endpoints: the same for every server.

Each client process holds ONE keep-alive HTTP/1.1 connection (a lean socket client) and
replays ONE SigV4-signed request (botocore's signer, signed once per process). The
signature is re-made when it is older than ``resign_after`` seconds, well inside
the 5-minute skew window every SigV4 server allows, so a replay is always a request
the server must accept. After a warm-up, all clients start together (a barrier) and
draw the run's fixed request count from one shared counter in small batches, so a
client whose server process answers faster sends more (a connection pinned to a
busy worker does not hold the run open while another worker idles); the figure is

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
import json
import multiprocessing as mp
import os
import queue
import socket
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
    max_seconds: float = 120.0  # a client stops early after this long (the run is marked truncated)


@dataclass(frozen=True, slots=True)
class ClientResult:
    ok: int
    errors: int
    started: float  # time.time() after the barrier
    ended: float
    latencies_us: list[float]
    workers: dict[str, int]
    first_error: str | None
    cpu_s: float  # this client's own CPU time during the measured requests


@dataclass(frozen=True, slots=True)
class LoadResult:
    clients: int
    requests: int  # successful, measured
    errors: int
    seconds: float
    req_per_s: float
    p50_ms: float
    p99_ms: float
    truncated: bool = False  # some client hit max_seconds before sending all its requests
    workers: dict[str, int] = field(default_factory=dict)  # answers per server process
    first_error: str | None = None
    client_cpu_cores: float = 0.0  # CPU the generator itself used, in cores (shares the machine)

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


class _Connection:
    """A lean keep-alive HTTP/1.1 client: pre-encoded request bytes out, one response in.

    http.client spends more CPU per request than a fast server does, and the load
    generator shares the machine with the server under test; this one does only what a
    fixed POST needs (status line, Content-Length, body).
    """

    def __init__(self, spec: LoadSpec) -> None:
        parts = urlsplit(spec.endpoint)
        assert parts.hostname is not None and parts.port is not None, spec.endpoint
        self._sock = socket.create_connection((parts.hostname, parts.port), timeout=spec.timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""
        self.reusable = True

    def exchange(self, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send ``request``; return (status, lower-cased headers, body)."""
        self._sock.sendall(request)
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            self._buffer += self._recv()
        head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
        status_line, *lines = head.split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"0"))
        while len(self._buffer) < length:
            self._buffer += self._recv()
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        self.reusable = not (
            status_line.startswith(b"HTTP/1.0") or headers.get(b"connection", b"").lower() == b"close"
        )
        return int(status_line.split(b" ", 2)[1]), headers, body

    def _recv(self) -> bytes:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        return chunk

    def close(self) -> None:
        self._sock.close()


def _connect(spec: LoadSpec) -> _Connection:
    return _Connection(spec)


def _request_bytes(spec: LoadSpec, body: bytes) -> bytes:
    headers = signed_headers(spec, body)
    lines = [b"POST / HTTP/1.1"] + [f"{k}: {v}".encode("latin-1") for k, v in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


_BATCH = 16  # requests a client takes from the shared count at a time


def _take(tickets: Any) -> int:
    with tickets.get_lock():
        n = min(_BATCH, tickets.value)
        tickets.value -= n
        return int(n)


def _client(
    spec: LoadSpec, barrier: Barrier, tickets: Any, results: mp.Queue[ClientResult | str]
) -> None:
    """One client process: warm up, wait for the others, send the measured requests."""
    try:
        body = json.dumps(spec.payload).encode("utf-8")
        request = _request_bytes(spec, body)
        signed_at = time.monotonic()
        conn = _connect(spec)
        ok = errors = 0
        first_error: str | None = None
        workers: Counter[str] = Counter()
        latencies: list[float] = []

        def send(measure: bool) -> None:
            nonlocal conn, ok, errors, first_error, request, signed_at
            if time.monotonic() - signed_at > spec.resign_after:
                request = _request_bytes(spec, body)
                signed_at = time.monotonic()
            t0 = time.perf_counter()
            try:
                if not conn.reusable:  # the server closes after each answer (HTTP/1.0 style)
                    conn.close()
                    conn = _connect(spec)
                status, response_headers, data = conn.exchange(request)
            except (OSError, ValueError, IndexError) as exc:
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = _connect(spec)
                return
            elapsed = time.perf_counter() - t0
            if status != 200 or b"CiphertextBlob" not in data:
                errors += 1
                first_error = first_error or f"HTTP {status}: {data[:200]!r}"
                return
            if measure:
                ok += 1
                latencies.append(elapsed * 1e6)
                worker = response_headers.get(WORKER_HEADER.encode())
                if worker is not None:
                    workers[worker.decode()] += 1

        for _ in range(spec.warmup_per_client):
            send(False)
        if errors and first_error is not None:
            results.put(f"warm-up failed: {first_error}")
            barrier.abort()
            return
        barrier.wait(_READY_TIMEOUT_S)
        started = time.time()
        cpu_start = time.process_time()
        stop_at = time.monotonic() + spec.max_seconds
        while (n := _take(tickets)) and time.monotonic() <= stop_at:
            for _ in range(n):
                send(True)
        ended = time.time()
        cpu = time.process_time() - cpu_start
        conn.close()
        results.put(ClientResult(ok, errors, started, ended, latencies, dict(workers), first_error, cpu))
    except Exception as exc:  # reported to the parent, which fails the run
        results.put(f"client {os.getpid()} failed: {type(exc).__name__}: {exc}")
        barrier.abort()


def run_load(spec: LoadSpec) -> LoadResult:
    """Run ``spec.clients`` client processes (spawned) against the endpoint; aggregate."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(spec.clients)
    tickets = ctx.Value("q", spec.clients * spec.requests_per_client)
    results: mp.Queue[ClientResult | str] = ctx.Queue()
    procs = [
        ctx.Process(target=_client, args=(spec, barrier, tickets, results), daemon=True)
        for _ in range(spec.clients)
    ]
    for proc in procs:
        proc.start()
    collected: list[ClientResult] = []
    failures: list[str] = []
    deadline = time.monotonic() + _READY_TIMEOUT_S + spec.max_seconds + 2 * spec.timeout
    finished = False
    try:
        while len(collected) + len(failures) < spec.clients:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError("load generator clients did not finish in time")
            try:
                item = results.get(timeout=min(remaining, 5.0))
            except queue.Empty:  # check the clients are still alive
                if not any(p.is_alive() for p in procs):
                    raise RuntimeError("load generator clients died without reporting") from None
                continue
            if isinstance(item, str):
                failures.append(item)
            else:
                collected.append(item)
        finished = True
    finally:
        for proc in procs:
            if finished:
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
        truncated=ok + errors < spec.clients * spec.requests_per_client,
        seconds=seconds,
        req_per_s=ok / seconds if seconds > 0 else 0.0,
        p50_ms=statistics.median(latencies) / 1000 if latencies else 0.0,
        p99_ms=latencies[int(0.99 * (len(latencies) - 1))] / 1000 if latencies else 0.0,
        workers=dict(workers),
        first_error=next((r.first_error for r in collected if r.first_error), None),
        client_cpu_cores=sum(r.cpu_s for r in collected) / seconds if seconds > 0 else 0.0,
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
