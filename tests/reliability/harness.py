"""Helpers for the reliability harnesses: signed raw HTTP against an ephemeral server,
and the size knobs (``HSMKEYS_SOAK_SCALE``) that ``make soak`` raises."""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from hsmkeys.testing.server import EphemeralKms

#: ``make soak`` sets HSMKEYS_SOAK=1 (and the soak-marked tests run); counts below scale.
SOAK = os.environ.get("HSMKEYS_SOAK", "") == "1"


def soak_number(name: str, fast: float, soak: float) -> float:
    """``HSMKEYS_<NAME>`` if set, else the soak or the fast figure."""
    raw = os.environ.get(f"HSMKEYS_{name}")
    return float(raw) if raw else (soak if SOAK else fast)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> str | None:
        try:
            value = self.json()
        except ValueError:
            return None
        return value.get("__type") if isinstance(value, dict) else None


def sign(kms: EphemeralKms, target: str | None, body: bytes, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    headers = {"Content-Type": "application/x-amz-json-1.1", **(extra or {})}
    if target is not None:
        headers["X-Amz-Target"] = target
    request = AWSRequest(method="POST", url=kms.url + "/", data=body, headers=headers)
    SigV4Auth(Credentials(kms.access_key_id, kms.secret_access_key), "kms", kms.region).add_auth(request)
    return dict(request.headers.items())


def send(kms: EphemeralKms, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> Reply:
    conn = http.client.HTTPConnection(kms.host, kms.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if not any(k.lower() == "content-length" for k in headers):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


def kms_call(kms: EphemeralKms, operation: str, payload: Mapping[str, Any] | bytes) -> Reply:
    """A signed ``TrentService.<operation>`` call; ``payload`` a dict (JSON, surrogates
    kept as \\u escapes) or raw bytes."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return send(kms, "POST", "/", body, sign(kms, f"TrentService.{operation}", body))
