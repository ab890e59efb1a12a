"""Run the KMS server: one process, or a supervisor and N worker processes.

Process model
    ``workers == 1``: the app is served by the calling process.
    ``workers > 1``: the calling process supervises N workers started with
    multiprocessing's "spawn" method (a fresh interpreter: no PKCS#11 state is ever
    inherited across fork). On Linux each worker listens on its own SO_REUSEPORT
    socket, so the kernel spreads connections evenly (see ``_worker_listeners``);
    elsewhere they share one socket. Each worker opens its own KeyStore (own PKCS#11
    session and handle cache, own catalog connection). The catalog is the source of
    truth for key state and every call reads its key's row, so a key created, rotated
    or disabled through one worker is seen by the next call on any other. A worker
    that dies is restarted (at most ``_MAX_RESTARTS`` per ``_RESTART_WINDOW_S``, then
    the server stops); workers exit when the supervisor is gone.

Maintenance (due rotations and purges, ``KeyStore.run_maintenance``) runs every
``settings.maintenance_interval_seconds`` in exactly one process of all the servers
sharing a catalog. On each host, every process tries a non-blocking ``flock`` on
``<catalog>.maintenance.lock`` and only its holder goes on (the kernel drops the lock
when its holder dies, so another process of the host takes over). The holder then takes
the catalog's maintenance lease (``settings.maintenance_lease_seconds``, renewed every
``min(interval, lease / 3)``) and runs maintenance only while it holds it: a host that
dies or freezes loses the lease when it expires and another host's holder takes over.
A clean shutdown gives the lease up at once. Other maintainers should take the same
lock (:func:`maintenance_lock_path`).

Shutdown: SIGTERM or SIGINT stops accepting connections, lets in-flight requests
finish (up to ``GRACEFUL_SHUTDOWN_S``), stops the maintenance loop (a run in progress
completes: the slow lane's thread is waited for), then closes the KeyStore. The
supervisor forwards the signal to its workers and waits for them.

Readiness: once every worker has finished startup, ``listening on http://HOST:PORT``
(``https://`` with TLS; the bound port, also with ``port=0``) is printed to stdout
and flushed, then ``ready(url)`` is called if given.

TLS: with ``settings.server.tls_cert``/``tls_key`` every process serves HTTPS. The
listening sockets stay plain TCP sockets (the SO_REUSEPORT group is made here);
uvicorn hands each to ``loop.create_server(sock=..., ssl=context)``, which runs the
handshake on every accepted connection. The pair is loaded once before binding so a
bad file is one ConfigError. Plain HTTP on an address that is not loopback is
refused unless ``insecure_http`` (a TLS-terminating proxy in front).

Startup refusals (ConfigError): no principals, an unreadable (or group/other
readable) secret, ``audit_log`` unset without ``no_audit``, a bad TLS pair, plain
HTTP off loopback.

Access log: with ``settings.server.access_log`` each process writes one line per
request to the ``hsmkeys.access`` logger (:mod:`hsmkeys.server.accesslog`).

Ephemeral mode (:func:`run_ephemeral`) serves a throwaway SoftHSM2 token and catalog in
a temporary directory that is removed on exit.

Errors: ConfigError for bad settings (no principals, a secret that cannot be read),
a port already in use, or a worker that fails to start (its error is included);
:class:`ServerError` when workers keep dying after startup.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import ipaddress
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from hsmkeys.audit import writer_log_path
from hsmkeys.config import (
    DEFAULT_ACCOUNT_ID,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_REGION,
    ENV_PREFIX,
    HsmSettings,
    PrincipalSettings,
    ServerSettings,
    Settings,
    check_account_id,
    check_region,
    is_access_key_id,
    new_access_key_id,
    new_secret_access_key,
)
from hsmkeys.errors import ConfigError, KMSError
from hsmkeys.hsm import softhsm
from hsmkeys.keystore import KeyStore
from hsmkeys.server.accesslog import with_access_log
from hsmkeys.server.app import ASGIApp, RequestMetrics, RequestVerifier, create_app
from hsmkeys.server.metrics import Metrics
from hsmkeys.server.sigv4 import Credential, SigV4Verifier
from hsmkeys.server.slowlane import SlowLane
from hsmkeys.server.tls import load_server_context

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "GRACEFUL_SHUTDOWN_S",
    "ServerError",
    "build_verifier",
    "ephemeral_settings",
    "maintenance_lock_path",
    "run_ephemeral",
    "run_server",
]

log = logging.getLogger("hsmkeys.server")

#: How long in-flight requests may run after SIGTERM before they are cancelled.
GRACEFUL_SHUTDOWN_S = 30.0
USAGE_FLUSH_SECONDS = 5.0  # key usage counters: memory -> catalog (KeyStore.close flushes the rest)
_TLS_CLOSE_WAIT_S = 1.0  # at shutdown, for a client's close_notify (see _run_until_stopped)
_WORKER_STOP_EXTRA_S = 10.0  # beyond the grace period, before a worker is killed
_MAX_RESTARTS = 5
_RESTART_WINDOW_S = 60.0
_BACKLOG = 2048
_EPHEMERAL_LABEL = "hsmkeys-ephemeral"
#: The ephemeral admin's identity policy: every KMS action on every resource.
EPHEMERAL_ADMIN_POLICY = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]},
    sort_keys=True,
    separators=(",", ":"),
)
_REUSE_PORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


class ServerError(Exception):
    """The server could not keep running (workers kept dying)."""


# ------------------------------------------------------------------ public API


def run_server(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int = 1,
    ready: Callable[[str], None] | None = None,
    insecure_http: bool = False,
    no_audit: bool = False,
) -> None:
    """Serve ``settings`` until SIGTERM/SIGINT; returns after a graceful shutdown.

    ``host`` and ``port`` default to ``settings.server``'s. Prints ``listening on
    <url>`` when every worker is ready, then calls ``ready(url)``. Raises ConfigError
    (bad settings, ``audit_log`` unset without ``no_audit``, plain HTTP off loopback
    without ``insecure_http``, port in use, a worker failing to start) or ServerError
    (workers dying repeatedly).
    """
    host = settings.server.host if host is None else host
    port = settings.server.port if port is None else port
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    build_verifier(settings)  # fail before binding: no principals, unreadable secrets
    if settings.audit_log is None and not no_audit:
        raise ConfigError(
            "audit_log: not set, so nothing would record who used which key; set audit_log "
            f"in the config (or {ENV_PREFIX}AUDIT_LOG), or pass --no-audit to serve without one"
        )
    server = settings.server
    if server.tls_cert is not None and server.tls_key is not None:
        load_server_context(server.tls_cert, server.tls_key)
    _configure_logging()
    with _StopSignals() as stop:
        address = _resolve(host, port)
        if not server.tls and not insecure_http and not address.is_loopback():
            raise ConfigError(
                f"refusing plain HTTP on {_host_port(address.address)}, which is not a loopback "
                "address: requests carry plaintext and key material. Give a certificate "
                "(--tls-cert/--tls-key or server.tls_cert/tls_key; hsmkeys init --self-signed-cert "
                "makes one), or pass --insecure-http when a TLS-terminating proxy is in front"
            )
        if workers == 1:
            sock = address.listen()
            try:
                url = _url(host, sock.getsockname()[1], tls=server.tls)
                _serve(
                    settings,
                    sock,
                    stop=stop,
                    on_started=functools.partial(_announce, url, ready),
                    parent_pid=None,
                )
            finally:
                sock.close()
        else:
            with _worker_listeners(address) as (listener, bound_port):
                url = _url(host, bound_port, tls=server.tls)
                _Supervisor(settings, listener, workers, stop).run(
                    functools.partial(_announce, url, ready)
                )


def _announce(url: str, ready: Callable[[str], None] | None) -> None:
    print(f"listening on {url}", flush=True)
    if ready is not None:
        ready(url)


def run_ephemeral(
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workers: int = 1,
    ready: Callable[[str], None] | None = None,
    audit_log: Path | None = None,
    region: str | None = None,
    account_id: str | None = None,
    maintenance_interval_seconds: float = 60.0,
    server: ServerSettings | None = None,
    insecure_http: bool = False,
    no_audit: bool = False,
) -> None:
    """Serve a throwaway SoftHSM2 token and catalog, removed on exit.

    The admin principal ``arn:aws:iam::<account>:user/admin`` (identity policy: ``kms:*``
    on ``*``) uses AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY from the environment when both are set; otherwise a key
    pair is generated and printed once. ``region`` and ``account_id`` default to
    HSMKEYS_REGION / HSMKEYS_ACCOUNT_ID, else us-east-1 / 111122223333. The audit log
    goes to ``audit_log`` if given, else into the temporary directory; its path is
    printed at start; ``no_audit`` serves without one (nothing is audited). ``server``
    gives TLS and the access log (its host and port are replaced by ``host`` and ``port``).
    """
    with tempfile.TemporaryDirectory(prefix="hsmkeys-ephemeral-") as tmp:
        settings, generated = ephemeral_settings(
            Path(tmp),
            env=os.environ,
            audit_log=audit_log,
            region=region,
            account_id=account_id,
            maintenance_interval_seconds=maintenance_interval_seconds,
        )
        settings = dataclasses.replace(
            settings,
            server=dataclasses.replace(server or ServerSettings(), host=host, port=port),
            audit_log=None if no_audit else settings.audit_log,
        )
        print(f"ephemeral store in {tmp} (removed on exit)", flush=True)
        print(f"audit log: {settings.audit_log or 'none (--no-audit: nothing is audited)'}", flush=True)
        print(f"region: {settings.region} account: {settings.account_id}", flush=True)
        principal = settings.principals[0]
        if generated:
            print(f"principal: {principal.arn}", flush=True)
            print(f"AWS_ACCESS_KEY_ID={principal.access_key_id}", flush=True)
            print(f"AWS_SECRET_ACCESS_KEY={principal.secret_access_key()}", flush=True)
        else:
            print(
                f"principal: {principal.arn} (credentials from AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY)",
                flush=True,
            )
        conf = Path(tmp) / softhsm.CONF_NAME
        with _environ("SOFTHSM2_CONF", str(conf)):
            run_server(settings, workers=workers, ready=ready, insecure_http=insecure_http, no_audit=no_audit)


def ephemeral_settings(
    directory: Path,
    *,
    env: Mapping[str, str],
    audit_log: Path | None = None,
    region: str | None = None,
    account_id: str | None = None,
    maintenance_interval_seconds: float = 60.0,
) -> tuple[Settings, bool]:
    """Make a SoftHSM2 token, PIN and admin credential under ``directory``.

    Returns the settings and whether the credentials were generated (rather than
    taken from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in ``env``). ``region`` and
    ``account_id`` default to HSMKEYS_REGION / HSMKEYS_ACCOUNT_ID in ``env``, else
    us-east-1 / 111122223333. Serving them needs
    ``SOFTHSM2_CONF=<directory>/softhsm2.conf`` in the environment before the PKCS#11
    module is loaded (:func:`run_ephemeral` does that). ConfigError for a bad region,
    account id or AWS_ACCESS_KEY_ID (the config file's rules), checked before the
    token is made.
    """
    directory = directory.resolve()
    region = check_region(
        region or env.get(f"{ENV_PREFIX}REGION") or DEFAULT_REGION,
        f"region (--region or {ENV_PREFIX}REGION)",
    )
    account_id = check_account_id(
        account_id or env.get(f"{ENV_PREFIX}ACCOUNT_ID") or DEFAULT_ACCOUNT_ID,
        f"account_id (--account-id or {ENV_PREFIX}ACCOUNT_ID)",
    )
    access_key_id = env.get("AWS_ACCESS_KEY_ID", "")
    secret_access_key = env.get("AWS_SECRET_ACCESS_KEY", "")
    generated = not (access_key_id and secret_access_key)
    if generated:
        access_key_id = new_access_key_id()
        secret_access_key = new_secret_access_key()
    elif not is_access_key_id(access_key_id):
        raise ConfigError(
            "AWS_ACCESS_KEY_ID: 1-128 letters, digits or underscores, "
            f"as for principals in a config file; got {access_key_id!r}"
        )
    module = softhsm.find_module()
    conf = softhsm.write_conf(directory)
    pin = secrets.token_hex(8)
    softhsm.init_token(conf, _EPHEMERAL_LABEL, pin, secrets.token_hex(8))
    pin_file = _secret_file(directory / "pin", pin)
    secret_file = _secret_file(directory / "admin-secret", secret_access_key)

    settings = Settings(
        hsm=HsmSettings(module=str(module), token_label=_EPHEMERAL_LABEL, pin_file=pin_file),
        catalog=directory / "catalog.sqlite3",
        region=region,
        account_id=account_id,
        audit_log=audit_log if audit_log is not None else directory / "audit.log",
        maintenance_interval_seconds=maintenance_interval_seconds,
        principals=(
            PrincipalSettings(
                arn=f"arn:aws:iam::{account_id}:user/admin",
                access_key_id=access_key_id,
                secret_access_key_file=secret_file,
                policy=EPHEMERAL_ADMIN_POLICY,
            ),
        ),
    )
    return settings, generated


def build_verifier(settings: Settings) -> SigV4Verifier:
    """A SigV4 verifier for ``settings.principals``; ConfigError if there are none."""
    if not settings.principals:
        raise ConfigError(
            "no principals configured: the server would refuse every request "
            "(add principals with access_key_id and a secret_access_key_env/_file)"
        )
    return SigV4Verifier(
        (
            Credential(
                access_key_id=p.access_key_id,
                secret_access_key=p.secret_access_key(),
                principal_arn=p.arn,
            )
            for p in settings.principals
        ),
        region=settings.region,
    )


def maintenance_lock_path(settings: Settings) -> Path:
    """The file whose flock elects the one process that runs maintenance."""
    return settings.catalog.with_name(settings.catalog.name + ".maintenance.lock")


# ------------------------------------------------------------------ one serving process


class _StopSignals:
    """SIGTERM/SIGINT handlers that record a stop request instead of killing the process.

    uvicorn installs its own handlers while it serves and re-raises the signals it
    caught once it has shut down; these then absorb them, so cleanup code still runs.
    Outside the main thread (where signals cannot be handled) this is a plain flag.
    """

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self._SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()


class _Once:
    def __init__(self, action: Callable[[], None]) -> None:
        self._action: Callable[[], None] | None = action

    def __call__(self) -> None:
        action, self._action = self._action, None
        if action is not None:
            action()


class _MaintenanceLock:
    """A non-blocking exclusive flock, held from first success until release."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the lock


class _MaintenanceLeader:
    """This process's claim to run maintenance: the host's flock (one process per host
    contends), then the catalog's lease (one host at a time)."""

    def __init__(self, keystore: KeyStore, lock: _MaintenanceLock, lease_seconds: float) -> None:
        self._keystore = keystore
        self._lock = lock
        self.lease_seconds = lease_seconds
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._held = False

    def renew(self) -> bool:
        """Take or renew the lease; whether this process may run maintenance now."""
        held = False
        try:
            held = self._lock.try_acquire() and self._keystore.hold_maintenance_lease(
                self.holder, self.lease_seconds
            )
        finally:
            if held != self._held:
                log.info("event=maintenance_lease held=%s holder=%s", held, self.holder)
            self._held = held
        return held

    def release(self) -> None:
        """Give the lease up if held (errors are logged: it expires anyway)."""
        if not self._held:
            return
        self._held = False
        try:
            self._keystore.release_maintenance_lease(self.holder)
        except KMSError as exc:
            log.warning("event=maintenance_lease_release_failed error=%s", type(exc).__name__)


async def _maintenance_loop(
    keystore: KeyStore, interval: float, leader: _MaintenanceLeader, slow_lane: SlowLane
) -> None:
    """Renew the lease every ``min(interval, lease / 3)`` seconds and, while holding it,
    run due rotations and purges every ``interval`` seconds in the slow lane."""
    renew_every = min(interval, leader.lease_seconds / 3)
    next_run = 0.0
    while True:
        try:
            if leader.renew() and time.monotonic() >= next_run:
                next_run = time.monotonic() + interval
                # In the slow lane (own HSM session): key generation and token scans
                # never stall requests. A cancelled loop does not stop a run in
                # progress; closing the lane waits for it, so none is left half done.
                report = await slow_lane.run(keystore.run_maintenance)
                if report.rotated or report.purged or report.swept:
                    log.info(
                        "event=maintenance rotated=%d purged=%d swept=%d",
                        len(report.rotated),
                        len(report.purged),
                        len(report.swept),
                    )
        except Exception as exc:  # keep serving; the next interval retries
            log.error("event=maintenance_failed error=%s", type(exc).__name__)
        await asyncio.sleep(renew_every)


async def _usage_flush_loop(keystore: KeyStore, interval: float) -> None:
    """Add the in-memory key usage counts to the catalog every ``interval`` seconds
    (the last ones are flushed by ``KeyStore.close`` at shutdown)."""
    while True:
        await asyncio.sleep(interval)
        try:
            keystore.flush_usage()  # one short transaction; the counts stay in memory on failure
        except Exception as exc:  # keep serving; the next interval retries
            log.error("event=usage_flush_failed error=%s", type(exc).__name__)


def _serve(
    settings: Settings,
    sock: socket.socket,
    *,
    stop: _StopSignals,
    on_started: Callable[[], None],
    parent_pid: int | None,
) -> None:
    """Open a KeyStore and serve the app on ``sock`` until stopped; always closes the store."""
    verifier = build_verifier(settings)
    lock = _MaintenanceLock(maintenance_lock_path(settings))
    keystore = KeyStore.open(settings)
    # Serve at once: the handle index is built in the background (seconds on a big
    # token); until then a miss costs one search. A backend that cannot: index now.
    if not keystore.start_indexing():
        keystore.preload()
    slow_lane = SlowLane(keystore)
    leader = _MaintenanceLeader(keystore, lock, settings.maintenance_lease_seconds)

    def close_store() -> None:
        slow_lane.close()  # its calls (a key generation, maintenance) finish first
        leader.release()  # before closing: another instance takes over at once
        keystore.close()

    close = _Once(close_store)
    try:
        served_verifier: RequestVerifier = verifier
        metrics: RequestMetrics = Metrics()
        wrap: Callable[[ASGIApp], ASGIApp] = _unwrapped
        if settings.server.access_log:
            served_verifier, metrics, wrap = with_access_log(verifier, metrics)
        app = create_app(
            keystore,
            served_verifier,
            metrics,
            background=(
                functools.partial(
                    _maintenance_loop, keystore, settings.maintenance_interval_seconds, leader, slow_lane
                ),
                functools.partial(_usage_flush_loop, keystore, USAGE_FLUSH_SECONDS),
            ),
            on_shutdown=close,
            slow_lane=slow_lane,
        )
        tls = settings.server
        config = uvicorn.Config(
            wrap(app),
            lifespan="on",
            log_config=None,  # the process's logging setup applies (see _configure_logging)
            access_log=False,  # ours (hsmkeys.access) logs the authenticated caller instead
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN_S),
            # uvicorn wraps each accepted connection of our plain listening socket.
            ssl_certfile=str(tls.tls_cert) if tls.tls_cert is not None else None,
            ssl_keyfile=str(tls.tls_key) if tls.tls_key is not None else None,
        )
        server = uvicorn.Server(config)
        if not stop.is_set():
            with asyncio.Runner(loop_factory=_loop_factory()) as loop_runner:
                loop_runner.run(_run_until_stopped(server, sock, stop, on_started, parent_pid))
    finally:
        close()
        lock.release()


async def _run_until_stopped(
    server: uvicorn.Server,
    sock: socket.socket,
    stop: _StopSignals,
    on_started: Callable[[], None],
    parent_pid: int | None,
) -> None:
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    announced = False
    closing_since: dict[int, float] = {}
    while not serving.done():
        # A signal that arrived before uvicorn installed its handlers landed in ours.
        if stop.is_set() or (parent_pid is not None and os.getppid() != parent_pid):
            server.should_exit = True
        if server.started and not announced:
            announced = True
            on_started()
        if server.should_exit:
            _abort_unanswered_tls_closes(server, closing_since)
        await asyncio.wait(
            {serving}, timeout=0.01 if not announced else 0.1 if server.should_exit else 0.5
        )
    await serving


def _abort_unanswered_tls_closes(server: uvicorn.Server, closing_since: dict[int, float]) -> None:
    """Abort connections uvicorn closed at shutdown that wait for the client's TLS close_notify.

    uvicorn closes idle keep-alive connections when it stops; over TLS that sends a
    close_notify and waits (asyncio's ssl_shutdown_timeout, 30 s) for the client's,
    which a pooled, idle client never sends: shutdown would take the whole grace period.
    A connection closing with nothing left to write for ``_TLS_CLOSE_WAIT_S`` is aborted.
    """
    now = time.monotonic()
    for connection in list(server.server_state.connections):
        transport = getattr(connection, "transport", None)
        if transport is None or not transport.is_closing() or transport.get_write_buffer_size():
            continue
        first_seen = closing_since.setdefault(id(connection), now)
        if now - first_seen >= _TLS_CLOSE_WAIT_S:
            transport.abort()


# ------------------------------------------------------------------ supervisor


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection  # the supervisor's end: ("ready", pid) or ("failed", message)


def _worker_main(
    settings: Settings, listener: _Listener, index: int, conn: Connection, parent_pid: int
) -> None:
    """Entry point of a spawned worker process.

    Worker ``index`` (from 0) writes the audit chain ``writer_log_path(audit_log, index + 1)``:
    the first worker the configured file, the others ``<audit_log>.w<n>``, so workers never
    contend for one chain (``hsmkeys audit verify`` checks them all).
    """
    _configure_logging()
    if settings.audit_log is not None:
        settings = dataclasses.replace(settings, audit_log=writer_log_path(settings.audit_log, index + 1))
    with _StopSignals() as stop:
        try:
            sock = listener if isinstance(listener, socket.socket) else listener.listen()
            try:
                _serve(
                    settings,
                    sock,
                    stop=stop,
                    on_started=lambda: conn.send(("ready", os.getpid())),
                    parent_pid=parent_pid,
                )
            finally:
                sock.close()
        except (ConfigError, KMSError) as exc:
            log.error("event=worker_start_failed worker=%d error=%s", index, exc)
            with contextlib.suppress(OSError):
                conn.send(("failed", str(exc)))
            sys.exit(2)


class _Supervisor:
    def __init__(
        self, settings: Settings, listener: _Listener, workers: int, stop: _StopSignals
    ) -> None:
        self._settings = settings
        self._listener = listener
        self._count = workers
        self._stop = stop
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._restarts: list[float] = []

    def run(self, announce: Callable[[], None]) -> None:
        try:
            for index in range(self._count):
                self._start(index)
            if not self._wait_ready():
                return
            announce()
            self._monitor()
        finally:
            self._stop_all()

    def _start(self, index: int) -> None:
        ours, theirs = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker_main,
            args=(self._settings, self._listener, index, theirs, os.getpid()),
            name=f"hsmkeys-worker-{index}",
            daemon=False,
        )
        process.start()
        theirs.close()
        self._workers[index] = _Worker(index, process, ours)

    def _wait_ready(self) -> bool:
        """True when every worker reported ready; False on a stop request; raises on failure."""
        pending = dict(self._workers)
        while pending:
            if self._stop.is_set():
                return False
            waitables: list[Any] = [w.conn for w in pending.values()]
            waitables += [w.process.sentinel for w in pending.values()]
            multiprocessing.connection.wait(waitables, timeout=0.2)
            for index, worker in list(pending.items()):
                message = _poll(worker.conn)
                if message is not None and message[0] == "ready":
                    del pending[index]
                elif message is not None or not worker.process.is_alive():
                    detail = message[1] if message is not None else None
                    worker.process.join(timeout=5)
                    raise ConfigError(
                        f"worker {index} failed to start: "
                        + (detail or f"exit code {worker.process.exitcode}")
                    )
        return True

    def _monitor(self) -> None:
        while not self._stop.is_set():
            sentinels = [w.process.sentinel for w in self._workers.values()]
            multiprocessing.connection.wait(sentinels, timeout=0.5)
            for index, worker in list(self._workers.items()):
                _poll(worker.conn)  # drain a restarted worker's ready message
                if worker.process.is_alive() or self._stop.is_set():
                    continue
                log.error(
                    "event=worker_died worker=%d pid=%s exit_code=%s",
                    index,
                    worker.process.pid,
                    worker.process.exitcode,
                )
                worker.conn.close()
                now = time.monotonic()
                self._restarts = [t for t in self._restarts if now - t < _RESTART_WINDOW_S]
                if len(self._restarts) >= _MAX_RESTARTS:
                    raise ServerError(
                        f"workers died {_MAX_RESTARTS} times within {_RESTART_WINDOW_S:.0f} s; stopping"
                    )
                self._restarts.append(now)
                self._start(index)

    def _stop_all(self) -> None:
        workers = list(self._workers.values())
        for worker in workers:
            if worker.process.is_alive() and worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACEFUL_SHUTDOWN_S + _WORKER_STOP_EXTRA_S
        for worker in workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.error("event=worker_killed worker=%d pid=%s", worker.index, worker.process.pid)
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self._workers.clear()


def _poll(conn: Connection) -> tuple[str, Any] | None:
    try:
        if conn.closed or not conn.poll():
            return None
        message: tuple[str, Any] = conn.recv()
        return message
    except (EOFError, OSError):
        return None


# ------------------------------------------------------------------ helpers


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (a dependency on Linux), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


@dataclass(frozen=True, slots=True)
class _Address:
    """A resolved listen address; ``reuse_port`` makes every socket on it join one group."""

    family: int
    address: tuple[Any, ...]
    reuse_port: bool = False

    def bind(self, *, listen: bool) -> socket.socket:
        """A socket bound here (listening if ``listen``); ConfigError if the port is taken."""
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when their
        # protocol says TCP; without it every small response waits out delayed ACK (40 ms).
        sock = socket.socket(self.family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(self.address)
            if listen:
                sock.listen(_BACKLOG)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot listen on {_host_port(self.address)}: {exc.strerror}"
            ) from None
        sock.set_inheritable(True)
        return sock

    def listen(self) -> socket.socket:
        return self.bind(listen=True)

    def is_loopback(self) -> bool:
        """Whether only this host can connect (127.0.0.0/8, ::1), not a wildcard or interface."""
        host = str(self.address[0]).partition("%")[0]  # an IPv6 scope id is not part of it
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


#: What a worker is given: a socket shared by all workers, or an address it binds itself.
_Listener = socket.socket | _Address


def _resolve(host: str, port: int) -> _Address:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve listen address {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    return _Address(int(family), tuple(address))


@contextlib.contextmanager
def _worker_listeners(address: _Address) -> Iterator[tuple[_Listener, int]]:
    """What workers listen on, and the bound port, for as long as the supervisor runs.

    On Linux each worker binds its own SO_REUSEPORT socket, so the kernel spreads
    connections evenly over the workers (one shared socket hands nearly every new
    connection to the same idle worker). The supervisor keeps a bound, non-listening
    member of the group: it pins the port (also a port-0 pick) for restarted workers
    and, not listening, is never given a connection. Elsewhere the workers share one
    listening socket.
    """
    if not _REUSE_PORT:
        sock = address.listen()
        try:
            yield sock, sock.getsockname()[1]
        finally:
            sock.close()
        return
    # A socket without SO_REUSEPORT cannot bind where a reuse-port group exists: this
    # probe refuses a port another server (even one of ours) is already serving.
    probe = address.bind(listen=False)
    bound = probe.getsockname()
    probe.close()
    group = _Address(address.family, (address.address[0], bound[1], *address.address[2:]), True)
    reservation = group.bind(listen=False)
    try:
        yield group, bound[1]
    finally:
        reservation.close()


def _host_port(address: tuple[Any, ...]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _url(host: str, port: int, *, tls: bool = False) -> str:
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _unwrapped(app: ASGIApp) -> ASGIApp:
    return app


def _configure_logging() -> None:
    """Structured-ish lines to stderr, unless the embedding program configured logging."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            stream=sys.stderr,
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s pid=%(process)d %(message)s",
        )


def _secret_file(path: Path, value: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(value)
    return path


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """Set an environment variable (inherited by spawned workers), restoring it after."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
