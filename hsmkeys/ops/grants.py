"""Grants: CreateGrant, ListGrants, ListRetirableGrants, RetireGrant, RevokeGrant.

A grant lets its grantee principal use the key for the listed operations, under
optional encryption context constraints, as AWS KMS documents. Grants live in the
catalog and die with their key. The catalog is strongly consistent, so a grant is
effective as soon as CreateGrant returns; a grant token is still accepted (and
checked for form) wherever KMS takes one.

Grant tokens name their grant: ``base64url(key uuid ‖ grant id ‖ 16 random bytes)``,
a new one for every CreateGrant call (an idempotent retry returns the same grant id
with a fresh token, as KMS does); all tokens of one grant are interchangeable.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from hsmkeys import faultpoints
from hsmkeys.authz import GRANT_OPERATIONS
from hsmkeys.authz.model import Principal
from hsmkeys.catalog.base import GrantRecord, KeyRecord
from hsmkeys.errors import (
    AccessDeniedException,
    InvalidGrantIdException,
    InvalidGrantTokenException,
    InvalidMarkerException,
    NotFoundException,
    ValidationException,
)
from hsmkeys.keyspecs import grant_operations
from hsmkeys.models import (
    CreateGrantResult,
    GrantConstraints,
    GrantListEntry,
    KeySpec,
    ListGrantsResult,
)
from hsmkeys.ops.common import dry_run_error, page_limit
from hsmkeys.validation import check_grant_tokens, check_str

if TYPE_CHECKING:
    from hsmkeys.call import Call
    from hsmkeys.keystore import KeyStore

MAX_GRANTS_PER_KEY = 50000
# CreateGrant Constraints: "up to 8 encryption context pairs", each value at most 384 characters.
MAX_CONSTRAINT_PAIRS = 8
MAX_CONSTRAINT_VALUE = 384
# Operations that take an encryption context: the only ones a constraint can govern.
_CONTEXT_OPERATIONS = frozenset(
    {
        "Decrypt",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
        "ReEncryptFrom",
        "ReEncryptTo",
        "CreateGrant",
        "RetireGrant",
        "DescribeKey",
    }
)
_GRANT_ID = re.compile(r"^[0-9a-f]{64}$")
_PRINCIPAL = re.compile(r"^(arn:aws:(iam|sts)::\d{12}:[\w+=,.@/:-]+|\d{12})$")


# ---------------------------------------------------------------- tokens


def make_token(key_uuid: uuid.UUID, grant_id: str, nonce: bytes) -> str:
    raw = key_uuid.bytes + bytes.fromhex(grant_id) + nonce
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def parse_token(token: str) -> tuple[uuid.UUID, str]:
    """(key uuid, grant id) named by a grant token; InvalidGrantTokenException if malformed."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise InvalidGrantTokenException("The grant token is not valid.") from None
    if len(raw) != 64:
        raise InvalidGrantTokenException("The grant token is not valid.")
    return uuid.UUID(bytes=raw[:16]), raw[16:48].hex()


def check_tokens(grant_tokens: Sequence[str] | None) -> tuple[str, ...]:
    """Validate the form of every grant token in a request."""
    tokens = check_grant_tokens(grant_tokens)
    for token in tokens:
        parse_token(token)
    return tokens


# ---------------------------------------------------------------- helpers


def _check_principal(field: str, value: object) -> str:
    text = check_str(field, value, min_len=1, max_len=256)
    if not _PRINCIPAL.match(text):
        raise ValidationException(
            f"{field} must be an AWS account id or the ARN of an IAM user, role, or assumed-role session."
        )
    return text


def _check_grant_id(grant_id: object) -> str:
    text = check_str("grantId", grant_id, min_len=1, max_len=128)
    if not _GRANT_ID.match(text):
        raise InvalidGrantIdException("The grant ID is not valid.")
    return text


def _constraint_maps(
    constraints: GrantConstraints | None,
) -> tuple[Mapping[str, str] | None, Mapping[str, str] | None]:
    if constraints is None:
        return None, None
    if constraints.source_arn is not None:
        raise ValidationException("The SourceArn grant constraint is not supported.")
    equals, subset = constraints.encryption_context_equals, constraints.encryption_context_subset
    if equals is not None and subset is not None:
        raise ValidationException("Specify EncryptionContextEquals or EncryptionContextSubset, not both.")
    for name, pairs in (("encryptionContextEquals", equals), ("encryptionContextSubset", subset)):
        if pairs is None:
            continue
        if len(pairs) > MAX_CONSTRAINT_PAIRS:
            raise ValidationException(f"A grant constraint ({name}) can hold at most {MAX_CONSTRAINT_PAIRS} pairs.")
        if any(len(value) > MAX_CONSTRAINT_VALUE for value in pairs.values()):
            raise ValidationException(
                f"A grant constraint ({name}) value can be at most {MAX_CONSTRAINT_VALUE} characters."
            )
    return equals, subset


def _entry(ks: KeyStore, grant: GrantRecord) -> GrantListEntry:
    constraints = None
    if grant.encryption_context_equals is not None or grant.encryption_context_subset is not None:
        constraints = GrantConstraints(
            encryption_context_subset=dict(grant.encryption_context_subset)
            if grant.encryption_context_subset is not None
            else None,
            encryption_context_equals=dict(grant.encryption_context_equals)
            if grant.encryption_context_equals is not None
            else None,
        )
    return GrantListEntry(
        key_id=ks._arn(grant.key_uuid),
        grant_id=grant.grant_id,
        creation_date=grant.created_at,
        grantee_principal=grant.grantee_principal,
        issuing_account=f"arn:aws:iam::{grant.issuing_account}:root",
        operations=grant.operations,
        name=grant.name,
        retiring_principal=grant.retiring_principal,
        constraints=constraints,
    )


def _same(grant: GrantRecord, other: GrantRecord) -> bool:
    """Whether a named grant already exists with these parameters (CreateGrant's idempotency)."""
    return (
        grant.grantee_principal == other.grantee_principal
        and grant.retiring_principal == other.retiring_principal
        and sorted(grant.operations) == sorted(other.operations)
        and _map(grant.encryption_context_equals) == _map(other.encryption_context_equals)
        and _map(grant.encryption_context_subset) == _map(other.encryption_context_subset)
    )


def _map(value: Mapping[str, str] | None) -> dict[str, str] | None:
    return dict(value) if value is not None else None


def _check_delegation(ks: KeyStore, call: Call, key: KeyRecord, new: GrantRecord) -> None:
    """CreateGrant allowed by a grant: the new grant may not widen it (KMS's rules)."""
    last = call.decisions[-1] if call.decisions else ""
    if not last.startswith("allow grant:"):
        return
    parent = ks._catalog.get_grant(key.key_uuid, last.removeprefix("allow grant:"))
    if parent is None:
        return
    if not set(new.operations) <= set(parent.operations):
        raise AccessDeniedException(
            "A grant created with a grant may allow only operations the parent grant allows."
        )
    if parent.encryption_context_equals is not None and _map(new.encryption_context_equals) != _map(
        parent.encryption_context_equals
    ):
        raise AccessDeniedException("A grant created with a grant must keep the parent's constraints.")
    if parent.encryption_context_subset is not None:
        child = new.encryption_context_equals or new.encryption_context_subset
        if child is None or any(child.get(k) != v for k, v in parent.encryption_context_subset.items()):
            raise AccessDeniedException("A grant created with a grant must keep the parent's constraints.")


# ---------------------------------------------------------------- operations


def create_grant(
    ks: KeyStore,
    call: Call,
    *,
    key_id: str,
    operations: Sequence[str],
    grantee_principal: str | None = None,
    retiring_principal: str | None = None,
    constraints: GrantConstraints | None = None,
    grant_tokens: Sequence[str] | None = None,
    name: str | None = None,
    dry_run: bool = False,
) -> CreateGrantResult:
    grantee = _check_principal("granteePrincipal", grantee_principal)
    retiring = _check_principal("retiringPrincipal", retiring_principal) if retiring_principal is not None else None
    if isinstance(operations, str) or not operations:
        raise ValidationException("Operations must list at least one grant operation.")
    ops = tuple(dict.fromkeys(operations))
    unknown = [op for op in ops if op not in GRANT_OPERATIONS]
    if unknown:
        raise ValidationException(f"Invalid grant operations: {', '.join(unknown)}")
    equals, subset = _constraint_maps(constraints)
    if (equals is not None or subset is not None) and not set(ops) <= _CONTEXT_OPERATIONS:
        raise ValidationException(
            "Encryption context grant constraints are valid only for operations that take an encryption context."
        )
    if name is not None:
        check_str("name", name, min_len=1, max_len=256)
    check_tokens(grant_tokens)
    with ks._catalog.transaction():
        key = ks._key(call, key_id, alias_ok=False)
        ks._require_enabled(key)  # key-state table: Disabled, PendingImport, PendingDeletion refuse
        supported = grant_operations(key.spec, key.usage)
        unsupported = [op for op in ops if op not in supported]
        if unsupported:
            raise ValidationException(
                f"Grant operations {', '.join(unsupported)} are not supported by a key with "
                f"key spec {key.spec.value} and key usage {key.usage.value}."
            )
        if (equals is not None or subset is not None) and key.spec is not KeySpec.SYMMETRIC_DEFAULT:
            raise ValidationException("Encryption context grant constraints need a symmetric encryption KMS key.")
        nonce = ks._hsm.random(16)
        grant = GrantRecord(
            grant_id=ks._hsm.random(32).hex(),
            key_uuid=key.key_uuid,
            token="",
            grantee_principal=grantee,
            operations=ops,
            issuing_account=call.principal.account if call.principal is not None else ks.account_id,
            created_at=ks._now(),
            name=name,
            retiring_principal=retiring,
            encryption_context_equals=equals,
            encryption_context_subset=subset,
        )
        _check_delegation(ks, call, key, grant)
        if dry_run:
            raise dry_run_error(call.op.name)
        earlier_id = ks._recall(call)
        earlier = ks._catalog.get_grant(key.key_uuid, earlier_id) if earlier_id is not None else None
        if earlier is not None:  # a retry of a request whose first attempt committed
            call.used(ks._arn(key.key_uuid), None)
            return CreateGrantResult(earlier.token, earlier.grant_id)
        if name is not None:
            for existing in ks._catalog.find_grant_by_name(key.key_uuid, name):
                if _same(existing, grant):
                    call.used(ks._arn(key.key_uuid), None)
                    return CreateGrantResult(make_token(key.key_uuid, existing.grant_id, nonce), existing.grant_id)
        token = make_token(key.key_uuid, grant.grant_id, nonce)
        ks._catalog.insert_grant(dataclasses.replace(grant, token=token))
        ks._remember(call, grant.grant_id)
    faultpoints.reached("create_grant.committed")
    call.used(ks._arn(key.key_uuid), None)
    return CreateGrantResult(token, grant.grant_id)


def list_grants(
    ks: KeyStore,
    call: Call,
    *,
    key_id: str,
    limit: int | None = None,
    marker: str | None = None,
    grant_id: str | None = None,
    grantee_principal: str | None = None,
) -> ListGrantsResult:
    size = page_limit(limit, default=50, high=100)
    if marker is not None:
        check_str("marker", marker, min_len=1, max_len=1024)
        if not _GRANT_ID.match(marker):
            raise InvalidMarkerException("The marker is not valid.")
    wanted = _check_grant_id(grant_id) if grant_id is not None else None
    grantee = _check_principal("granteePrincipal", grantee_principal) if grantee_principal is not None else None
    key = ks._key(call, key_id, alias_ok=False)
    rows = ks._catalog.list_grants(
        key.key_uuid, limit=size + 1, after=marker, grant_id=wanted, grantee_principal=grantee
    )
    page, truncated = rows[:size], len(rows) > size
    call.used(ks._arn(key.key_uuid), None)
    return ListGrantsResult(
        tuple(_entry(ks, g) for g in page), truncated, page[-1].grant_id if truncated else None
    )


def list_retirable_grants(
    ks: KeyStore,
    call: Call,
    *,
    retiring_principal: str | None = None,
    limit: int | None = None,
    marker: str | None = None,
) -> ListGrantsResult:
    size = page_limit(limit, default=50, high=100)
    if retiring_principal is None:
        raise ValidationException("RetiringPrincipal is required.")
    principal = _check_principal("retiringPrincipal", retiring_principal)
    caller = call.principal
    owner = principal if principal.isdigit() else Principal(principal).account  # an account id, or an ARN's
    if caller is not None and caller.account != owner:
        # "You must specify a principal in your Amazon Web Services account."
        raise AccessDeniedException(
            f"User: {caller.arn} is not authorized to perform: kms:ListRetirableGrants on resource: "
            f"{principal} because the retiring principal is not in the caller's account"
        )
    if marker is not None:
        check_str("marker", marker, min_len=1, max_len=1024)
        if not _GRANT_ID.match(marker):
            raise InvalidMarkerException("The marker is not valid.")
    rows = ks._catalog.list_retirable_grants(principal, limit=size + 1, after=marker)
    page, truncated = rows[:size], len(rows) > size
    return ListGrantsResult(tuple(_entry(ks, g) for g in page), truncated, page[-1].grant_id if truncated else None)


def retire_grant(
    ks: KeyStore,
    call: Call,
    *,
    grant_token: str | None = None,
    key_id: str | None = None,
    grant_id: str | None = None,
    dry_run: bool = False,
) -> None:
    """Retire by token, or by key + grant id, as the retiring principal, the grantee (when
    the grant lists RetireGrant), or a principal of the account that created the grant
    (see KeyStore._authorize_retire)."""
    if grant_token is not None:
        check_str("grantToken", grant_token, min_len=1, max_len=8192)
        key_uuid, wanted = parse_token(grant_token)
        key = ks._lookup(str(key_uuid))
    elif key_id is not None and grant_id is not None:
        wanted = _check_grant_id(grant_id)
        key = ks._lookup(check_str("keyId", key_id, min_len=1, max_len=2048))
    else:
        raise ValidationException("Specify a GrantToken, or both KeyId and GrantId.")
    with ks._catalog.transaction():
        grant = ks._catalog.get_grant(key.key_uuid, wanted)
        if grant is None:
            raise NotFoundException(f"Grant {wanted} does not exist for key {ks._arn(key.key_uuid)}.")
        ks._authorize_retire(call, key, grant)
        if dry_run:
            raise dry_run_error(call.op.name)
        ks._catalog.delete_grant(grant.grant_id)
    call.used(ks._arn(key.key_uuid), None)


def revoke_grant(
    ks: KeyStore, call: Call, *, key_id: str, grant_id: str, dry_run: bool = False
) -> None:
    wanted = _check_grant_id(grant_id)
    with ks._catalog.transaction():
        key = ks._key(call, key_id, alias_ok=False)
        if ks._catalog.get_grant(key.key_uuid, wanted) is None:
            raise NotFoundException(f"Grant {wanted} does not exist for key {ks._arn(key.key_uuid)}.")
        if dry_run:
            raise dry_run_error(call.op.name)
        ks._catalog.delete_grant(wanted)
    call.used(ks._arn(key.key_uuid), None)


__all__ = [
    "check_tokens",
    "create_grant",
    "list_grants",
    "list_retirable_grants",
    "make_token",
    "parse_token",
    "retire_grant",
    "revoke_grant",
]
