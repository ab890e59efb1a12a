"""Tamper-evident audit log: one hash-chained, MAC'd JSON line per call.

File format (UTF-8, ASCII-only, one JSON object per line, keys sorted, compact
separators, ``\\n``-terminated):

* Line 1 of every file is a **genesis** line::

      {"follows":<hex|null>,"genesis":true,"mac":"…","prev":"000…0","time":"…"}

  ``follows`` is the last ``mac`` of the file this one replaced when the writer
  saw the rotation (rename/unlink of the path while it held the old file), else
  null (fresh log, or a ``copytruncate``-style rotation).  ``verify_audit_logs``
  checks those links across a sequence of rotated files.
* Every other line is an event::

      {"key_arn":…,"key_version":…,"mac":"…","operation":…,"outcome":…,
       "prev":"…","principal":…,"request_id":…,"source":…,"time":"…"}

* ``prev`` is the previous line's ``mac`` (64 zeros on the genesis line) and
  ``mac = hex(MAC(bytes.fromhex(prev) ‖ canonical JSON of the line without "mac")))``
  where MAC is an HMAC computed in the HSM.

Editing, inserting, deleting, reordering lines, a truncated last line or garbage
are all detected by :func:`verify_audit_log`, which names the first bad line.
Dropping whole lines from the *end* of the newest file is not detectable from
the file alone (no chain can prove its own length): anchor ``lines`` / the last
mac elsewhere if that matters.

If the writer finds a damaged tail (garbage or a torn last line) it terminates
it and starts a new genesis segment, so the service keeps auditing while
verification still reports the damaged line.

Durability: lines go to the OS page cache (no fsync per line); a host crash can
lose the last lines, which then looks like tail truncation.

Events carry no field for plaintext, key material, signatures or PINs, by design.
"""

from __future__ import annotations

import enum
import fcntl
import hmac
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from hsmkeys.errors import KMSInternalException

__all__ = [
    "AuditEvent",
    "AuditLog",
    "AuditVerification",
    "verify_audit_log",
    "verify_audit_logs",
]

log = logging.getLogger(__name__)

GENESIS_PREV: Final = "0" * 64
_GENESIS_KEYS: Final = frozenset({"follows", "genesis", "mac", "prev", "time"})
_EVENT_KEYS: Final = frozenset(
    {
        "key_arn",
        "key_version",
        "mac",
        "operation",
        "outcome",
        "prev",
        "principal",
        "request_id",
        "source",
        "time",
    }
)
# A real line is a few hundred bytes; anything past this at the tail is damage.
_MAX_LINE: Final = 1 << 20
_TAIL_CHUNK: Final = 2048

MacFunction = Callable[[bytes], bytes]


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited call. There is deliberately no field for secrets of any kind.

    ``time`` must be timezone-aware (ValueError otherwise: a programming error).
    """

    time: datetime
    request_id: str
    principal: str | None
    operation: str
    key_arn: str | None = None
    key_version: int | None = None
    outcome: str = "Success"  # or the KMS error name
    source: str | None = None  # e.g. client address

    def __post_init__(self) -> None:
        if self.time.tzinfo is None or self.time.utcoffset() is None:
            raise ValueError("AuditEvent.time must be timezone-aware")


@dataclass(frozen=True, slots=True)
class AuditVerification:
    ok: bool
    lines: int  # lines read (all of them when ok)
    first_bad_line: int | None  # 1-based
    reason: str


def _rfc3339(when: datetime) -> str:
    utc = when if when.tzinfo is UTC else when.astimezone(UTC)
    return utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _canonical(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


@dataclass(frozen=True, slots=True)
class _Layout:
    """The keys that follow "prev" and "mac" in sorted order, for splicing them in."""

    prev_before: str
    mac_before: str


_EVENT_LAYOUT: Final = _Layout(prev_before="principal", mac_before="operation")
_GENESIS_LAYOUT: Final = _Layout(prev_before="time", mac_before="prev")


def _splice_before(text: str, next_key: str, key: str, hex_value: str) -> str:
    """Insert ``"key":"hex_value"`` before top-level ``next_key`` of a flat, sorted, compact object."""
    # Inside a JSON string every '"' is escaped, so ',"next_key":' can only be the key itself.
    at = text.index(f',"{next_key}":')
    return f'{text[:at]},"{key}":"{hex_value}"{text[at:]}'


def _seal(body: str, layout: _Layout, prev: str, mac: MacFunction) -> tuple[bytes, str]:
    """The finished line and its mac hex, from ``body`` = canonical JSON without prev and mac.

    Splicing instead of re-serialising halves the JSON cost while the file lock is held;
    the result is byte-identical to the canonical JSON of the whole line.
    """
    unsigned = _splice_before(body, layout.prev_before, "prev", prev)
    tag = mac(bytes.fromhex(prev) + unsigned.encode("ascii")).hex()
    line = _splice_before(unsigned, layout.mac_before, "mac", tag)
    return (line + "\n").encode("ascii"), tag


class _Tail(enum.Enum):
    EMPTY = "empty"
    DAMAGED = "damaged"


def _read_tail_mac(fd: int, size: int) -> str | _Tail:
    """The last line's mac, read backwards from the end of the file (never the whole file)."""
    if size == 0:
        return _Tail.EMPTY
    chunk = _TAIL_CHUNK
    while True:
        start = max(0, size - chunk)
        buf = os.pread(fd, size - start, start)
        if not buf.endswith(b"\n"):
            return _Tail.DAMAGED
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0 or start == 0:
            last = buf[cut + 1 : -1]
            break
        if chunk >= _MAX_LINE:
            return _Tail.DAMAGED
        chunk *= 4
    try:
        obj = json.loads(last)
        tag = obj["mac"]
        if not isinstance(tag, str) or not tag or bytes.fromhex(tag).hex() != tag:
            return _Tail.DAMAGED
    except (ValueError, TypeError, KeyError):
        return _Tail.DAMAGED
    return tag


class AuditLog:
    """Appends MAC-chained lines to ``path``; safe across threads and processes.

    Every append takes an exclusive ``flock`` on the file, reads the previous mac
    (from a per-process cache when the file has not grown since this process last
    wrote, else from the file's tail), and writes the line with one ``os.write``
    on an ``O_APPEND`` descriptor.  A fork is detected and the child reopens the
    file: flock locks belong to the open file description, which fork shares.

    ``record`` raises KMSInternalException if the file cannot be written (or the
    log is closed), and whatever ``mac`` raises (KMS errors from the HSM).
    """

    def __init__(self, path: Path, mac: MacFunction) -> None:
        self._path = Path(path)
        self._mac = mac
        self._lock = threading.Lock()
        self._pid = os.getpid()
        # (st_dev, st_ino, size after our last write, mac of our last line)
        self._cache: tuple[int, int, int, str] | None = None
        self._fd: int | None = self._open()

    def _open(self) -> int:
        try:
            return os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise KMSInternalException("audit log cannot be opened") from exc

    def _after_fork(self) -> None:
        # The inherited fd shares its lock with the parent; get our own.
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._cache = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._open()

    def record(self, event: AuditEvent) -> None:
        """Append ``event``; raises KMSInternalException if it cannot be written."""
        time = _rfc3339(event.time)
        body = _canonical(
            {
                "key_arn": event.key_arn,
                "key_version": event.key_version,
                "operation": event.operation,
                "outcome": event.outcome,
                "principal": event.principal,
                "request_id": event.request_id,
                "source": event.source,
                "time": time,
            }
        )
        if os.getpid() != self._pid:
            self._after_fork()
        with self._lock:
            if self._fd is None:
                raise KMSInternalException("audit log is closed")
            try:
                self._append(body, time)
            except OSError as exc:
                self._cache = None
                raise KMSInternalException("audit log write failed") from exc

    def _rotated(self, fd_stat: os.stat_result) -> bool:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != (fd_stat.st_dev, fd_stat.st_ino)

    def _append(self, body: str, time: str) -> None:
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            st = os.fstat(self._fd)
            follows: str | None = None
            if self._rotated(st):
                old = _read_tail_mac(self._fd, st.st_size)
                follows = old if isinstance(old, str) else None
                new_fd = self._open()
                # Lock order old → new in every process, so no deadlock; holding the
                # old lock until the new file is locked keeps ``follows`` exact.
                fcntl.flock(new_fd, fcntl.LOCK_EX)
                # Unlock explicitly: a forked child may still hold this description.
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = new_fd
                self._cache = None
                st = os.fstat(new_fd)
            key = (st.st_dev, st.st_ino, st.st_size)
            tail: str | _Tail
            if self._cache is not None and self._cache[:3] == key:
                tail = self._cache[3]
            else:
                tail = _read_tail_mac(self._fd, st.st_size)
            data = b""
            if isinstance(tail, str):
                prev = tail
            else:
                if tail is _Tail.DAMAGED:
                    log.warning(
                        "audit log %s has a damaged tail; starting a new segment", self._path
                    )
                    if os.pread(self._fd, 1, st.st_size - 1) != b"\n":
                        data = b"\n"
                    follows = None
                genesis = _canonical({"follows": follows, "genesis": True, "time": time})
                line, prev = _seal(genesis, _GENESIS_LAYOUT, GENESIS_PREV, self._mac)
                data += line
            line, tag = _seal(body, _EVENT_LAYOUT, prev, self._mac)
            data += line
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short write to audit log ({written} of {len(data)} bytes)")
            self._cache = (st.st_dev, st.st_ino, st.st_size + len(data), tag)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the file; later ``record`` calls raise KMSInternalException. Idempotent."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class _FileCheck:
    result: AuditVerification
    follows: str | None  # the genesis line's link to the previous file
    last_mac: str | None


def _check_file(path: Path, mac: MacFunction) -> _FileCheck:
    def bad(n: int, reason: str) -> _FileCheck:
        return _FileCheck(AuditVerification(False, n, n, reason), None, None)

    prev = GENESIS_PREV
    follows: str | None = None
    n = 0
    try:
        handle = open(path, "rb")  # noqa: SIM115 -- closed below; streamed, files can be large
    except OSError as exc:
        return _FileCheck(
            AuditVerification(False, 0, None, f"cannot read: {exc.strerror}"), None, None
        )
    with handle:
        for raw in handle:
            n += 1
            if not raw.endswith(b"\n"):
                return bad(n, "truncated line (no newline at end of file)")
            text = raw[:-1]
            try:
                obj = json.loads(text)
            except ValueError:
                return bad(n, "not a JSON line")
            if not isinstance(obj, dict):
                return bad(n, "not a JSON object")
            if _canonical(obj).encode("ascii") != text:
                return bad(n, "not in canonical form (edited)")
            keys = obj.keys()
            if n == 1:
                if keys != _GENESIS_KEYS or obj["genesis"] is not True:
                    return bad(n, "first line is not a genesis line (lines deleted or reordered)")
                link = obj["follows"]
                if link is not None and not isinstance(link, str):
                    return bad(n, "genesis 'follows' is not a mac")
                follows = link
            elif keys != _EVENT_KEYS:
                return bad(n, "not an event line (unexpected fields)")
            if obj["prev"] != prev:
                return bad(
                    n,
                    "chain broken: prev is not the previous line's mac "
                    "(line deleted, inserted or reordered)",
                )
            tag = obj.pop("mac")
            expected = mac(bytes.fromhex(prev) + _canonical(obj).encode("ascii")).hex()
            if not isinstance(tag, str) or not hmac.compare_digest(tag, expected):
                return bad(n, "mac mismatch (line edited or forged)")
            prev = expected
    if n == 0:
        return _FileCheck(AuditVerification(True, 0, None, "empty"), None, None)
    return _FileCheck(AuditVerification(True, n, None, "ok"), follows, prev)


def verify_audit_log(path: Path, mac: MacFunction) -> AuditVerification:
    """Check one file line by line; the first bad line (1-based) and why, or ok.

    An empty file is ok with 0 lines. Never raises for bad content; an unreadable
    file is reported as not ok with ``first_bad_line`` None. ``mac`` errors propagate.
    """
    return _check_file(Path(path), mac).result


def verify_audit_logs(paths: Sequence[Path], mac: MacFunction) -> AuditVerification:
    """Check rotated files, oldest first: each verifies, and each genesis ``follows``
    link that the writer recorded equals the last mac of the file before it.

    ``lines`` counts lines across all files; ``reason`` names the file at fault and
    ``first_bad_line`` is 1-based within that file.
    """
    total = 0
    previous_last: str | None = None
    for index, path in enumerate(paths):
        check = _check_file(Path(path), mac)
        if not check.result.ok:
            r = check.result
            return AuditVerification(
                False, total + r.lines, r.first_bad_line, f"{path}: {r.reason}"
            )
        if (
            index > 0
            and check.follows is not None
            and not hmac.compare_digest(check.follows, previous_last or "")
        ):
            return AuditVerification(
                False,
                total + 1,
                1,
                f"{path}: does not follow the previous file (file missing or truncated)",
            )
        total += check.result.lines
        previous_last = check.last_mac
    return AuditVerification(True, total, None, "ok")
