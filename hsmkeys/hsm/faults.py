"""Fault injection for :class:`~hsmkeys.hsm.pkcs11.Pkcs11Hsm`: fail the Nth PKCS#11 call.

A :class:`FaultPlan` is passed as ``session_wrapper`` to ``Pkcs11Hsm.open``; it wraps
each session the instance opens in a proxy that counts calls through the
python-pkcs11 API (session methods, and methods and attribute reads of every object
the session returns). Call number ``fail_at`` raises ``error``; from then on every
call through that session raises it again, as a dead session or device does, until
the HSM replaces the session. Sessions opened afterwards are healthy. With ``hang_s``
the call sleeps that long (holding the HSM lock) before going on, to model an HSM
that does not answer.

Production code pays nothing: without a wrapper the real session is used as is.
The proxies pass ``isinstance`` checks for the wrapped classes (``__class__``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pkcs11.exceptions as ckr
from pkcs11.types import Object, Session

__all__ = ["FaultPlan"]


class FaultPlan:
    """Fail (or stall) the ``fail_at``-th call (1-based) made through wrapped sessions."""

    def __init__(
        self, *, fail_at: int, error: type[ckr.PKCS11Error] | None = None, hang_s: float = 0.0
    ) -> None:
        if fail_at < 1:
            raise ValueError("fail_at counts from 1")
        if error is None and hang_s <= 0:
            raise ValueError("give an error, a hang, or both")
        self.fail_at = fail_at
        self.error = error
        self.hang_s = hang_s
        self.calls = 0
        self.sessions_opened = 0
        self.triggered = threading.Event()
        self._broken: set[int] = set()  # ids of proxied sessions that are dead
        self._lock = threading.Lock()

    def __call__(self, session: Session) -> Session:
        """The ``session_wrapper``: wrap a freshly opened session."""
        with self._lock:
            self.sessions_opened += 1
            number = self.sessions_opened
        return cast(Session, _Proxy(session, self, number))

    def _before_call(self, session_number: int) -> None:
        with self._lock:
            if session_number in self._broken:
                broken = True
            else:
                self.calls += 1
                broken = self.calls == self.fail_at
                if broken and self.error is not None:
                    self._broken.add(session_number)
        if not broken:
            return
        self.triggered.set()
        if self.hang_s > 0 and self.calls == self.fail_at:
            time.sleep(self.hang_s)
        if self.error is not None:
            raise self.error()


class _Proxy:
    """A session or object seen through a :class:`FaultPlan`."""

    __slots__ = ("_inner", "_plan", "_session_number")

    def __init__(self, inner: Any, plan: FaultPlan, session_number: int) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_plan", plan)
        object.__setattr__(self, "_session_number", session_number)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance(proxy, EncryptMixin) sees the wrapped class
        return type(self._inner)

    @property
    def inner(self) -> Any:
        """The real python-pkcs11 object (tests use it to break a session for real)."""
        return self._inner

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if not callable(value):
            self._plan._before_call(self._session_number)
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            self._plan._before_call(self._session_number)
            args = tuple(a._inner if type(a) is _Proxy else a for a in args)
            return self._wrap(value(*args, **kwargs))

        return call

    def __getitem__(self, key: Any) -> Any:
        self._plan._before_call(self._session_number)
        return self._inner[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._plan._before_call(self._session_number)
        self._inner[key] = value

    def __eq__(self, other: object) -> bool:
        return bool(self._inner == (other._inner if type(other) is _Proxy else other))

    def __hash__(self) -> int:
        return hash(self._inner)

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, Object):
            return _Proxy(value, self._plan, self._session_number)
        if isinstance(value, tuple) and any(isinstance(v, Object) for v in value):
            return tuple(self._wrap(v) for v in value)
        if isinstance(value, Iterator):
            return self._wrap_iter(value)
        return value

    def _wrap_iter(self, values: Iterator[Any]) -> Iterator[Any]:
        for value in values:
            yield self._wrap(value)
