"""The KMS HTTP server as a raw ASGI 3 application: routing, body limits, auth, error mapping.

No key logic lives here: a request is authenticated (SigV4), parsed against the
botocore model (:mod:`hsmkeys.server.wire`), passed to the KeyStore method inside a
:func:`hsmkeys.context.operation table entry (:meth:`KeyStore.invoke`), and its result or KMSError written back.

Routes:
  ``POST /``         KMS JSON 1.1 (``X-Amz-Target: TrentService.<Op>``)
  ``GET /healthz``   200 ``{"status":"ok"}`` after ``keystore.check_health()``, else 503
  ``GET /metrics``   Prometheus text
  anything else      404 (unknown path) or 405 (wrong method), JSON error body

Every response carries ``x-amzn-RequestId`` (UUID layout: a per-process random prefix
and a counter) and ``x-hsmkeys-worker`` (the serving process id, so tests can tell
workers apart). KMS errors are
``{"__type": code, "message": ...}`` with the error's status, except that an internal
fault (a KMSInternalException, or any other exception) is answered as a 500
KMSInternalException whose message is exactly ``internal error, request id <id>``:
its details (exception type, stack frames, and a KMSInternalException's own message
with PKCS#11 codes or paths; never another exception's message, which may hold
request data) go to the ``hsmkeys.server`` log under that request id. Bodies over 1 MiB get 413 with a ValidationException body.

KeyStore calls run directly on the event loop: they take tens of microseconds;
processes, not threads, add capacity. Operations declared ``slow`` (key generation:
seconds) run in the :class:`~hsmkeys.server.slowlane.SlowLane` when one is given, on an
HSM session of their own, so they never stall the requests around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from hsmkeys.errors import (
    KMSError,
    KMSInternalException,
    SerializationException,
    ValidationException,
)
from hsmkeys.keystore import new_request_id
from hsmkeys.server.metrics import process_series
from hsmkeys.server.wire import (
    CONTENT_TYPE,
    MAX_BODY_BYTES,
    BoundOperation,
    Dispatcher,
    encode_body,
)

if TYPE_CHECKING:
    from hsmkeys.server.slowlane import SlowLane

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
BackgroundTask = Callable[[], Coroutine[Any, Any, None]]

log = logging.getLogger("hsmkeys.server")

SUCCESS = "Success"  # the outcome name the KeyStore's audit lines use too
UNKNOWN_OPERATION = "Unknown"  # metrics/audit label for targets outside the model (bounded cardinality)
# A refused over-limit body is read and dropped up to this size before the 413.
_DISCARD_MAX_BYTES = 8 * MAX_BODY_BYTES
_REJECTION_FLUSH_SECONDS = 1.0
_ACCEPTED_CONTENT_TYPES = frozenset({CONTENT_TYPE, "application/x-amz-json-1.0"})


class Authenticated(Protocol):
    @property
    def principal_arn(self) -> str: ...


class RequestVerifier(Protocol):
    def verify(
        self,
        method: str,
        path: str,
        query: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
    ) -> Authenticated: ...


class RequestMetrics(Protocol):
    def observe_request(self, operation: str, outcome: str, seconds: float) -> None: ...

    def hsm_error(self, kind: str) -> None: ...

    def render(self) -> str: ...


class ServedKeyStore(Protocol):
    def check_health(self) -> None: ...

    def flush_rejections(self, *, older_than: float = 0.0) -> None: ...

    def audit_rejected(
        self,
        operation: str,
        outcome: str,
        *,
        principal: str | None = None,
        request_id: str | None = None,
        source: str | None = None,
    ) -> None: ...


class _BodyTooLarge(Exception):
    def __init__(self, *, unread: bool) -> None:
        super().__init__()
        self.unread = unread  # part of the body is still to be received


class _ClientGone(Exception):
    pass


def _error_body(code: str, message: str) -> bytes:
    return encode_body({"__type": code, "message": message})


def _content_type(value: bytes) -> str:
    return value.split(b";", 1)[0].strip().decode("latin-1").lower()


def _log_internal(event: str, request_id: str, operation: str, exc: BaseException) -> None:
    # Frames only, never str(exc): an exception message may carry request data. A
    # KMSInternalException's message is ours (PKCS#11 code, path) and is logged.
    frames = ";".join(f"{f.filename}:{f.lineno}:{f.name}" for f in traceback.extract_tb(exc.__traceback__))
    detail = exc.message if isinstance(exc, KMSInternalException) else ""
    log.error(
        "event=%s request_id=%s operation=%s error=%s detail=%r frames=%s",
        event,
        request_id,
        operation,
        f"{type(exc).__module__}.{type(exc).__qualname__}",  # a PKCS#11 error's class names its CKR
        detail,
        frames,
    )


def _internal_error_body(request_id: str) -> bytes:
    """What a client learns of an internal fault: that it happened, and where to look."""
    return _error_body(KMSInternalException.code, f"internal error, request id {request_id}")


class KmsApp:
    """ASGI 3 application; build it with :func:`create_app`."""

    def __init__(
        self,
        keystore: ServedKeyStore,
        verifier: RequestVerifier,
        metrics: RequestMetrics,
        *,
        background: Sequence[BackgroundTask] = (),
        on_shutdown: Callable[[], None] | None = None,
        slow_lane: SlowLane | None = None,
    ) -> None:
        self._keystore = keystore
        self._slow_lane = slow_lane
        self._verifier = verifier
        self._metrics = metrics
        self._dispatcher = Dispatcher(keystore)
        self._background = tuple(background)
        self._on_shutdown = on_shutdown
        self._tasks: list[asyncio.Task[None]] = []
        self._worker_header = (b"x-hsmkeys-worker", str(os.getpid()).encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # ------------------------------------------------------------ routing

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        method = scope["method"]
        request_id = new_request_id()
        if path == "/":
            if method == "POST":
                await self._kms(scope, receive, send, request_id)
                return
            allowed = "POST"
        elif path in ("/healthz", "/metrics"):
            if method == "GET":
                if path == "/healthz":
                    await self._healthz(send, request_id)
                else:
                    await self._metrics_page(send, request_id)
                return
            allowed = "GET"
        else:
            await self._respond(
                send, 404, _error_body("NotFound", f"No route for {path}"), request_id, close=True
            )
            return
        await self._respond(
            send,
            405,
            _error_body("MethodNotAllowed", f"{method} is not allowed on {path}"),
            request_id,
            extra=((b"allow", allowed.encode()),),
            close=True,
        )

    async def _healthz(self, send: Send, request_id: str) -> None:
        try:
            self._keystore.check_health()
        except KMSError as exc:
            body = json.dumps({"status": "unavailable", "error": exc.code}).encode()
            await self._respond(send, 503, body, request_id, content_type=b"application/json")
            return
        except Exception as exc:
            _log_internal("health_check_failed", request_id, "healthz", exc)
            body = json.dumps({"status": "unavailable", "error": KMSInternalException.code}).encode()
            await self._respond(send, 503, body, request_id, content_type=b"application/json")
            return
        await self._respond(send, 200, b'{"status":"ok"}', request_id, content_type=b"application/json")

    async def _metrics_page(self, send: Send, request_id: str) -> None:
        body = (self._metrics.render() + process_series()).encode("utf-8")
        await self._respond(send, 200, body, request_id, content_type=b"text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------ KMS

    async def _kms(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        started = time.perf_counter()
        headers: Sequence[tuple[bytes, bytes]] = scope["headers"]
        target: str | None = None
        content_type = b""
        declared_length = -1
        invocation_id: str | None = None
        for name, value in headers:
            if name == b"x-amz-target":
                target = value.decode("latin-1")
            elif name == b"amz-sdk-invocation-id":  # one logical request's retries share it
                invocation_id = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value
            elif name == b"content-length" and value.isdigit():
                declared_length = int(value)
        client = scope.get("client")
        source = client[0] if client else None
        operation: BoundOperation | None = None
        op_name = UNKNOWN_OPERATION
        principal: str | None = None
        try:
            operation = self._dispatcher.find(target)
            if operation is not None:
                op_name = operation.name
            try:
                body = await self._read_body(receive, declared_length)
            except _BodyTooLarge as too_large:
                if too_large.unread:
                    await self._discard_body(receive, declared_length)
                error = ValidationException(
                    f"Request body must be at most {MAX_BODY_BYTES} bytes"
                )
                await self._reject(send, request_id, op_name, None, source, error, started, status=413)
                return
            # The signer signed the path as sent (still percent-encoded), not as decoded.
            raw_path: bytes | None = scope.get("raw_path")
            path = raw_path.decode("latin-1") if raw_path else scope["path"]
            credential = self._verifier.verify(
                "POST", path, scope["query_string"].decode("latin-1"), headers, body
            )
            principal = credential.principal_arn
            operation = self._dispatcher.resolve(target)
            if _content_type(content_type) not in _ACCEPTED_CONTENT_TYPES:
                raise SerializationException(f"Content-Type must be {CONTENT_TYPE}")
            args = operation.parse(body)
        except _ClientGone:
            return
        except KMSError as exc:
            await self._reject(send, request_id, op_name, principal, source, exc, started)
            return
        except Exception as exc:  # a bug in parsing or auth: still an answer, never a crash
            _log_internal("internal_error", request_id, op_name, exc)
            await self._reject(
                send, request_id, op_name, principal, source, KMSInternalException(""), started
            )
            return

        # The KeyStore authorizes and writes the audit lines for everything from here on.
        try:
            if operation.slow and self._slow_lane is not None:
                out = await self._slow_lane.run(
                    functools.partial(
                        operation.call,
                        args,
                        principal=principal,
                        request_id=request_id,
                        source=source,
                        secure_transport=scope.get("scheme") == "https",
                        invocation_id=invocation_id,
                    )
                )
            else:
                out = operation.call(
                    args,
                    principal=principal,
                    request_id=request_id,
                    source=source,
                    secure_transport=scope.get("scheme") == "https",
                    invocation_id=invocation_id,
                )
        except KMSInternalException as exc:
            _log_internal("internal_error", request_id, op_name, exc)
            self._metrics.hsm_error(op_name)
            status, out, outcome = 500, _internal_error_body(request_id), exc.code
        except KMSError as exc:
            status, out, outcome = exc.http_status, _error_body(exc.code, exc.message), exc.code
        except Exception as exc:
            _log_internal("internal_error", request_id, op_name, exc)
            self._metrics.hsm_error(op_name)
            status, outcome = 500, KMSInternalException.code
            out = _internal_error_body(request_id)
        else:
            status, outcome = 200, SUCCESS
        await self._respond(send, status, out, request_id)
        self._metrics.observe_request(op_name, outcome, time.perf_counter() - started)

    async def _reject(
        self,
        send: Send,
        request_id: str,
        op_name: str,
        principal: str | None,
        source: str | None,
        error: KMSError,
        started: float,
        *,
        status: int | None = None,
    ) -> None:
        """Answer a request refused before the KeyStore, auditing the refusal."""
        try:
            self._keystore.audit_rejected(
                op_name, error.code, principal=principal, request_id=request_id, source=source
            )
        except Exception as exc:  # the refusal is still answered; the failure is logged
            _log_internal("audit_failed", request_id, op_name, exc)
        if isinstance(error, KMSInternalException):
            if error.message:  # raised with details (an empty one was logged where caught)
                _log_internal("internal_error", request_id, op_name, error)
            body = _internal_error_body(request_id)
        else:
            body = _error_body(error.code, error.message)
        await self._respond(
            send,
            status or error.http_status,
            body,
            request_id,
            close=status == 413,
        )
        self._metrics.observe_request(op_name, error.code, time.perf_counter() - started)

    @staticmethod
    async def _read_body(receive: Receive, declared_length: int) -> bytes:
        """The whole body, read chunk by chunk; stops at the limit (raises _BodyTooLarge)."""
        if declared_length > MAX_BODY_BYTES:
            raise _BodyTooLarge(unread=True)
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        first: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            if len(first) > MAX_BODY_BYTES:
                raise _BodyTooLarge(unread=False)
            return first
        chunks = [first]
        size = len(first)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _BodyTooLarge(unread=bool(message.get("more_body", False)))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _discard_body(receive: Receive, declared_length: int) -> None:
        """Read and drop the rest of a refused body, up to ``_DISCARD_MAX_BYTES``.

        Closing a connection with unread request bytes makes the kernel send a reset,
        which can destroy the 413 before the client (still sending) has read it.
        """
        if declared_length > _DISCARD_MAX_BYTES:
            return  # not worth reading: the client gets the 413 or a reset
        discarded = 0
        while discarded <= _DISCARD_MAX_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            discarded += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _respond(
        self,
        send: Send,
        status: int,
        body: bytes,
        request_id: str,
        *,
        content_type: bytes = CONTENT_TYPE.encode(),
        extra: Sequence[tuple[bytes, bytes]] = (),
        close: bool = False,
    ) -> None:
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"x-amzn-requestid", request_id.encode()),
            self._worker_header,
            *extra,
        ]
        if close:  # the rest of an unread body would otherwise be parsed as the next request
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # ------------------------------------------------------------ lifespan

    async def _flush_rejections(self) -> None:
        """Write each closed one-second window of unauthenticated refusals (per source)."""
        while True:
            await asyncio.sleep(_REJECTION_FLUSH_SECONDS)
            try:
                self._keystore.flush_rejections(older_than=_REJECTION_FLUSH_SECONDS)
            except Exception as exc:  # logged; the next tick tries again
                _log_internal("audit_failed", "-", "RejectionSummary", exc)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                for task in (*self._background, self._flush_rejections):
                    self._tasks.append(asyncio.create_task(task()))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def shutdown(self) -> None:
        """Stop background tasks, then run on_shutdown (closing the KeyStore). Idempotent."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        on_shutdown, self._on_shutdown = self._on_shutdown, None
        if on_shutdown is not None:
            on_shutdown()


def create_app(
    keystore: ServedKeyStore,
    verifier: RequestVerifier,
    metrics: RequestMetrics,
    *,
    background: Sequence[BackgroundTask] = (),
    on_shutdown: Callable[[], None] | None = None,
    slow_lane: SlowLane | None = None,
) -> KmsApp:
    """The ASGI app serving ``keystore``.

    ``background`` coroutines start at lifespan startup and are cancelled at shutdown;
    ``on_shutdown`` runs after them (the server passes ``keystore.close``, after closing
    the slow lane). ``slow_lane``: where ``slow`` operations run (None: on the loop).
    """
    return KmsApp(
        keystore, verifier, metrics, background=background, on_shutdown=on_shutdown, slow_lane=slow_lane
    )
