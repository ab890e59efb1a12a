"""CreateAlias, UpdateAlias, DeleteAlias, ListAliases.

An alias is a resource of its own: besides the key policy's permission on the key,
the caller's identity policy must allow the action on the alias ARN (aliases have no
resource policy), as AWS KMS documents.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from hsmkeys.catalog.base import AliasRecord, KeyRecord
from hsmkeys.errors import (
    AlreadyExistsException,
    InvalidAliasNameException,
    InvalidMarkerException,
    LimitExceededException,
    NotFoundException,
    ValidationException,
)
from hsmkeys.models import AliasListEntry, ListAliasesResult
from hsmkeys.ops.common import MAX_ALIASES_PER_KEY, key_type, page_limit
from hsmkeys.ops.managed import PREDEFINED_ALIASES, refuse_alias_name
from hsmkeys.validation import check_str

if TYPE_CHECKING:
    from hsmkeys.call import Call
    from hsmkeys.keystore import KeyStore

ALIAS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/_-")


def check_alias_name(alias_name: object, call: Call | None = None) -> str:
    """A valid alias name. ``alias/aws/*`` (AWS managed keys' names): with ``call``
    (UpdateAlias, DeleteAlias) AccessDeniedException, else InvalidAliasNameException."""
    name = check_str("aliasName", alias_name, min_len=1, max_len=256)
    if not name.startswith("alias/") or len(name) == 6 or not set(name) <= ALIAS_CHARS:
        raise ValidationException(
            "1 validation error detected: Value at 'aliasName' failed to satisfy constraint: "
            "Member must satisfy regular expression pattern: ^alias/[a-zA-Z0-9/_-]+$"
        )
    if call is not None:
        refuse_alias_name(call, name)
    if name.startswith("alias/aws/"):
        raise InvalidAliasNameException("Alias names starting with alias/aws/ are reserved.")
    return name


def _authorize_alias(ks: KeyStore, call: Call, name: str) -> None:
    role = call.op.keyless_role
    ks._authorize(call, None, role, resource=ks._scope.alias_arn(name))


def _target(ks: KeyStore, call: Call, target_key_id: object) -> KeyRecord:
    key = ks._key(call, target_key_id, 0, alias_ok=False)
    ks._require_not_pending_deletion(key)
    return key


def create_alias(ks: KeyStore, call: Call, *, alias_name: str, target_key_id: str) -> None:
    name = check_alias_name(alias_name)
    now = ks._now()
    with ks._catalog.transaction():
        key = _target(ks, call, target_key_id)
        _authorize_alias(ks, call, name)
        if ks._catalog.count_aliases(key.key_uuid) >= MAX_ALIASES_PER_KEY:
            raise LimitExceededException(f"A key may have at most {MAX_ALIASES_PER_KEY} aliases.")
        if ks._catalog.get_alias(name) is not None:
            raise AlreadyExistsException(f"An alias with the name {ks._scope.alias_arn(name)} already exists")
        ks._catalog.insert_alias(AliasRecord(name, key.key_uuid, now, now))
    call.used(ks._arn(key.key_uuid), None)


def update_alias(ks: KeyStore, call: Call, *, alias_name: str, target_key_id: str) -> None:
    name = check_alias_name(alias_name, call)
    with ks._catalog.transaction():
        alias = ks._catalog.get_alias(name)
        if alias is None:
            raise NotFoundException(f"Alias {ks._scope.alias_arn(name)} is not found.")
        key = _target(ks, call, target_key_id)
        current = ks._catalog.get_key(alias.key_uuid)
        if current is not None:
            ks._authorize(call, current, call.op.keys[1])
        _authorize_alias(ks, call, name)
        if current is not None and (current.usage is not key.usage or key_type(current.spec) != key_type(key.spec)):
            raise ValidationException("The new target key must have the same key type and key usage as the current one.")
        ks._catalog.update_alias(replace(alias, key_uuid=key.key_uuid, updated_at=ks._now()))
    call.used(ks._arn(key.key_uuid), None)


def delete_alias(ks: KeyStore, call: Call, *, alias_name: str) -> None:
    name = check_alias_name(alias_name, call)
    with ks._catalog.transaction():
        alias = ks._catalog.get_alias(name)
        if alias is None:
            raise NotFoundException(f"Alias {ks._scope.alias_arn(name)} is not found.")
        key = ks._catalog.get_key(alias.key_uuid)
        if key is not None:
            ks._authorize(call, key, call.op.keys[0])
            call.used(ks._arn(key.key_uuid), None)
        _authorize_alias(ks, call, name)
        ks._catalog.delete_alias(name)


def list_aliases(
    ks: KeyStore, call: Call, *, key_id: str | None = None, limit: int | None = None, marker: str | None = None
) -> ListAliasesResult:
    size = page_limit(limit, default=50, high=100)  # ListAliases: 1-100, default 50 (not the model's 1000)
    if marker is not None:
        check_str("marker", marker, min_len=1, max_len=320)
        if not marker.startswith("alias/"):
            raise InvalidMarkerException("The marker is not valid.")
    key_uuid = None
    if key_id is not None:
        text = check_str("keyId", key_id, min_len=1, max_len=2048)
        if text.startswith("alias/") or ":alias/" in text:
            raise NotFoundException(f"Invalid keyId '{text}': use a key id or key ARN, not an alias")
        key_uuid = ks._lookup(text).key_uuid
    rows = ks._catalog.list_aliases(limit=size + 1, after=marker, key_uuid=key_uuid)
    entries = [
        AliasListEntry(
            alias_name=a.name,
            alias_arn=ks._scope.alias_arn(a.name),
            target_key_id=str(a.key_uuid),
            creation_date=a.created_at,
            last_updated_date=a.updated_at,
        )
        for a in rows
    ]
    if key_uuid is None:
        # AWS lists the predefined AWS managed key aliases without a target until first use.
        taken = {a.name for a in rows}
        entries += [
            AliasListEntry(alias_name=name, alias_arn=ks._scope.alias_arn(name))
            for name in PREDEFINED_ALIASES
            if name not in taken and (marker is None or name > marker) and ks._catalog.get_alias(name) is None
        ]
        entries.sort(key=lambda e: e.alias_name)
    page, truncated = entries[:size], len(entries) > size
    return ListAliasesResult(tuple(page), truncated, page[-1].alias_name if truncated else None)
