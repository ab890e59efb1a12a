"""Internal faults reach the client as ``internal error, request id <id>`` and nothing
else; the details (class, frames, the KMSInternalException's own message) are logged
under that request id. Driven in process so the log records are visible."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pkcs11.exceptions
import pytest
from asgi_harness import Reply, kms, verifier

from hsmkeys.errors import KMSInternalException, NotFoundException
from hsmkeys.keystore import KeyStore
from hsmkeys.server.app import create_app
from hsmkeys.server.metrics import Metrics

PATH = "/var/lib/softhsm/tokens/9f1c2e/0a1b2c3d.object"
PLAINTEXT_MARKER = "cGxhaW50ZXh0LW1hcmtlcg=="  # base64 of "plaintext-marker"


def _failing_app(store: KeyStore, monkeypatch: pytest.MonkeyPatch, error: BaseException) -> Any:
    def invoke(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(store, "invoke", invoke)  # the one KeyStore entry the server calls
    return create_app(store, verifier(), Metrics())


def _encrypt(app: Any) -> Reply:
    return kms(app, "Encrypt", {"KeyId": "alias/any", "Plaintext": PLAINTEXT_MARKER})


def _internal_error_records(caplog: pytest.LogCaptureFixture, request_id: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "hsmkeys.server" and f"request_id={request_id}" in r.getMessage()
    ]


def _assert_only_the_request_id(reply: Reply) -> None:
    assert reply.status == 500
    assert reply.json == {
        "__type": "KMSInternalException",
        "message": f"internal error, request id {reply.request_id}",
    }


@pytest.mark.parametrize(
    "make_error",
    [
        lambda: RuntimeError(f"cannot open {PATH}: plaintext-marker"),
        lambda: pkcs11.exceptions.DeviceError(),
        lambda: OSError(5, "Input/output error", PATH),
    ],
    ids=["RuntimeError", "PKCS11-DeviceError", "OSError"],
)
def test_unexpected_keystore_exception_is_internal_error_with_only_the_request_id(
    store: KeyStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    make_error: Callable[[], BaseException],
) -> None:
    caplog.set_level(logging.INFO)
    error = make_error()
    reply = _encrypt(_failing_app(store, monkeypatch, error))
    _assert_only_the_request_id(reply)
    (logged,) = _internal_error_records(caplog, reply.request_id)
    kind = type(error)
    assert "event=internal_error" in logged and "operation=Encrypt" in logged
    assert f"error={kind.__module__}.{kind.__qualname__}" in logged
    assert f"{__file__}:" in logged  # the frames, with paths and line numbers
    # Another exception's message may carry request data: never logged, never returned.
    assert "plaintext-marker" not in caplog.text and PLAINTEXT_MARKER not in caplog.text


def test_kms_internal_exception_message_goes_to_the_log_not_the_client(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    error = KMSInternalException(f"C_Decrypt failed with CKR_DEVICE_ERROR on {PATH}")
    reply = _encrypt(_failing_app(store, monkeypatch, error))
    _assert_only_the_request_id(reply)
    assert PATH.encode() not in reply.body and b"CKR_" not in reply.body
    (logged,) = _internal_error_records(caplog, reply.request_id)
    assert "error=hsmkeys.errors.KMSInternalException" in logged
    assert f"CKR_DEVICE_ERROR on {PATH}" in logged


def test_request_ids_differ_and_match_the_response_header(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = _failing_app(store, monkeypatch, RuntimeError("x"))
    first, second = _encrypt(app), _encrypt(app)
    assert first.request_id != second.request_id
    assert first.json["message"].endswith(first.request_id)


def test_a_client_error_keeps_its_message(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    reply = _encrypt(_failing_app(store, monkeypatch, NotFoundException("Alias alias/any is not found.")))
    assert (reply.status, reply.json) == (
        400,
        {"__type": "NotFoundException", "message": "Alias alias/any is not found."},
    )


class _BrokenVerifier:
    def verify(self, *args: Any) -> Any:
        raise ValueError(f"parser bug near {PATH}")


def test_unexpected_exception_before_the_keystore_is_internal_error_with_only_the_request_id(
    store: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    reply = _encrypt(create_app(store, _BrokenVerifier(), Metrics()))
    _assert_only_the_request_id(reply)
    (logged,) = _internal_error_records(caplog, reply.request_id)
    assert "error=builtins.ValueError" in logged and "operation=Encrypt" in logged
    assert PATH not in caplog.text
