"""The values authorization works on: who asks, for what, and the answer.

Pure data: no I/O, no HSM, no SQL. The KeyStore builds an :class:`AuthzRequest` for
each key (or ``*`` for keyless operations) an operation touches and asks
:func:`hsmkeys.authz.decide` for a :class:`Decision`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

# A condition key's value in a request: one string, a set of strings (multi-valued keys
# such as kms:EncryptionContextKeys or kms:GrantOperations), a bool, a number or a time.
ConditionValue = str | tuple[str, ...] | bool | int | datetime

_PRINCIPAL_ARN = re.compile(r"^arn:aws:(iam|sts)::(\d{12}):(.+)$")


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: an IAM user, role, assumed-role session or account root."""

    arn: str  # arn:aws:iam::444455556666:role/x, ...:user/alice, ...:root
    identity_policy: object | None = None  # a CompiledPolicy (hsmkeys.authz.policy), or None: no IAM policy

    @property
    def account(self) -> str:
        m = _PRINCIPAL_ARN.match(self.arn)
        return m.group(2) if m else ""

    @property
    def is_root(self) -> bool:
        return self.arn.endswith(":root")

    @property
    def username(self) -> str | None:
        """aws:username: the user name of an IAM user, else None."""
        m = _PRINCIPAL_ARN.match(self.arn)
        if m is None or m.group(1) != "iam" or not m.group(3).startswith("user/"):
            return None
        return m.group(3).rsplit("/", 1)[-1]


class GrantLike(Protocol):
    """What authorization reads of a grant (GrantView, or the catalog's GrantRecord)."""

    @property
    def grant_id(self) -> str: ...

    @property
    def grantee_principal(self) -> str: ...

    @property
    def operations(self) -> tuple[str, ...]: ...

    @property
    def encryption_context_equals(self) -> Mapping[str, str] | None: ...

    @property
    def encryption_context_subset(self) -> Mapping[str, str] | None: ...


@dataclass(frozen=True, slots=True)
class GrantView:
    """What authorization needs of one grant on the key (the catalog's GrantRecord fits)."""

    grant_id: str
    grantee_principal: str
    operations: tuple[str, ...]  # KMS operation names: "Encrypt", "ReEncryptFrom", ...
    encryption_context_equals: Mapping[str, str] | None = None
    encryption_context_subset: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    """One decision: may ``principal`` perform ``action`` on ``resource``?

    ``resource`` is the key ARN, or ``"*"`` for operations that name no key (CreateKey,
    ListKeys, ...). ``key_account`` is the account owning the key (None when keyless).
    ``context`` holds every condition key the request supplies, by its name as written
    in policies (``kms:EncryptionContext:Department``, ``kms:CallerAccount``,
    ``aws:SourceIp``, ...); a key absent from the mapping is absent from the request.
    ``grant_operation`` is the KMS operation name a grant must list for this action
    (``"ReEncryptFrom"`` for kms:ReEncryptFrom), None where grants cannot apply.
    ``encryption_context`` is the request's context for grant constraints.
    """

    principal: Principal
    action: str  # "kms:Encrypt"
    resource: str
    key_account: str | None = None
    context: Mapping[str, ConditionValue] = field(default_factory=dict)
    grant_operation: str | None = None
    encryption_context: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer and what decided it.

    ``by`` names the deciding element for the audit line: ``key-policy:<Sid>``,
    ``identity-policy:<Sid>``, ``grant:<grant id>``, ``key-policy+identity-policy:<Sid>/<Sid>``
    ``account-root`` (a keyless request by an account's root, which IAM does not limit
    unless a Deny says so) or ``implicit-deny``; a statement without a Sid is named by its
    0-based index (``key-policy:#2``). ``explicit_deny`` is True when a Deny statement
    matched. ``policy_type`` names, for a refusal, the kind of policy that denied or that
    failed to allow (``"resource-based"``: the key policy; ``"identity-based"``: IAM), as
    KMS's AccessDeniedException message does.
    """

    allowed: bool
    by: str
    explicit_deny: bool = False
    policy_type: str | None = None
