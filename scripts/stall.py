"""Does slow work stall Encrypt on the same worker? Per-connection Encrypt latency.

Starts ``hsmkeys serve --ephemeral --workers 2`` (maintenance every second), then for
``--seconds``: 8 keep-alive clients replay a signed Encrypt (each on its own
connection, so the kernel spreads them over both workers) while another client creates
RSA-4096 keys in a loop (CreateKey, ~1.7 s of HSM work each). Prints p50/p99/max per
connection with the worker that served it; the target is the worst p99 < 50 ms.

    .venv/bin/python scripts/stall.py [--seconds 20] [--pythonpath DIR]

``--pythonpath`` serves another checkout of hsmkeys (a before/after comparison).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import LoadSpec, _Connection, _request_bytes, encrypt_payload

from hsmkeys.testing.server import start_ephemeral_kms


def _encrypt_client(spec: LoadSpec, seconds: float, start: Any, out: Any) -> None:
    conn = _Connection(spec)
    request = _request_bytes(spec, json.dumps(spec.payload).encode())
    worker = ""
    for _ in range(50):  # warm-up
        conn.exchange(request)
    start.wait()
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        status, headers, _ = conn.exchange(request)
        latencies.append(time.perf_counter() - t0)
        errors += status != 200
        worker = headers.get(b"x-hsmkeys-worker", b"?").decode()
    out.put((worker, latencies, errors))


def _creator(url: str, access: str, secret: str, region: str, seconds: float, start: Any, out: Any) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "kms",
        endpoint_url=url,
        region_name=region,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1}, read_timeout=120),
    )
    start.wait()
    made, took = 0, []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        client.create_key(KeySpec="RSA_4096", KeyUsage="SIGN_VERIFY")
        took.append(time.perf_counter() - t0)
        made += 1
    out.put(("create", made, took))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--pythonpath", default=None, help="serve the hsmkeys found here")
    args = parser.parse_args()
    env = {"HSMKEYS_MAINTENANCE_INTERVAL_SECONDS": "1"}
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
        os.chdir(args.pythonpath)  # ``python -m`` puts the working directory first on sys.path
    server = start_ephemeral_kms("--workers", "2", env=env)
    try:
        key_id = server.client().create_key()["KeyMetadata"]["KeyId"]
        spec = LoadSpec(
            endpoint=server.url,
            access_key_id=server.access_key_id,
            secret_access_key=server.secret_access_key,
            region=server.region,
            target="Encrypt",
            payload=encrypt_payload(key_id),
        )
        ctx = mp.get_context("spawn")
        start, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_encrypt_client, args=(spec, args.seconds, start, out)) for _ in range(args.clients)]
        procs.append(
            ctx.Process(
                target=_creator,
                args=(server.url, server.access_key_id, server.secret_access_key, server.region, args.seconds, start, out),
            )
        )
        for p in procs:
            p.start()
        time.sleep(3)  # clients connected and warmed up
        start.set()
        results = [out.get(timeout=args.seconds + 300) for _ in procs]
        for p in procs:
            p.join()
    finally:
        server.stop()
    worst = 0.0
    print(f"server: {args.pythonpath or 'this checkout'}; {args.clients} Encrypt connections, {args.seconds:g} s")
    for result in results:
        if result[0] == "create":
            _, made, took = result
            print(f"CreateKey RSA_4096: {made} made, median {_pct(took, 0.5):.2f} s")
            continue
        worker, lat, errors = result
        p99 = _pct(lat, 0.99)
        worst = max(worst, p99)
        print(
            f"worker {worker:>7}: {len(lat):6d} Encrypts, errors {errors}, p50 {_pct(lat, 0.5) * 1e3:7.2f} ms, "
            f"p99 {p99 * 1e3:8.2f} ms, max {max(lat) * 1e3:8.1f} ms"
        )
    print(f"worst connection p99: {worst * 1e3:.2f} ms (target < 50 ms)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
