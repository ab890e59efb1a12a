"""A throwaway hsmkeys KMS endpoint for tests: ``hsmkeys serve --ephemeral`` in a child process.

    with start_ephemeral_kms() as kms:
        client = kms.client()  # boto3 KMS client (boto3 is a test extra)
        key_id = client.create_key()["KeyMetadata"]["KeyId"]

The server serves a SoftHSM2 token and catalog of its own, removed when it stops, on
127.0.0.1 at a free port, with an audit log in that temporary directory. It is stopped
with SIGTERM (``stop()`` or leaving the ``with`` block). The pytest plugin's
``hsmkeys_kms`` fixture is one per session.

HTTPS: pass ``tls_cert`` and ``tls_key`` (e.g. made by
:func:`hsmkeys.server.tls.write_self_signed_cert`); ``client()`` then trusts
``tls_cert`` (``ca_bundle``), as ``AWS_CA_BUNDLE`` would.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from hsmkeys.config import is_access_key_id, new_access_key_id, new_secret_access_key

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

__all__ = ["EphemeralKms", "start_ephemeral_kms"]

REGION = "us-east-1"  # what ``serve --ephemeral`` signs for
STOP_TIMEOUT_S = 30.0
# Settings the caller's shell may carry that would point the child at other keys.
_NOT_INHERITED = ("AWS_", "HSMKEYS_")
_LISTENING = re.compile(r"listening on (https?://(127\.0\.0\.1):(\d+))")
_SCOPE = re.compile(r"region: (\S+) account: (\d{12})")


@dataclass(frozen=True, slots=True)
class EphemeralKms:
    """A running ``hsmkeys serve --ephemeral`` and the credentials it accepts."""

    url: str  # http://127.0.0.1:PORT, or https://
    host: str
    port: int
    audit_log: Path  # removed with the server's store unless placed elsewhere
    access_key_id: str
    secret_access_key: str = field(repr=False)
    region: str
    output: list[str] = field(repr=False)  # the server's stdout lines so far
    process: subprocess.Popen[str] = field(repr=False)
    account_id: str = "111122223333"
    ca_bundle: Path | None = None  # the certificate to trust when serving HTTPS

    def client(self, **kwargs: Any) -> KMSClient:
        """A boto3 ``kms`` client for this server; ``kwargs`` override the defaults
        (endpoint, region, credentials, ``verify=ca_bundle`` over HTTPS; a ``config`` is
        merged over ``retries={"max_attempts": 1}``). Raises ImportError without boto3."""
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": 1})
        if "config" in kwargs:
            config = config.merge(kwargs.pop("config"))
        options: dict[str, Any] = {
            "endpoint_url": self.url,
            "region_name": self.region,
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
            **({"verify": str(self.ca_bundle)} if self.ca_bundle is not None else {}),
            **kwargs,
        }
        client: KMSClient = boto3.client("kms", config=config, **options)
        return client

    def stop(self) -> int:
        """SIGTERM, then wait; returns the exit code (0 on a clean shutdown). Kills the
        server if it has not exited after STOP_TIMEOUT_S."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> EphemeralKms:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_ephemeral_kms(
    *serve_args: str,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> EphemeralKms:
    """Start ``python -m hsmkeys serve --ephemeral --host 127.0.0.1 --port 0 SERVE_ARGS``
    and wait until it is listening; with ``tls_cert`` and ``tls_key``, over HTTPS.

    Credentials not given are generated; they reach the server as AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY. The child does not inherit the caller's AWS_*, HSMKEYS_* or
    SOFTHSM2_CONF; ``env`` is added last, so it may set those deliberately. The
    instance's credentials are the ones the server accepts: empty AWS_* credentials in
    ``env`` make the server generate (and print) a pair, which then become its own.
    The server's log goes to the caller's stderr.

    Raises ValueError for an access key id the server would refuse (1-128 of
    ``[A-Za-z0-9_]``, as in a config file) or only one of ``tls_cert``/``tls_key``;
    RuntimeError (with the server's output) if it exits or is not listening within
    ``timeout`` seconds; it is killed then.
    """
    if access_key_id is not None and not is_access_key_id(access_key_id):
        raise ValueError(f"access_key_id: 1-128 letters, digits or underscores, got {access_key_id!r}")
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("give both tls_cert and tls_key, or neither")
    if "--no-audit" in serve_args:
        raise ValueError("an EphemeralKms always has an audit log: --no-audit is not for start_ephemeral_kms")
    tls_args = () if tls_cert is None or tls_key is None else (
        "--tls-cert", str(Path(tls_cert).resolve()), "--tls-key", str(Path(tls_key).resolve()),
    )  # fmt: skip
    if access_key_id is None:
        access_key_id = new_access_key_id()
    if secret_access_key is None:
        secret_access_key = new_secret_access_key()
    child_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_NOT_INHERITED) and k != "SOFTHSM2_CONF"
    }
    child_env |= {
        "AWS_ACCESS_KEY_ID": access_key_id,
        "AWS_SECRET_ACCESS_KEY": secret_access_key,
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    command = [
        sys.executable, "-m", "hsmkeys", "serve", "--ephemeral",
        "--host", "127.0.0.1", "--port", "0", *tls_args, *serve_args,
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=None,
        stdin=subprocess.DEVNULL,
        text=True,
        env=child_env,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip("\n")
            output.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="hsmkeys-kms-stdout", daemon=True).start()
    deadline = time.monotonic() + timeout
    audit_log: Path | None = None
    scope: re.Match[str] | None = None
    printed: dict[str, str] = {}
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            process.kill()
            process.wait()
            raise RuntimeError(f"hsmkeys server did not start in {timeout}s: {output}") from None
        if line is None:
            process.wait()
            raise RuntimeError(f"hsmkeys server exited with {process.returncode}: {output}")
        if line.startswith("audit log: "):
            audit_log = Path(line.removeprefix("audit log: "))
        elif found := _SCOPE.fullmatch(line):
            scope = found
        elif line.startswith(("AWS_ACCESS_KEY_ID=", "AWS_SECRET_ACCESS_KEY=")):
            name, value = line.split("=", 1)
            printed[name] = value
        elif match := _LISTENING.fullmatch(line):
            if audit_log is None:
                process.kill()
                process.wait()
                raise RuntimeError(f"hsmkeys server printed no audit log path: {output}")
            return EphemeralKms(
                url=match[1],
                host=match[2],
                port=int(match[3]),
                audit_log=audit_log,
                # What the server accepts: its env's pair, or the one it generated.
                access_key_id=printed.get("AWS_ACCESS_KEY_ID", child_env["AWS_ACCESS_KEY_ID"]),
                secret_access_key=printed.get(
                    "AWS_SECRET_ACCESS_KEY", child_env["AWS_SECRET_ACCESS_KEY"]
                ),
                region=scope[1] if scope is not None else REGION,
                output=output,
                process=process,
                account_id=scope[2] if scope is not None else "111122223333",
                ca_bundle=Path(tls_cert).resolve() if tls_cert is not None else None,
            )
