"""Helpers for the server tests: start a real server, check wire shapes, signed raw HTTP.

``start_server`` is :func:`hsmkeys.testing.server.start_ephemeral_kms` with this
suite's fixed admin credentials (``ACCESS_KEY_ID`` / ``SECRET_ACCESS_KEY``), so raw
requests can be signed without asking the server. ``make_client`` builds a boto3 KMS
client whose every successful response body is checked against the botocore KMS
model (``wire_shape_errors``), errors collected in a ``WireLog``.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import botocore.session
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from hsmkeys.testing.server import REGION, EphemeralKms, start_ephemeral_kms

ServerProcess = EphemeralKms

ACCESS_KEY_ID = "AKIAHSMKEYSTESTADMIN"
SECRET_ACCESS_KEY = "hsmkeys-test-secret-access-key-0123456789"
ACCOUNT_ID = "111122223333"
ADMIN_ARN = f"arn:aws:iam::{ACCOUNT_ID}:user/admin"
KEY_ARN = re.compile(rf"^arn:aws:kms:{REGION}:{ACCOUNT_ID}:key/[0-9a-f-]{{36}}$")

_MODEL = botocore.session.get_session().get_service_model("kms")


def start_server(*args: str, env: Mapping[str, str] | None = None) -> ServerProcess:
    """``hsmkeys serve --ephemeral ARGS`` serving ``ACCESS_KEY_ID`` / ``SECRET_ACCESS_KEY``
    (unless ``env`` overrides them)."""
    return start_ephemeral_kms(
        *args, access_key_id=ACCESS_KEY_ID, secret_access_key=SECRET_ACCESS_KEY, env=env
    )


# ------------------------------------------------------------------ wire shape checks


def wire_shape_errors(shape: Any, value: Any, path: str = "") -> list[str]:
    """Every way ``value`` (decoded response JSON) departs from botocore ``shape``."""
    kind = shape.type_name
    where = path or "<root>"
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{where}: expected object, got {type(value).__name__}"]
        errors = [
            f"{where}.{k}: not a member of {shape.name}" for k in value if k not in shape.members
        ]
        errors += [
            f"{where}.{k}: required member missing"
            for k in shape.required_members
            if k not in value
        ]
        for name, member in shape.members.items():
            if name in value:
                errors += wire_shape_errors(member, value[name], f"{path}.{name}" if path else name)
        return errors
    if kind == "list":
        if not isinstance(value, list):
            return [f"{where}: expected array"]
        return [
            e
            for i, v in enumerate(value)
            for e in wire_shape_errors(shape.member, v, f"{where}[{i}]")
        ]
    if kind == "map":
        if not isinstance(value, dict):
            return [f"{where}: expected object (map)"]
        return [
            e for k, v in value.items() for e in wire_shape_errors(shape.value, v, f"{where}[{k}]")
        ]
    if kind == "string":
        if not isinstance(value, str):
            return [f"{where}: expected string"]
        enum = shape.metadata.get("enum")
        return (
            [f"{where}: {value!r} not in enum {shape.name}"] if enum and value not in enum else []
        )
    if kind == "blob":
        if not isinstance(value, str):
            return [f"{where}: expected base64 string"]
        try:
            base64.b64decode(value, validate=True)
        except ValueError:
            return [f"{where}: not base64"]
        return []
    if kind == "timestamp":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected epoch seconds"]
    if kind in ("integer", "long"):
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected integer"]
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{where}: expected boolean"]
    return [f"{where}: unexpected shape type {kind}"]


def response_errors(operation: str, body: bytes) -> list[str]:
    """Shape errors of one successful response body, plus KeyId-is-an-ARN checks."""
    output = _MODEL.operation_model(operation).output_shape
    if output is None:
        return (
            []
            if body.strip() in (b"", b"{}")
            else [f"{operation}: body for an operation without output"]
        )
    document = json.loads(body) if body.strip() else {}
    errors = [f"{operation}: {e}" for e in wire_shape_errors(output, document)]
    for name in ("KeyId", "SourceKeyId"):
        if name in document and not KEY_ARN.match(document[name]):
            errors.append(f"{operation}: {name} {document[name]!r} is not a key ARN")
    return errors


@dataclass
class WireLog:
    """What the shape-checking hook saw: operations checked and errors found."""

    checked: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


def make_client(server: ServerProcess, wire_log: WireLog | None = None) -> Any:
    """``server.client()`` with generous timeouts; every successful response is shape-checked
    into ``wire_log`` if given."""
    client = server.client(config=Config(connect_timeout=10, read_timeout=60))
    if wire_log is not None:

        def check(operation_model: Any, response_dict: Mapping[str, Any], **_: Any) -> None:
            if response_dict["status_code"] == 200:
                wire_log.checked.add(operation_model.name)
                wire_log.errors.extend(response_errors(operation_model.name, response_dict["body"]))

        client.meta.events.register("before-parse.kms.*", check)
    return client


# ------------------------------------------------------------------ raw HTTP


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> str | None:
        try:
            doc = self.json
        except ValueError:
            return None
        return doc.get("__type") if isinstance(doc, dict) else None

    @property
    def worker(self) -> str:
        return self.headers["x-hsmkeys-worker"]


def send(
    server: ServerProcess,
    method: str,
    path: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> RawResponse:
    """One request on a fresh connection (so a multi-worker server may route it anywhere)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return RawResponse(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            response.read(),
        )
    finally:
        conn.close()


def signed_headers(
    server: ServerProcess,
    target: str | None,
    body: bytes,
    *,
    access_key_id: str = ACCESS_KEY_ID,
    secret_access_key: str = SECRET_ACCESS_KEY,
    extra: Mapping[str, str] | None = None,
    sign: Callable[[AWSRequest], None] | None = None,
) -> dict[str, str]:
    """Headers of a SigV4-signed KMS request (botocore's signer)."""
    headers = {"Content-Type": "application/x-amz-json-1.1", **(extra or {})}
    if target is not None:
        headers["X-Amz-Target"] = target
    request = AWSRequest(method="POST", url=server.url + "/", data=body, headers=headers)
    if sign is None:
        SigV4Auth(Credentials(access_key_id, secret_access_key), "kms", REGION).add_auth(request)
    else:
        sign(request)
    return dict(request.headers.items())


def kms_call(
    server: ServerProcess, operation: str, payload: Mapping[str, Any] | bytes
) -> RawResponse:
    """A signed ``TrentService.<operation>`` call on a fresh connection."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return send(
        server, "POST", "/", body, signed_headers(server, f"TrentService.{operation}", body)
    )
