"""Drive the ASGI app in process: botocore-signed KMS requests, one ASGI call each.

For tests of what the app does around the KeyStore (error shapes, logs) where a real
server process would hide the log records from ``caplog``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from hsmkeys.server.app import ASGIApp, Message
from hsmkeys.server.sigv4 import Credential, SigV4Verifier

ACCESS_KEY_ID = "test"
SECRET = "test"
REGION = "us-east-1"
PRINCIPAL = "arn:aws:iam::111122223333:user/admin"
ENDPOINT = "http://127.0.0.1:7300"


def verifier() -> SigV4Verifier:
    return SigV4Verifier([Credential(ACCESS_KEY_ID, SECRET, PRINCIPAL)], region=REGION)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def request_id(self) -> str:
        return self.headers[b"x-amzn-requestid"].decode()


def signed_headers(operation: str, body: bytes, *, secret: str = SECRET) -> list[tuple[bytes, bytes]]:
    """The headers boto3 would send for ``operation`` with ``body``, signed now."""
    request = AWSRequest(method="POST", url=ENDPOINT + "/", data=body)
    request.headers["X-Amz-Target"] = f"TrentService.{operation}"
    request.headers["Content-Type"] = "application/x-amz-json-1.1"
    SigV4Auth(Credentials(ACCESS_KEY_ID, secret), "kms", REGION).add_auth(request)
    pairs = [(b"host", b"127.0.0.1:7300")]
    pairs += [(k.lower().encode(), v.encode()) for k, v in request.headers.items()]
    pairs.append((b"content-length", str(len(body)).encode()))
    return pairs


def call(
    app: ASGIApp,
    *,
    method: str = "POST",
    path: str = "/",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> Reply:
    """One HTTP request through ``app``; the reply it sent."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers or [(b"host", b"127.0.0.1:7300")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 7300),
    }
    incoming: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    async def run() -> None:
        await app(scope, receive, send)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Reply(start["status"], dict(start["headers"]), payload)


def kms(app: ASGIApp, operation: str, request: Mapping[str, Any], *, secret: str = SECRET) -> Reply:
    """A signed KMS JSON 1.1 request for ``operation``."""
    body = json.dumps(request).encode()
    return call(app, headers=signed_headers(operation, body, secret=secret), body=body)
