"""The state of one KMS call while it runs: who asks, what it touched, what decided it.

A :class:`Call` is made by :meth:`hsmkeys.keystore.KeyStore.invoke` for every
operation, passed explicitly to the operation's implementation, and read back for
the call's audit line. It is never shared between calls or threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hsmkeys.authz.model import Principal
    from hsmkeys.operations import Operation


class Call:
    """One call of one operation. ``principal`` None is a trusted in-process caller."""

    __slots__ = (
        "args",
        "authorized",
        "decisions",
        "invocation_id",
        "key_arns",
        "key_version",
        "op",
        "principal",
        "request_id",
        "secure_transport",
        "source",
    )

    def __init__(
        self,
        op: Operation[Any, Any],
        args: Mapping[str, Any],
        *,
        principal: Principal | None = None,
        request_id: str | None = None,
        source: str | None = None,
        secure_transport: bool = False,
    ) -> None:
        self.op = op
        self.args = args
        self.principal = principal
        self.request_id = request_id
        self.source = source
        self.secure_transport = secure_transport
        self.key_arns: list[str] = []
        self.key_version: int | None = None
        self.decisions: list[str] = []
        self.invocation_id: str | None = None  # set for retry-safe (non-idempotent) operations
        self.authorized = principal is None  # trusted callers need no decision

    def used(self, key_arn: str, version: int | None) -> None:
        """Record a key (and the version) the call used, for its audit line."""
        if key_arn not in self.key_arns:
            self.key_arns.append(key_arn)
        if version is not None:
            self.key_version = version

    @property
    def decision(self) -> str | None:
        """The authorization decisions for the audit line ("allow key-policy:Sid; ...")."""
        return "; ".join(self.decisions) if self.decisions else None
