"""The optional access log: one line per HTTP request on the ``hsmkeys.access`` logger.

    event=access time=2026-03-14T15:09:26.123+00:00 source=127.0.0.1 caller=arn:aws:iam::111122223333:user/admin operation=Encrypt status=200 ms=1.8

Every value comes from the server, never from the request: the caller is the ARN
the SigV4 verifier authenticated (``-`` when it refused), the operation the name the
app resolved from the model (``Unknown`` outside it; ``GET /healthz`` and ``GET
/metrics`` for those routes, ``-`` for other paths). Bodies, headers and key ids are
never logged: the audit log is the record of what was done to which key.

:func:`with_access_log` wraps the app's verifier and metrics (which see the caller
and the operation) and returns an ASGI wrapper that writes the line once the
response is sent. The three share one record per request through a context
variable: the app calls the verifier and metrics in the request's own task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime

from hsmkeys.server.app import (
    ASGIApp,
    Authenticated,
    Message,
    Receive,
    RequestMetrics,
    RequestVerifier,
    Scope,
    Send,
)

__all__ = ["AccessLog", "with_access_log"]

log = logging.getLogger("hsmkeys.access")

_ROUTES = frozenset({"/healthz", "/metrics"})


@dataclass(slots=True)
class _Entry:
    caller: str = "-"
    operation: str | None = None


_current: ContextVar[_Entry | None] = ContextVar("hsmkeys_access_entry", default=None)


class _RecordingVerifier:
    def __init__(self, inner: RequestVerifier) -> None:
        self._inner = inner

    def verify(
        self,
        method: str,
        path: str,
        query: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
    ) -> Authenticated:
        credential = self._inner.verify(method, path, query, headers, body)
        entry = _current.get()
        if entry is not None:
            entry.caller = credential.principal_arn
        return credential


class _RecordingMetrics:
    def __init__(self, inner: RequestMetrics) -> None:
        self._inner = inner

    def observe_request(self, operation: str, outcome: str, seconds: float) -> None:
        entry = _current.get()
        if entry is not None:
            entry.operation = operation
        self._inner.observe_request(operation, outcome, seconds)

    def hsm_error(self, kind: str) -> None:
        self._inner.hsm_error(kind)

    def render(self) -> str:
        return self._inner.render()


class AccessLog:
    """ASGI wrapper writing the access line of every HTTP request it passes to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        entry = _Entry()
        token = _current.set(entry)
        started = time.perf_counter()
        status = 0

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, send_and_note)
        finally:
            _current.reset(token)
            elapsed_ms = (time.perf_counter() - started) * 1000
            client = scope.get("client")
            log.info(
                "event=access time=%s source=%s caller=%s operation=%s status=%d ms=%.1f",
                datetime.now(UTC).isoformat(timespec="milliseconds"),
                client[0] if client else "-",
                entry.caller,
                _operation(entry, scope),
                status,
                elapsed_ms,
            )


def _operation(entry: _Entry, scope: Scope) -> str:
    if entry.operation is not None:
        return entry.operation
    path = scope.get("path")
    return path if path in _ROUTES else "-"


def with_access_log(
    verifier: RequestVerifier,
    metrics: RequestMetrics,
) -> tuple[RequestVerifier, RequestMetrics, Callable[[ASGIApp], ASGIApp]]:
    """The verifier and metrics to build the app with, and the wrapper to serve it in."""
    return _RecordingVerifier(verifier), _RecordingMetrics(metrics), AccessLog
