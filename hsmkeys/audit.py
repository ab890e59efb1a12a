"""Tamper-evident audit trail: a SHA-256 hash chain of JSON lines, signed in the HSM.

File format (ASCII, one canonical JSON object per line: keys sorted, compact
separators, ``\\n``-terminated). Every line has ``seq`` (1, 2, 3, … continuing
across rotated files) and a link to the previous line: the hex SHA-256 of the
previous line's bytes, newline included (``prev``; ``chain`` on checkpoints; 64
zeros before line 1). Three kinds of line:

* **event** — one audited call (:class:`AuditEvent`), unsigned::

      {"count":…,"decision":…,"key_arns":[…],"key_version":…,"operation":…,
       "outcome":…,"phase":…,"prev":…,"principal":…,"request_id":…,"seq":…,
       "source":…,"time":…}

* **checkpoint** — ``{"chain":…,"checkpoint":true,"kind":…,"mac":…,"seq":…,"time":…}``
  (plus ``"follows"``, the rotated file's name, on a ``link`` checkpoint). ``mac`` is
  an HMAC computed in the HSM over ``_CHECKPOINT_DOMAIN`` + the canonical line without
  ``mac``, so it signs the whole chain before it. One is written when a line is
  appended ≥ ``checkpoint_seconds`` after the last one, every ``checkpoint_lines``
  lines, by a timer when a line stays unsigned ``checkpoint_seconds``, on ``close``,
  on ``checkpoint()`` and on rotation; each is fsynced and also stored through the
  optional ``checkpoints`` store (the catalog) as an :class:`AuditCheckpoint`
  (``sequence``/``chain_hash``/``mac`` of the checkpoint line itself).
* **break** — ``{"break":what,"expected_chain":…,"expected_seq":…,"found_seq":…,
  "prev":…,"seq":…,"time":…}``: the writer found the log missing, emptied, with a
  damaged tail, or behind / different from the catalog's checkpoint. It continues
  the sequence after the marker instead of silently starting a new chain, so
  :func:`verify_audit_logs` still reports the damage.

A multi-worker server gives each worker a chain of its own (:func:`writer_log_path`:
``<path>`` for the first, ``<path>.w<n>`` for the others); :func:`audit_log_chains`
lists them for verification and rotation. One chain is also safe for several
processes (the CLI beside the first worker): they take turns under the file's flock.

Every file starts with a checkpoint: ``genesis`` (seq 1, zero chain) for a new log,
``link`` for the file :meth:`AuditLog.rotate` starts (it continues the chain of the
renamed file). Rotate with ``hsmkeys audit rotate`` or ``max_bytes``, never with an
external ``logrotate``: a vanished file is reported as deleted.

What verification can prove: with the catalog checkpoint, editing, inserting,
removing, reordering, truncating, emptying, deleting or replaying files is
detected. Lines written after the newest checkpoint (at most ~``checkpoint_seconds``
of them, when a writer is killed) are covered by no signature.

Events carry no field for plaintext, key material, signatures or PINs, by design.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol

from hsmkeys.catalog.base import AuditCheckpoint
from hsmkeys.errors import KMSError, KMSInternalException

__all__ = [
    "AuditEvent",
    "AuditLog",
    "AuditVerification",
    "CheckpointKind",
    "CheckpointStore",
    "MacFunction",
    "audit_log_chains",
    "audit_log_files",
    "verify_audit_logs",
    "writer_log_path",
]

log = logging.getLogger(__name__)

MacFunction = Callable[[bytes], bytes]

ZERO_CHAIN: Final = "0" * 64
# Domain separation: the audit key signs nothing else with this prefix.
_CHECKPOINT_DOMAIN: Final = b"hsmkeys-audit-checkpoint-v1\n"
PHASES: Final = frozenset({"intent", "done"})
# A real line is a few hundred bytes; anything past this at the tail is damage.
_MAX_LINE: Final = 1 << 20
_TAIL_CHUNK: Final = 1024  # a line is ~400 bytes; grown x4 until one fits
_ROTATED_SUFFIX: Final = re.compile(r"\.\d{8}T\d{6}\.\d{6}Z")
# A worker's chain file after the configured name: ".w<n>", perhaps with a rotated suffix.
_WRITER_FILE: Final = re.compile(r"\.w([2-9]|[1-9]\d+)(\.\d{8}T\d{6}\.\d{6}Z)?")

_EVENT_KEYS: Final = frozenset(
    {
        "count",
        "decision",
        "key_arns",
        "key_version",
        "operation",
        "outcome",
        "phase",
        "prev",
        "principal",
        "request_id",
        "seq",
        "source",
        "time",
    }
)
_CHECKPOINT_KEYS: Final = frozenset({"chain", "checkpoint", "kind", "mac", "seq", "time"})
_LINK_KEYS: Final = _CHECKPOINT_KEYS | {"follows"}
_BREAK_KEYS: Final = frozenset(
    {"break", "expected_chain", "expected_seq", "found_seq", "prev", "seq", "time"}
)


class CheckpointKind(enum.StrEnum):
    """Why a checkpoint was written (a closed set; ``genesis`` and ``link`` open a file)."""

    GENESIS = "genesis"  # first line of a new log
    LINK = "link"  # first line of the file rotate() starts
    LINES = "lines"  # checkpoint_lines lines since the last one
    INTERVAL = "interval"  # a line appended checkpoint_seconds after the last one
    TIMER = "timer"  # a line stayed unsigned checkpoint_seconds
    CLOSE = "close"
    ROTATE = "rotate"  # last line of a rotated file
    FORCED = "forced"  # checkpoint()
    BREAK = "break"  # signs a break marker


class Break(enum.StrEnum):
    """What a writer found wrong when it opened (or followed) the log."""

    MISSING = "missing"
    EMPTIED = "emptied"
    DAMAGED_TAIL = "damaged-tail"
    BEHIND_CATALOG = "behind-catalog"
    DIVERGED = "diverged-from-catalog"


_BREAK_TEXT: Final = {
    Break.MISSING: "the log file missing (deleted)",
    Break.EMPTIED: "the log file empty (emptied)",
    Break.DAMAGED_TAIL: "the log's last line damaged (torn or edited)",
    Break.BEHIND_CATALOG: "the log ending before its newest checkpoint "
    "(truncated, or replaced by an older copy)",
    Break.DIVERGED: "a different line where the newest checkpoint was (the log was replaced)",
}


_KINDS: Final = frozenset(kind.value for kind in CheckpointKind)
_BREAKS: Final = frozenset(what.value for what in Break)


class CheckpointStore(Protocol):
    """Where the newest checkpoint is kept outside the log (the catalog)."""

    def get_audit_checkpoint(self, log_id: str) -> AuditCheckpoint | None: ...

    def put_audit_checkpoint(self, checkpoint: AuditCheckpoint) -> None: ...


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited call. There is deliberately no field for secrets of any kind.

    ``phase`` is ``"intent"`` (written before a state change, outcome ``"Pending"``)
    or ``"done"``; ``key_arns`` lists every key the call touched (ReEncrypt: source
    then destination); ``decision`` is the authorization decision (None for trusted
    in-process calls); ``count`` is set on summary lines of unauthenticated
    rejections. Raises ValueError for a naive ``time`` or an unknown ``phase``.
    """

    time: datetime
    request_id: str
    principal: str | None
    operation: str
    phase: str = "done"
    key_arns: tuple[str, ...] = ()
    key_version: int | None = None
    outcome: str = "Success"
    decision: str | None = None
    source: str | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if self.time.tzinfo is None or self.time.utcoffset() is None:
            raise ValueError("AuditEvent.time must be timezone-aware")
        if self.phase not in PHASES:
            raise ValueError(f"AuditEvent.phase must be one of {sorted(PHASES)}")


@dataclass(frozen=True, slots=True)
class AuditVerification:
    """The verdict of :func:`verify_audit_logs`.

    ``lines`` counts lines read across all files; ``first_bad_line`` is 1-based within
    ``file`` (None when the problem is a whole file or the log's end); ``reason`` names
    the problem; ``last_checkpoint`` is the seq of the last valid checkpoint read.
    """

    ok: bool
    lines: int
    first_bad_line: int | None
    reason: str
    file: Path | None = None
    last_checkpoint: int | None = None


def _rfc3339(when: datetime) -> str:
    if when.tzinfo is UTC:  # the usual case: isoformat ends "+00:00"
        return when.isoformat(timespec="microseconds")[:-6] + "Z"
    utc = when.astimezone(UTC)
    return utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _canonical(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _line(obj: dict[str, Any]) -> bytes:
    return (_canonical(obj) + "\n").encode("ascii")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_hex64(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _checkpoint_mac(mac: MacFunction, unsigned: dict[str, Any]) -> str:
    return mac(_CHECKPOINT_DOMAIN + _canonical(unsigned).encode("ascii")).hex()


def writer_log_path(path: Path, writer: int) -> Path:
    """The chain file of a server's ``writer``-th worker: ``path`` for the first,
    ``<path>.w<n>`` for the others. Each worker of a multi-worker server keeps a chain of
    its own, so no worker waits on another's file lock or re-reads another's lines; each
    chain has its own checkpoints (in the catalog under its own log id)."""
    if writer < 1:
        raise ValueError("writer numbers start at 1")
    path = Path(path)
    return path if writer == 1 else path.with_name(f"{path.name}.w{writer}")


def audit_log_chains(path: Path, known_log_ids: Sequence[str] = ()) -> list[Path]:
    """``path`` and its workers' chain files (:func:`writer_log_path`) in writer order:
    those with a live or a rotated file, and those the checkpoint store knows
    (``known_log_ids``: resolved paths), so a chain whose files were all deleted is
    still checked and found missing."""
    path = Path(path)
    writers = {1}
    with contextlib.suppress(FileNotFoundError):
        for sibling in path.parent.iterdir():
            if sibling.name.startswith(path.name):
                found = _WRITER_FILE.fullmatch(sibling.name[len(path.name) :])
                if found is not None:
                    writers.add(int(found.group(1)))
    resolved = str(path.resolve())
    for log_id in known_log_ids:
        if log_id.startswith(resolved):
            found = _WRITER_FILE.fullmatch(log_id[len(resolved) :])
            if found is not None and found.group(2) is None:
                writers.add(int(found.group(1)))
    return [writer_log_path(path, n) for n in sorted(writers)]


def audit_log_files(path: Path) -> list[Path]:
    """``path``'s rotated siblings (``<name>.<UTC timestamp>``) oldest first, then ``path``."""
    path = Path(path)
    rotated: list[Path] = []
    with contextlib.suppress(FileNotFoundError):
        for sibling in path.parent.iterdir():
            name = sibling.name
            if name.startswith(path.name) and _ROTATED_SUFFIX.fullmatch(name[len(path.name) :]):
                rotated.append(sibling)
    return [*sorted(rotated, key=lambda p: p.name), path]


# ==================================================================== writer


@dataclass(frozen=True, slots=True)
class _ChainTail:
    """The chain state after a file's last line."""

    seq: int
    chain: str  # hex SHA-256 of the last line (ZERO_CHAIN before line 1)
    signed: bool  # the last line is a checkpoint


@dataclass(frozen=True, slots=True)
class _FoundTail:
    """What the end of a file holds, read backwards (never the whole file)."""

    empty: bool
    torn: bool = False  # the last byte is not a newline
    tail: _ChainTail | None = None  # None: empty or the last line is not an audit line
    last_hash: str | None = None  # SHA-256 of the last line (newline-terminated if torn)
    found_seq: int | None = None  # seq of the last line that parses


def _loose_parse(text: bytes) -> tuple[int, bool] | None:
    """(seq, is_checkpoint) of an audit line, or None; no chain or MAC check."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    seq = obj.get("seq")
    if type(seq) is not int or seq < 1:
        return None
    return seq, obj.get("checkpoint") is True


def _read_tail(fd: int, size: int) -> _FoundTail:
    if size == 0:
        return _FoundTail(empty=True)
    chunk = _TAIL_CHUNK
    while True:
        start = max(0, size - chunk)
        buf = os.pread(fd, size - start, start)
        body = buf[:-1] if buf.endswith(b"\n") else buf
        if start == 0 or body.rfind(b"\n") >= 0 or chunk >= _MAX_LINE:
            break
        chunk *= 4
    torn = not buf.endswith(b"\n")
    cut = body.rfind(b"\n")
    if start > 0 and cut < 0:  # the last line began before buf
        return _FoundTail(empty=False, torn=torn)
    last = body[cut + 1 :]
    parsed = _loose_parse(last)
    found_seq = parsed[0] if parsed is not None else _last_seq(body[:cut] if cut >= 0 else b"", partial_first=start > 0)
    last_hash = _sha256(last + b"\n")
    tail = None if torn or parsed is None else _ChainTail(parsed[0], last_hash, parsed[1])
    return _FoundTail(empty=False, torn=torn, tail=tail, last_hash=last_hash, found_seq=found_seq)


def _last_seq(before: bytes, *, partial_first: bool) -> int | None:
    """The seq of the last line of ``before`` that parses (its first line may be cut off)."""
    lines = before.split(b"\n") if before else []
    for text in reversed(lines[1:] if partial_first else lines):
        parsed = _loose_parse(text)
        if parsed is not None:
            return parsed[0]
    return None


@dataclass(slots=True)
class _Batch:
    """Lines to append with one write, and the chain state after them."""

    tail: _ChainTail
    data: bytearray = field(default_factory=bytearray)
    checkpoint: AuditCheckpoint | None = None
    unsigned: int = 0  # lines after the batch's last checkpoint (or all, if none)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError("audit log write made no progress")
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_LIVE: weakref.WeakSet[AuditLog] = weakref.WeakSet()


def _reset_logs_in_child() -> None:
    for audit_log in list(_LIVE):
        audit_log._reset_after_fork()


os.register_at_fork(after_in_child=_reset_logs_in_child)


class AuditLog:
    """Appends hash-chained lines to ``path`` and signs checkpoints; threads, processes, fork.

    Every append takes an exclusive ``flock`` on the file, follows a rotation done by
    another process, reads the chain tail from the file only when the file changed
    since this process last wrote, and writes with one ``os.write`` on an ``O_APPEND``
    descriptor. A forked child reopens the file (flock belongs to the open file
    description, which fork shares) and gets fresh locks and no timer.

    The constructor writes a genesis checkpoint into a new log, or a break marker if
    the file is damaged, or missing/emptied/behind while ``checkpoints`` knows a chain.
    Raises KMSInternalException when the log cannot be opened or written.
    """

    def __init__(
        self,
        path: Path,
        mac: MacFunction,
        *,
        checkpoints: CheckpointStore | None = None,
        fsync_lines: bool = False,
        checkpoint_lines: int = 1000,
        checkpoint_seconds: float = 1.0,
        max_bytes: int | None = None,
    ) -> None:
        if checkpoint_lines < 1 or checkpoint_seconds <= 0:
            raise ValueError("checkpoint_lines and checkpoint_seconds must be positive")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self._path = Path(path)
        self._log_id = str(self._path.resolve())
        self._mac = mac
        self._checkpoints = checkpoints
        self._fsync_lines = fsync_lines
        self._checkpoint_lines = checkpoint_lines
        self._checkpoint_seconds = checkpoint_seconds
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._closed = False
        self._fd: int | None = None
        self._created = False  # our open created the file (it was missing)
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of self._fd
        self._size = -1  # the file's size after our last write or read
        self._tail: _ChainTail | None = None  # None: read it from the file
        self._expected: _ChainTail | None = None  # chain the file must continue (open, switch)
        self._unsigned = 0
        # time.monotonic() of our last checkpoint. Counting from the open means the first
        # lines are signed by the timer (or a later line) within checkpoint_seconds, not by
        # the first request, which would pay the HSM key look-up (a token scan on SoftHSM2).
        self._last_checkpoint = time.monotonic()
        self._dirty_since: float | None = None  # monotonic time of the first unsigned line
        self._timer: threading.Timer | None = None
        self._pending: AuditCheckpoint | None = None  # to store once the locks are released

        if checkpoints is not None:
            try:
                known = checkpoints.get_audit_checkpoint(self._log_id)
            except KMSError as exc:
                raise KMSInternalException("audit checkpoint cannot be read") from exc
            if known is not None:
                self._expected = _ChainTail(known.sequence, known.chain_hash, True)
        with self._lock:
            try:
                self._acquire()
                self._unlock()
            except (OSError, KMSError) as exc:
                self._drop_fd()
                log.error("event=audit_open_failed path=%s error=%s", self._path, exc)
                raise KMSInternalException("audit log cannot be opened") from exc
            stored = self._take_pending()
        self._store(stored)
        _LIVE.add(self)

    # ------------------------------------------------------------ public

    @property
    def path(self) -> Path:
        return self._path

    @property
    def log_id(self) -> str:
        """The chain's name in the checkpoint store: the resolved path."""
        return self._log_id

    def record(self, event: AuditEvent) -> None:
        """Append ``event``; raises KMSInternalException if it cannot be written (fail closed)."""
        parts = _event_parts(event)
        with self._lock:
            self._check_open()
            try:
                fd, tail = self._acquire()
                try:
                    batch = _Batch(tail)
                    self._append_event(batch, parts)
                    kind = self._due(batch)
                    if kind is not None:
                        self._append_checkpoint(batch, kind)
                    self._commit(fd, batch, sync=kind is not None)
                    self._rotate_if_big()
                finally:
                    self._unlock()
            except (OSError, KMSError) as exc:
                self._tail = None
                log.error("event=audit_write_failed path=%s error=%s", self._path, exc)
                raise KMSInternalException("audit log write failed") from exc
            self._arm_timer()
            stored = self._take_pending()
        self._store(stored)

    def checkpoint(self) -> AuditCheckpoint:
        """Write a checkpoint now; raises KMSInternalException if it cannot be written."""
        with self._lock:
            self._check_open()
            try:
                written = self._checkpoint_locked(CheckpointKind.FORCED, only_if_unsigned=False)
            except (OSError, KMSError) as exc:
                self._tail = None
                log.error("event=audit_checkpoint_failed path=%s error=%s", self._path, exc)
                raise KMSInternalException("audit checkpoint failed") from exc
            stored = self._take_pending()
        self._store(stored)
        assert written is not None
        return written

    def rotate(self) -> Path:
        """Rename the file to ``<path>.<UTC timestamp>`` (returned) and start a linked one.

        The old file ends with a checkpoint; the new one starts with a ``link``
        checkpoint continuing its chain. ``path`` exists at every moment.
        """
        with self._lock:
            self._check_open()
            try:
                fd, _ = self._acquire()
                try:
                    rotated = self._rotate_locked(fd)
                finally:
                    self._unlock()
            except (OSError, KMSError) as exc:
                self._tail = None
                log.error("event=audit_rotate_failed path=%s error=%s", self._path, exc)
                raise KMSInternalException("audit log rotation failed") from exc
            stored = self._take_pending()
        self._store(stored)
        return rotated

    def close(self) -> None:
        """Sign the tail (final checkpoint), stop the timer, close. Idempotent; never raises."""
        with self._lock:
            if self._closed:
                return
            timer, self._timer = self._timer, None
            if timer is not None:
                timer.cancel()
            try:
                self._checkpoint_locked(CheckpointKind.CLOSE, only_if_unsigned=True)
            except (OSError, KMSError) as exc:
                log.error("event=audit_close_checkpoint_failed path=%s error=%s", self._path, exc)
            self._closed = True
            self._drop_fd()
            stored = self._take_pending()
        _LIVE.discard(self)
        if timer is not None and timer is not threading.current_thread():
            timer.join()
        self._store(stored)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------ file and lock

    def _check_open(self) -> None:
        if self._closed:
            raise KMSInternalException("audit log is closed")

    def _open_path(self) -> tuple[int, bool]:
        """(fd, created) of the live file; created when it did not exist."""
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        for _ in range(8):
            with contextlib.suppress(FileNotFoundError):
                return os.open(self._path, flags), False
            with contextlib.suppress(FileExistsError):
                return os.open(self._path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
        raise OSError("audit log path keeps appearing and vanishing")

    def _drop_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self._tail = None

    def _unlock(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _acquire(self) -> tuple[int, _ChainTail]:
        """Lock the live file (following a rotation) and sync the chain tail.

        On success the caller holds the flock of ``self._fd`` and must ``_unlock``;
        on failure nothing is locked.
        """
        if self._fd is None:
            self._fd, self._created = self._open_path()
            self._tail = None
        fd = self._fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            # Loop: the file we followed to may itself be rotated before we get its lock.
            while True:
                st = os.fstat(fd)
                try:
                    live = os.stat(self._path)
                    if (live.st_dev, live.st_ino) == (st.st_dev, st.st_ino):
                        break
                except FileNotFoundError:
                    pass
                fd = self._follow(fd, st)
            return fd, self._sync(fd, st)
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            raise

    def _follow(self, old_fd: int, st: os.stat_result) -> int:
        """Switch to the file now at ``path`` (rotated, deleted or replaced under us)."""
        old: _ChainTail | None
        if self._tail is not None and self._cache_valid(st):
            old = self._tail
        else:
            old = _read_tail(old_fd, st.st_size).tail
        new_fd, created = self._open_path()
        try:
            fcntl.flock(new_fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(new_fd)
            raise
        fcntl.flock(old_fd, fcntl.LOCK_UN)
        os.close(old_fd)
        self._fd, self._created, self._tail = new_fd, created, None
        if old is not None:
            self._expected = old
        return new_fd

    def _cache_valid(self, st: os.stat_result) -> bool:
        return self._ident == (st.st_dev, st.st_ino) and self._size == st.st_size

    def _sync(self, fd: int, st: os.stat_result) -> _ChainTail:
        """The chain tail of the locked file (``st``: its fstat, taken under the lock),
        repairing (with a break marker) if needed."""
        if self._tail is not None and self._expected is None and self._cache_valid(st):
            return self._tail
        found = _read_tail(fd, st.st_size)
        self._ident, self._size = (st.st_dev, st.st_ino), st.st_size
        expected, self._expected = self._expected, None
        created, self._created = self._created, False
        what: Break | None = None
        if found.empty:
            if expected is None:
                batch = _Batch(_ChainTail(0, ZERO_CHAIN, False))
                self._append_checkpoint(batch, CheckpointKind.GENESIS)
                self._commit(fd, batch, sync=True)
                return batch.tail
            what = Break.MISSING if created else Break.EMPTIED
        elif found.tail is None:
            what = Break.DAMAGED_TAIL
        elif expected is not None and found.tail.seq < expected.seq:
            what = Break.BEHIND_CATALOG
        elif (
            expected is not None
            and found.tail.seq == expected.seq
            and found.tail.chain != expected.chain
        ):
            what = Break.DIVERGED
        if what is None:
            assert found.tail is not None
            self._tail = found.tail
            if found.tail.signed:
                self._mark_signed()
            return found.tail
        return self._write_break(fd, what, found, expected)

    def _write_break(
        self, fd: int, what: Break, found: _FoundTail, expected: _ChainTail | None
    ) -> _ChainTail:
        log.error(
            "event=audit_log_break what=%s path=%s found_seq=%s expected_seq=%s",
            what.value,
            self._path,
            found.found_seq,
            expected.seq if expected else None,
        )
        seq = max(found.found_seq or 0, expected.seq if expected is not None else 0)
        prev = found.last_hash or (expected.chain if expected is not None else ZERO_CHAIN)
        batch = _Batch(_ChainTail(seq, prev, False))
        if found.torn:
            batch.data += b"\n"  # terminate the torn line, so the marker is a line of its own
        self._append(
            batch,
            {
                "break": what.value,
                "expected_chain": expected.chain if expected is not None else None,
                "expected_seq": expected.seq if expected is not None else None,
                "found_seq": found.found_seq,
                "time": _rfc3339(datetime.now(UTC)),
            },
            link="prev",
        )
        self._append_checkpoint(batch, CheckpointKind.BREAK)
        self._commit(fd, batch, sync=True)
        return batch.tail

    # ------------------------------------------------------------ lines

    def _append(self, batch: _Batch, fields: dict[str, Any], link: str = "prev") -> None:
        seq = batch.tail.seq + 1
        line = _line({**fields, "seq": seq, link: batch.tail.chain})
        batch.data += line
        batch.tail = _ChainTail(seq, _sha256(line), False)
        batch.unsigned += 1

    def _append_event(self, batch: _Batch, parts: tuple[str, str, str]) -> None:
        """An event line: :func:`_event_parts` around its seq and prev (as :meth:`_append`)."""
        seq = batch.tail.seq + 1
        head, middle, end = parts
        line = f'{head}"prev":"{batch.tail.chain}",{middle}"seq":{seq},{end}\n'.encode("ascii")
        batch.data += line
        batch.tail = _ChainTail(seq, _sha256(line), False)
        batch.unsigned += 1

    def _append_checkpoint(
        self, batch: _Batch, kind: CheckpointKind, *, follows: str | None = None
    ) -> None:
        now = datetime.now(UTC)
        seq = batch.tail.seq + 1
        body: dict[str, Any] = {
            "chain": batch.tail.chain,
            "checkpoint": True,
            "kind": kind.value,
            "seq": seq,
            "time": _rfc3339(now),
        }
        if follows is not None:
            body["follows"] = follows
        tag = _checkpoint_mac(self._mac, body)
        line = _line({**body, "mac": tag})
        chain = _sha256(line)
        batch.data += line
        batch.tail = _ChainTail(seq, chain, True)
        batch.unsigned = 0
        batch.checkpoint = AuditCheckpoint(
            log_id=self._log_id,
            sequence=seq,
            chain_hash=chain,
            mac=tag,
            file_name=self._path.name,
            time=now,
        )

    def _due(self, batch: _Batch) -> CheckpointKind | None:
        if self._unsigned + batch.unsigned >= self._checkpoint_lines:
            return CheckpointKind.LINES
        if time.monotonic() - self._last_checkpoint >= self._checkpoint_seconds:
            return CheckpointKind.INTERVAL
        return None

    def _commit(self, fd: int, batch: _Batch, *, sync: bool) -> None:
        data = bytes(batch.data)
        _write_all(fd, data)
        if sync or self._fsync_lines:
            os.fsync(fd)
        self._size += len(data)
        self._tail = batch.tail
        if batch.checkpoint is not None:
            self._pending = batch.checkpoint
            self._mark_signed()
        self._unsigned += batch.unsigned
        if batch.unsigned and self._dirty_since is None:
            self._dirty_since = time.monotonic()

    def _mark_signed(self) -> None:
        self._unsigned = 0
        self._last_checkpoint = time.monotonic()
        self._dirty_since = None

    def _checkpoint_locked(
        self, kind: CheckpointKind, *, only_if_unsigned: bool
    ) -> AuditCheckpoint | None:
        fd, tail = self._acquire()
        try:
            if only_if_unsigned and tail.signed:
                self._mark_signed()
                return None
            batch = _Batch(tail)
            self._append_checkpoint(batch, kind)
            self._commit(fd, batch, sync=True)
            return batch.checkpoint
        finally:
            self._unlock()

    # ------------------------------------------------------------ rotation

    def _rotate_if_big(self) -> None:
        if self._max_bytes is None or self._size < self._max_bytes or self._fd is None:
            return
        try:
            self._rotate_locked(self._fd)
        except (OSError, KMSError) as exc:
            # The line is written; a failed rotation only lets the file grow.
            self._tail = None
            log.error("event=audit_rotate_failed path=%s error=%s", self._path, exc)

    def _rotate_locked(self, fd: int) -> Path:
        assert self._tail is not None
        final = _Batch(self._tail)
        self._append_checkpoint(final, CheckpointKind.ROTATE)
        self._commit(fd, final, sync=True)
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.{threading.get_ident()}.new")
        new_fd = os.open(
            tmp, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        rotated: Path | None = None
        try:
            fcntl.flock(new_fd, fcntl.LOCK_EX)
            rotated = self._link_rotated_name()
            first = _Batch(final.tail)
            self._append_checkpoint(first, CheckpointKind.LINK, follows=rotated.name)
            _write_all(new_fd, bytes(first.data))
            os.fsync(new_fd)
            os.rename(tmp, self._path)  # atomic: path never goes missing
        except BaseException:
            os.close(new_fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if rotated is not None:
                with contextlib.suppress(OSError):
                    os.unlink(rotated)
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        st = os.fstat(new_fd)
        self._fd, self._ident, self._size = new_fd, (st.st_dev, st.st_ino), st.st_size
        self._tail = first.tail
        self._pending = first.checkpoint
        self._mark_signed()
        with contextlib.suppress(OSError):
            _fsync_dir(self._path.parent)
        log.info("event=audit_log_rotated path=%s rotated=%s", self._path, rotated)
        return rotated

    def _link_rotated_name(self) -> Path:
        """Give the live file its rotated name too (a hard link); unique, sortable by time."""
        when = datetime.now(UTC)
        for _ in range(1000):
            candidate = self._path.with_name(f"{self._path.name}.{when:%Y%m%dT%H%M%S.%fZ}")
            try:
                os.link(self._path, candidate)
            except FileExistsError:
                when += timedelta(microseconds=1)
                continue
            return candidate
        raise OSError("no free rotated file name")

    # ------------------------------------------------------------ timer, store, fork

    def _arm_timer(self, delay: float | None = None) -> None:
        """Start the timer that signs a tail left unsigned (holding self._lock)."""
        if self._closed or self._dirty_since is None or self._timer is not None:
            return
        if delay is None:
            delay = self._dirty_since + self._checkpoint_seconds - time.monotonic()
        timer = threading.Timer(max(0.0, delay), self._on_timer)
        timer.daemon = True
        timer.name = "hsmkeys-audit-checkpoint"
        self._timer = timer
        timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            if self._timer is not threading.current_thread():
                return  # cancelled by close, or replaced
            self._timer = None
            if self._closed or self._dirty_since is None:
                return
            if time.monotonic() - self._dirty_since < self._checkpoint_seconds:
                self._arm_timer()
                return
            try:
                self._checkpoint_locked(CheckpointKind.TIMER, only_if_unsigned=True)
            except (OSError, KMSError) as exc:
                self._tail = None
                log.error("event=audit_checkpoint_failed path=%s error=%s", self._path, exc)
                self._arm_timer(self._checkpoint_seconds)
            stored = self._take_pending()
        self._store(stored)

    def _take_pending(self) -> AuditCheckpoint | None:
        pending, self._pending = self._pending, None
        return pending

    def _store(self, checkpoint: AuditCheckpoint | None) -> None:
        """Keep the newest checkpoint in the store; called holding none of our locks."""
        if checkpoint is None or self._checkpoints is None:
            return
        try:
            known = self._checkpoints.get_audit_checkpoint(checkpoint.log_id)
            # Another process may have stored a newer one meanwhile: never go back.
            if known is None or known.sequence < checkpoint.sequence:
                self._checkpoints.put_audit_checkpoint(checkpoint)
        except KMSError as exc:
            # The line is in the file; the catalog copy only narrows what can go unnoticed.
            log.error(
                "event=audit_checkpoint_store_failed seq=%d error=%s", checkpoint.sequence, exc
            )

    def _reset_after_fork(self) -> None:
        """In a forked child: fresh locks, no timer, our own file description."""
        self._lock = threading.Lock()
        self._timer = None
        self._pending = None
        self._dirty_since = None
        self._unsigned = 0
        self._drop_fd()


_json_text = json.encoder.encode_basestring_ascii  # what json.dumps uses (C)


def _json_opt(value: str | int | None) -> str:
    if value is None:
        return "null"
    return _json_text(value) if isinstance(value, str) else str(int(value))


def _event_parts(event: AuditEvent) -> tuple[str, str, str]:
    """The event's line, byte for byte as ``_line({**_event_fields(event), "seq": n,
    "prev": chain})`` writes it, cut where "prev" and "seq" go (keys sort around them)."""
    arns = ",".join(_json_text(a) for a in event.key_arns)
    head = (
        f'{{"count":{_json_opt(event.count)},"decision":{_json_opt(event.decision)},'
        f'"key_arns":[{arns}],"key_version":{_json_opt(event.key_version)},'
        f'"operation":{_json_text(event.operation)},"outcome":{_json_text(event.outcome)},'
        f'"phase":{_json_text(event.phase)},'
    )
    middle = f'"principal":{_json_opt(event.principal)},"request_id":{_json_text(event.request_id)},'
    end = f'"source":{_json_opt(event.source)},"time":{_json_text(_rfc3339(event.time))}}}'
    return head, middle, end


def _event_fields(event: AuditEvent) -> dict[str, Any]:
    return {
        "count": event.count,
        "decision": event.decision,
        "key_arns": list(event.key_arns),
        "key_version": event.key_version,
        "operation": event.operation,
        "outcome": event.outcome,
        "phase": event.phase,
        "principal": event.principal,
        "request_id": event.request_id,
        "source": event.source,
        "time": _rfc3339(event.time),
    }


# ==================================================================== verification


class _Bad(Exception):
    """A verification failure at one line (None: the whole file)."""

    def __init__(self, line: int | None, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Line:
    raw: bytes
    obj: dict[str, Any]
    kind: str  # "event" | "checkpoint" | "break"
    seq: int
    link: str  # prev / chain


def _parse(raw: bytes) -> _Line | str:
    """The line, or why it is not a valid audit line."""
    if not raw.endswith(b"\n"):
        return "torn last line (no newline): the file was truncated mid-line"
    try:
        obj = json.loads(raw)
    except ValueError:
        return "not a JSON line: edited or corrupted"
    if not isinstance(obj, dict) or _line(obj) != raw:
        return "not a canonical audit line: edited"
    seq = obj.get("seq")
    if type(seq) is not int or seq < 1:
        return "no valid seq: edited"
    keys = obj.keys()
    if keys == _EVENT_KEYS:
        kind, link = "event", obj["prev"]
    elif keys in (_CHECKPOINT_KEYS, _LINK_KEYS):
        if (
            obj["checkpoint"] is not True
            or not isinstance(obj["kind"], str)
            or obj["kind"] not in _KINDS
            or (keys == _LINK_KEYS) != (obj["kind"] == CheckpointKind.LINK)
            or (keys == _LINK_KEYS and not isinstance(obj["follows"], str))
            or not _is_hex64(obj["mac"])
        ):
            return "malformed checkpoint: edited or forged"
        kind, link = "checkpoint", obj["chain"]
    elif keys == _BREAK_KEYS:
        if not isinstance(obj["break"], str):
            return "malformed break marker: edited or forged"
        kind, link = "break", obj["prev"]
    else:
        return "unexpected fields: edited or forged"
    if not _is_hex64(link):
        return "malformed chain link: edited"
    return _Line(raw, obj, kind, seq, link)


class _Peekable:
    def __init__(self, lines: Iterator[bytes]) -> None:
        self._lines = lines
        self._next: bytes | None = None

    def __iter__(self) -> _Peekable:
        return self

    def __next__(self) -> bytes:
        if self._next is not None:
            line, self._next = self._next, None
            return line
        return next(self._lines)

    def peek(self) -> bytes | None:
        if self._next is None:
            self._next = next(self._lines, None)
        return self._next


def _parse_time(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


class _Verifier:
    def __init__(self, mac: MacFunction, checkpoint: AuditCheckpoint | None) -> None:
        self.mac = mac
        self.checkpoint = checkpoint
        self.lines = 0
        self.seq: int | None = None  # seq of the last line read
        self.first_seq: int | None = None
        self.chain = ZERO_CHAIN
        self.last_raw = b""
        self.signed = False  # the last line read is a checkpoint
        self.last_checkpoint: int | None = None
        self.catalog_found = False
        self.genesis_time: datetime | None = None

    def check_file(self, path: Path) -> None:
        try:
            handle = open(path, "rb")  # noqa: SIM115 -- streamed below; files can be large
        except FileNotFoundError:
            raise _Bad(None, "missing: the file does not exist (deleted)") from None
        except OSError as exc:
            raise _Bad(None, f"cannot read: {exc.strerror}") from None
        with handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise _Bad(None, "emptied: the file is empty (every file starts with a checkpoint)")
            lines = _Peekable(iter(handle))
            for number, raw in enumerate(lines, start=1):
                self.lines += 1
                self.check_line(number, raw, lines)

    def check_line(self, number: int, raw: bytes, rest: _Peekable) -> None:
        parsed = _parse(raw)
        if isinstance(parsed, str):
            raise _Bad(number, parsed)
        line = parsed
        if line.kind == "break":
            what = line.obj["break"]
            found = _BREAK_TEXT[Break(what)] if what in _BREAKS else repr(what)
            raise _Bad(
                number,
                f"break marker: a writer found {found} (expected seq "
                f"{line.obj['expected_seq']}) and continued the sequence after it",
            )
        if number == 1:
            self.check_file_start(line)
        else:
            self.check_successor(number, line, rest)
        if line.kind == "checkpoint":
            unsigned = {k: v for k, v in line.obj.items() if k != "mac"}
            expected = _checkpoint_mac(self.mac, unsigned)
            if not hmac.compare_digest(line.obj["mac"].encode(), expected.encode()):
                raise _Bad(
                    number, "checkpoint MAC does not verify: forged, or the lines before it edited"
                )
            self.last_checkpoint = line.seq
        line_hash = _sha256(raw)
        cp = self.checkpoint
        if cp is not None and line.seq == cp.sequence:
            if (
                line.kind != "checkpoint"
                or line_hash != cp.chain_hash
                or not hmac.compare_digest(line.obj["mac"].encode(), cp.mac.encode())
            ):
                raise _Bad(number, self.catalog_mismatch(cp))
            self.catalog_found = True
        if self.first_seq is None:
            self.first_seq = line.seq
        self.seq, self.chain, self.last_raw = line.seq, line_hash, raw
        self.signed = line.kind == "checkpoint"

    def check_file_start(self, line: _Line) -> None:
        kind = line.obj.get("kind")
        if line.kind != "checkpoint" or kind not in (CheckpointKind.GENESIS, CheckpointKind.LINK):
            raise _Bad(
                1,
                "the file does not start with a genesis or link checkpoint: "
                "lines were removed from its start",
            )
        if kind == CheckpointKind.GENESIS and (line.seq != 1 or line.link != ZERO_CHAIN):
            raise _Bad(1, "genesis checkpoint not at seq 1 with a zero chain: forged")
        if kind == CheckpointKind.LINK and line.seq == 1:
            raise _Bad(1, "link checkpoint at seq 1: forged")
        if kind == CheckpointKind.GENESIS:
            self.genesis_time = _parse_time(line.obj["time"])
        if self.seq is None:
            return  # the oldest file given may continue files no longer kept
        if kind == CheckpointKind.GENESIS:
            raise _Bad(
                1,
                f"starts a new chain where the previous file's chain (seq {self.seq}) "
                "should continue: the log was restarted",
            )
        if line.seq <= self.seq:
            raise _Bad(
                1,
                f"goes back to seq {line.seq} after seq {self.seq}: "
                "replay of an older file, or files out of order",
            )
        if line.seq > self.seq + 1:
            raise _Bad(1, f"jumps from seq {self.seq} to {line.seq}: a file before it is missing")
        if line.link != self.chain:
            raise _Bad(1, "does not link to the previous file's last line: a file was replaced")

    def check_successor(self, number: int, line: _Line, rest: _Peekable) -> None:
        assert self.seq is not None
        expected = self.seq + 1
        if line.seq > expected:
            upcoming = rest.peek()
            following = _loose_parse(upcoming) if upcoming is not None else None
            if following is not None and following[0] == expected:
                raise _Bad(number, f"seq {line.seq} comes before seq {expected}: lines reordered")
            raise _Bad(
                number,
                f"seq jumps from {self.seq} to {line.seq}: {line.seq - expected} line(s) removed",
            )
        if line.seq < expected:
            if line.raw == self.last_raw:
                raise _Bad(number, f"seq {line.seq} repeats: line duplicated")
            raise _Bad(
                number, f"seq {line.seq} after seq {self.seq}: line inserted, or lines reordered"
            )
        if line.link != self.chain:
            raise _Bad(
                number - 1, f"line {number - 1} was edited: its hash is not line {number}'s link"
            )

    def restarted_after(self, cp: AuditCheckpoint) -> bool:
        """The log's genesis is younger than the catalog checkpoint: a new chain replaced it."""
        signed_at = cp.time if cp.time.tzinfo is not None else cp.time.replace(tzinfo=UTC)
        return self.genesis_time is not None and self.genesis_time > signed_at

    def catalog_mismatch(self, cp: AuditCheckpoint) -> str:
        if self.restarted_after(cp):
            return (
                f"a new chain was started after the catalog checkpoint (seq {cp.sequence}): "
                "the log was deleted or emptied and restarted"
            )
        return (
            f"is not the line the catalog checkpoint signed (seq {cp.sequence}): "
            "the log was replaced or rewritten"
        )

    def finish(self, last_file: Path | None) -> AuditVerification:
        cp = self.checkpoint
        if self.seq is None:
            return self.bad(last_file, None, "no files given")
        if cp is not None and not self.catalog_found:
            if cp.sequence > self.seq:
                if self.restarted_after(cp):
                    reason = self.catalog_mismatch(cp)
                elif self.signed:
                    reason = (
                        f"the log ends at a checkpoint at seq {self.seq} but the catalog's "
                        f"newest checkpoint is seq {cp.sequence}: replaced by an older "
                        "copy, or truncated at a checkpoint"
                    )
                else:
                    reason = (
                        f"truncated: the log ends at seq {self.seq} with unsigned lines, "
                        f"before the catalog checkpoint at seq {cp.sequence}"
                    )
            else:
                reason = (
                    f"the catalog checkpoint (seq {cp.sequence}) is before the first "
                    f"line given (seq {self.first_seq}): an older file is missing"
                )
            return self.bad(last_file, None, reason)
        if not self.signed:
            unsigned = self.seq - (self.last_checkpoint or 0)
            if cp is None:
                return self.bad(
                    last_file,
                    None,
                    f"the log ends with {unsigned} unsigned line(s) after the last checkpoint "
                    f"(seq {self.last_checkpoint}): tail truncated, or its writer stopped "
                    "before signing (give the catalog checkpoint)",
                )
            return AuditVerification(
                True,
                self.lines,
                None,
                f"intact; the last {unsigned} line(s) are not signed yet "
                "(younger than the catalog checkpoint)",
                None,
                self.last_checkpoint,
            )
        return AuditVerification(True, self.lines, None, "intact", None, self.last_checkpoint)

    def bad(self, path: Path | None, line: int | None, reason: str) -> AuditVerification:
        return AuditVerification(False, self.lines, line, reason, path, self.last_checkpoint)


def verify_audit_logs(
    paths: Sequence[Path], mac: MacFunction, *, checkpoint: AuditCheckpoint | None
) -> AuditVerification:
    """Check an audit log's files, oldest first; the first problem, or ok.

    Checks that every line parses, seq increments by one, every link is the SHA-256
    of the line before, every checkpoint MAC verifies, the files link in order, the
    log ends with a checkpoint (or with lines younger than ``checkpoint``), and that
    ``checkpoint`` (the catalog's newest, if given) is a line of the files. Never
    raises for bad content; ``mac`` errors (e.g. a missing HSM key) propagate.
    """
    verifier = _Verifier(mac, checkpoint)
    path: Path | None = None
    for given in paths:
        path = Path(given)
        try:
            verifier.check_file(path)
        except _Bad as bad:
            return verifier.bad(path, bad.line, bad.reason)
    return verifier.finish(path)
