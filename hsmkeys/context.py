"""Who is calling: set by the server around each KeyStore call, read by audit and authz.

In-process library use runs with the default context (principal None = trusted local
caller, as holding the HSM PIN already is).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hsmkeys.authz.model import Principal


@dataclass(frozen=True, slots=True)
class CallContext:
    principal: Principal | str | None = None  # the caller, or its IAM-style ARN
    request_id: str | None = None
    source: str | None = None  # client address
    secure_transport: bool = False  # aws:SecureTransport: the request came over TLS


# CallContext is a frozen dataclass: the shared default cannot be mutated.
_current: contextvars.ContextVar[CallContext] = contextvars.ContextVar(
    "hsmkeys_call_context", default=CallContext()  # noqa: B039
)


def current_call() -> CallContext:
    return _current.get()


@contextmanager
def call_context(ctx: CallContext) -> Iterator[CallContext]:
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
