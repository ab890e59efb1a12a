"""Two (or more) ``hsmkeys serve`` instances as separate hosts would run them: each its
own config file, folder (maintenance lock, audit log) and process; one SoftHSM2 token
directory (the HSM every host reaches through its PKCS#11 client) and one PostgreSQL
database. Set up as a user would: config files, ``hsmkeys init --create-token`` from
the first config, then the same pin file (and principal secrets) for the others.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from hsmkeys.hsm.softhsm import find_module

ACCOUNT = "111122223333"
ADMIN = f"arn:aws:iam::{ACCOUNT}:user/admin"
APP = f"arn:aws:iam::{ACCOUNT}:role/app"
ACCESS_KEYS = {ADMIN: "AKIAADMINMULTIHOST0", APP: "AKIAAPPMULTIHOST000"}
MAINTENANCE_INTERVAL_S = 0.2
LEASE_S = 1.5
_LISTENING = re.compile(r"listening on (https?://\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def child_env() -> dict[str, str]:
    """The test runner's environment without anything that would steer the server."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HSMKEYS_", "SOFTHSM2_CONF"))}


def write_config(host_dir: Path, shared: Path, dsn: str, **extra: Any) -> Path:
    host_dir.mkdir(parents=True, exist_ok=True)
    principals: list[dict[str, Any]] = [
        {"arn": arn, "access_key_id": key_id, "secret_access_key_file": str(shared / f"{key_id}.secret")}
        for arn, key_id in ACCESS_KEYS.items()
    ]
    principals[0]["policy"] = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}],
    }
    config = {
        "hsm": {
            "module": str(find_module()),
            "token_label": "multihost",
            "pin_file": str(shared / "pin"),
            "softhsm2_conf": str(shared / "softhsm2.conf"),
        },
        "catalog": dsn,
        "account_id": ACCOUNT,
        "audit_log": "var/audit.log",
        "maintenance_interval_seconds": MAINTENANCE_INTERVAL_S,
        "maintenance_lease_seconds": LEASE_S,
        "principals": principals,
        **extra,
    }
    path = host_dir / "hsmkeys.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def init_token(config: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "hsmkeys", "--config", str(config), "init", "--create-token"],
        check=True, env=child_env(), capture_output=True, timeout=120,
    )  # fmt: skip


@dataclass
class Instance:
    """One ``hsmkeys serve`` process; its output is collected by a thread."""

    name: str
    config: Path
    shared: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # added to the child's environment
    _clients: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hsmkeys", "--config", str(self.config), "serve",
             "--host", "127.0.0.1", "--port", str(self.port)],
            env=child_env() | self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        listening = threading.Event()
        threading.Thread(target=self._collect, args=(listening,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not listening.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start: {''.join(self.lines)}")

    def _collect(self, listening: threading.Event) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if _LISTENING.search(line):
                listening.set()

    def logged(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def client(self, arn: str = ADMIN) -> Any:
        """A boto3 KMS client of ``arn`` for this instance (no retries: every failure shows)."""
        if arn not in self._clients:
            key_id = ACCESS_KEYS[arn]
            secret = (self.shared / f"{key_id}.secret").read_text(encoding="utf-8").strip()
            self._clients[arn] = boto3.client(
                "kms", endpoint_url=self.url, region_name="us-east-1",
                aws_access_key_id=key_id, aws_secret_access_key=secret,
                config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10,
                              max_pool_connections=20),
            )  # fmt: skip
        return self._clients[arn]

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> int | None:
        """SIGTERM and wait; the exit status (None if it had to be killed)."""
        if self.process is None:
            return None
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None
