"""The optional access log: one ``hsmkeys.access`` line per request with the time, the
authenticated caller, the operation, the status and the duration; never a body."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
from asgi_harness import PRINCIPAL, call, kms, verifier

from hsmkeys.keystore import KeyStore
from hsmkeys.server.accesslog import with_access_log
from hsmkeys.server.app import create_app
from hsmkeys.server.metrics import Metrics

LINE = re.compile(
    r"event=access time=(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00) source=127\.0\.0\.1 "
    r"caller=(?P<caller>\S+) operation=(?P<operation>\S+) status=(?P<status>\d{3}) ms=(?P<ms>\d+\.\d)"
)
MARKER = "YWNjZXNzLWxvZy1tYXJrZXI="  # base64 of "access-log-marker"


@pytest.fixture
def app(store: KeyStore) -> Any:
    checked, metrics, wrap = with_access_log(verifier(), Metrics())
    return wrap(create_app(store, checked, metrics))


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="hsmkeys.access")
    return caplog


def _lines(caplog: pytest.LogCaptureFixture) -> list[re.Match[str]]:
    found = []
    for record in caplog.records:
        if record.name == "hsmkeys.access":
            match = LINE.fullmatch(record.getMessage())
            assert match, record.getMessage()
            found.append(match)
    return found


def test_authenticated_call_logs_caller_operation_and_status(app: Any, access: pytest.LogCaptureFixture) -> None:
    reply = kms(app, "ListKeys", {})
    (line,) = _lines(access)
    assert (line["caller"], line["operation"], int(line["status"])) == (PRINCIPAL, "ListKeys", reply.status)


def test_refused_signature_logs_no_caller(app: Any, access: pytest.LogCaptureFixture) -> None:
    reply = kms(app, "Encrypt", {"KeyId": "alias/x", "Plaintext": MARKER}, secret="wrong")
    assert reply.status == 400 and reply.json["__type"] == "InvalidSignatureException"
    (line,) = _lines(access)
    assert (line["caller"], line["operation"], line["status"]) == ("-", "Encrypt", "400")


def test_bodies_and_key_ids_are_never_logged(app: Any, access: pytest.LogCaptureFixture) -> None:
    kms(app, "Encrypt", {"KeyId": "alias/secret-alias-name", "Plaintext": MARKER})
    assert len(_lines(access)) == 1
    assert MARKER not in access.text and "secret-alias-name" not in access.text


def test_other_routes_are_logged_by_path_and_unknown_paths_as_dash(
    app: Any, access: pytest.LogCaptureFixture
) -> None:
    assert call(app, method="GET", path="/healthz").status == 200
    assert call(app, method="GET", path="/%0a-injected").status == 404
    healthz, unknown = _lines(access)
    assert (healthz["operation"], healthz["status"], healthz["caller"]) == ("/healthz", "200", "-")
    assert (unknown["operation"], unknown["status"]) == ("-", "404")


def test_one_line_per_request(app: Any, access: pytest.LogCaptureFixture) -> None:
    for _ in range(3):
        kms(app, "ListKeys", {})
    assert len(_lines(access)) == 3


def test_without_the_access_log_nothing_is_written(
    store: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hsmkeys.access")
    kms(create_app(store, verifier(), Metrics()), "ListKeys", {})
    assert not [r for r in caplog.records if r.name == "hsmkeys.access"]
