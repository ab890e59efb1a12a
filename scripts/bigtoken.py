"""Big-token start-up: how soon `hsmkeys serve` answers on a token of 10,000 keys x 3 versions.

    env -u SOFTHSM2_CONF .venv/bin/python scripts/bigtoken.py [--keys 10000] [--versions 3]

Builds a throwaway SoftHSM2 token and catalog (objects exactly as Pkcs11Hsm makes them,
rows through the catalog; ~10 ms per object), then, several times, starts
`hsmkeys serve` (``--workers``, default 1) on it and measures from the process start to the first
Encrypt answered (on a random key, as a client would), then checks ListKeys pages are
full and consistent and the per-call Encrypt latency. Prints one JSON object.
Takes minutes (building 30,000 objects): not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ADMIN = "arn:aws:iam::111122223333:user/admin"
KEY_ID = "AKIABIGTOKENADMIN"


def log(message: str) -> None:
    print(f"[bigtoken {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HSMKEYS_", "SOFTHSM2_CONF"))}


def _config(folder: Path) -> Path:
    from hsmkeys.hsm.softhsm import find_module

    config = {
        "hsm": {"module": str(find_module()), "token_label": "big", "pin_file": "pin", "softhsm2_conf": "softhsm2.conf"},
        "catalog": "catalog.db",
        "audit_log": "audit.log",
        "principals": [
            {
                "arn": ADMIN,
                "access_key_id": KEY_ID,
                "secret_access_key_file": "admin.secret",
                "policy": {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]},
            }
        ],
    }
    path = folder / "hsmkeys.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def build(folder: Path, keys: int, versions: int) -> list[str]:
    """Objects and rows for ``keys`` AES keys of ``versions`` versions each (in a child:
    this process must not load the PKCS#11 module before the server children do)."""
    code = f"""
import os, sys, time, uuid
from datetime import UTC, datetime
os.environ["SOFTHSM2_CONF"] = {str(folder / "softhsm2.conf")!r}
import pkcs11
from pkcs11 import Attribute, KeyType, MechanismFlag
from hsmkeys.catalog.base import KeyRecord, VersionRecord
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.hsm.softhsm import find_module
from hsmkeys.keystore import default_key_policy
from hsmkeys.models import KeySpec, KeyState, KeyUsage, Origin, RotationType
pin = open({str(folder / "pin")!r}).read().strip()
session = pkcs11.lib(str(find_module())).get_token(token_label="big").open(rw=True, user_pin=pin)
catalog = SqliteCatalog({str(folder / "catalog.db")!r})
policy = default_key_policy("111122223333")
template = {{Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False, Attribute.MODIFIABLE: False}}
start = time.perf_counter()
out = []
for i in range({keys}):
    now = datetime.now(UTC)
    key = KeyRecord(key_uuid=uuid.uuid4(), spec=KeySpec.SYMMETRIC_DEFAULT, usage=KeyUsage.ENCRYPT_DECRYPT,
                    origin=Origin.AWS_KMS, state=KeyState.ENABLED, description="big token", created_at=now,
                    current_version=1, policy=policy)
    refs = [VersionRecord(key.key_uuid, v, now, None if v == 1 else RotationType.ON_DEMAND) for v in range(1, {versions} + 1)]
    for version in refs:
        session.generate_key(KeyType.AES, 256, id=version.ref.object_id, label=version.ref.label, store=True,
                             capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT, template=dict(template))
    with catalog.transaction():
        catalog.insert_key(key, refs[0])
        for version in refs[1:]:
            catalog.add_version(version)
    out.append(str(key.key_uuid))
    if (i + 1) % 1000 == 0:
        print(f"{{i + 1}} keys, {{time.perf_counter() - start:.0f}} s", file=sys.stderr, flush=True)
catalog.close()
session.close()
print("\\n".join(out))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env())
    return done.stdout.split()


def serve_and_time(config: Path, key_ids: list[str], secret: str, workers: int) -> dict[str, Any]:
    import boto3
    from botocore.config import Config

    port = _free_port()
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "hsmkeys", "--config", str(config), "serve", "--port", str(port), "--workers", str(workers)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kms = boto3.client(
        "kms",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1}, connect_timeout=0.2, read_timeout=30),
    )
    try:
        key = random.choice(key_ids)
        first = None
        while first is None:
            try:
                kms.encrypt(KeyId=key, Plaintext=b"x")
                first = time.monotonic() - started
            except Exception:
                if time.monotonic() - started > 120:
                    raise
                time.sleep(0.02)
        latencies = []
        for other in random.sample(key_ids, 200):
            t = time.perf_counter()
            kms.encrypt(KeyId=other, Plaintext=b"x")
            latencies.append((time.perf_counter() - t) * 1000)
        pages, seen, marker = [], set(), None
        while True:
            page = kms.list_keys(Limit=1000, **({"Marker": marker} if marker else {}))
            pages.append(len(page["Keys"]))
            seen.update(k["KeyId"] for k in page["Keys"])
            if not page["Truncated"]:
                break
            marker = page["NextMarker"]
        return {
            "first_encrypt_s": first,
            "encrypt_ms_first_use_median": statistics.median(latencies),
            "encrypt_ms_first_use_p99": sorted(latencies)[int(len(latencies) * 0.99) - 1],
            "list_keys_pages": pages,
            "list_keys_complete": seen >= set(key_ids),
        }
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--starts", type=int, default=3, help="server starts to time")
    parser.add_argument("--workers", type=int, default=1, help="serve --workers (default 1, as serve's own default)")
    parser.add_argument("--reuse", type=Path, default=None, metavar="DIR", help="a token this script built before")
    args = parser.parse_args()
    if args.reuse is not None:
        from hsmkeys.catalog.sqlite import SqliteCatalog

        folder, built = args.reuse, 0.0
        config = folder / "hsmkeys.yaml"
        catalog = SqliteCatalog(folder / "catalog.db")
        key_ids = [str(k.key_uuid) for k in catalog.list_keys(limit=args.keys)]
        catalog.close()
    else:
        folder = Path(tempfile.mkdtemp(prefix="hsmkeys-bigtoken-"))
        config = _config(folder)
        subprocess.run(
            [sys.executable, "-m", "hsmkeys", "--config", str(config), "init", "--create-token"],
            check=True, env=_env(), capture_output=True,
        )  # fmt: skip
        log(f"building {args.keys} keys x {args.versions} versions in {folder}")
        start = time.monotonic()
        key_ids = build(folder, args.keys, args.versions)
        built = time.monotonic() - start
        log(f"built in {built:.0f} s")
    secret = (folder / "admin.secret").read_text(encoding="utf-8").strip()
    runs = []
    for i in range(args.starts):
        log(f"server start {i + 1}/{args.starts}")
        runs.append(serve_and_time(config, key_ids, secret, args.workers))
    result = {
        "keys": args.keys,
        "versions": args.versions,
        "workers": args.workers,
        "objects": args.keys * args.versions,
        "build_s": built,
        "first_encrypt_s_median": statistics.median(r["first_encrypt_s"] for r in runs),
        "first_encrypt_s_runs": [r["first_encrypt_s"] for r in runs],
        "runs": runs,
        "when": datetime.now(UTC).isoformat(),
        "key_sample": str(uuid.UUID(key_ids[0])),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
