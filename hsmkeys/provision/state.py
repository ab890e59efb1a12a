"""The current state of the keys a provisioning file names, read through a KmsApi.

Only what the file manages is read (a key whose entry has no ``grants:`` costs no
ListGrants). A key is found by its alias; when the alias is missing, a key that an
interrupted run created (tagged ``hsmkeys:provision-alias=<alias>``, with no alias of
its own and not pending deletion) is found instead and adopted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from hsmkeys.kmsclient import KmsApi
from hsmkeys.provision.schema import PROVISION_TAG, DesiredFile, KeyEntry, ProvisionError, State

__all__ = ["CurrentGrant", "CurrentKey", "CurrentState", "RotationState", "read_state"]

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class RotationState:
    enabled: bool
    period_days: int | None


@dataclass(frozen=True, slots=True)
class CurrentGrant:
    grant_id: str
    name: str
    grantee: str
    operations: tuple[str, ...]  # sorted
    retiring_principal: str | None
    context_equals: Mapping[str, str] | None
    context_subset: Mapping[str, str] | None


@dataclass(frozen=True, slots=True)
class CurrentKey:
    """One existing key; a field is None when the file does not manage it (not read)."""

    key_id: str
    arn: str
    key_spec: str
    key_usage: str
    origin: str
    key_state: str  # Enabled, Disabled, PendingDeletion, PendingImport, ...
    description: str
    aliases: tuple[str, ...]  # every alias pointing at the key
    adopted: bool  # found by its provision tag, its alias is missing
    rotation: RotationState | None = None
    tags: Mapping[str, str] | None = None  # without the provision tag
    policy: Any = None
    grants: tuple[CurrentGrant, ...] | None = None


@dataclass(frozen=True, slots=True)
class CurrentState:
    alias_targets: Mapping[str, str]  # every alias -> key id
    keys: Mapping[str, CurrentKey]  # entry alias -> its key, for entries whose key exists


def _pages(api: KmsApi, operation: str, params: Mapping[str, Any], items: str) -> Iterator[dict[str, Any]]:
    marker: str | None = None
    while True:
        page = api.call(operation, {**params, **({"Marker": marker} if marker else {})})
        yield from page.get(items, [])
        marker = page.get("NextMarker")
        if not page.get("Truncated") or not marker:
            return


def _frozen_map(value: Any) -> Mapping[str, str] | None:
    return MappingProxyType(dict(value)) if value else None


def read_grants(api: KmsApi, key_id: str) -> tuple[CurrentGrant, ...]:
    grants = []
    for g in _pages(api, "ListGrants", {"KeyId": key_id}, "Grants"):
        constraints = g.get("Constraints") or {}
        grants.append(
            CurrentGrant(
                grant_id=g["GrantId"],
                name=g.get("Name") or "",
                grantee=g.get("GranteePrincipal", ""),
                operations=tuple(sorted(g.get("Operations", ()))),
                retiring_principal=g.get("RetiringPrincipal") or None,
                context_equals=_frozen_map(constraints.get("EncryptionContextEquals")),
                context_subset=_frozen_map(constraints.get("EncryptionContextSubset")),
            )
        )
    return tuple(grants)


def _find_orphans(
    api: KmsApi, missing: set[str], alias_targets: Mapping[str, str], progress: Progress
) -> dict[str, str]:
    """alias -> key id of unaliased keys tagged for a missing alias (not pending deletion)."""
    aliased = set(alias_targets.values())
    found: dict[str, list[str]] = {}
    candidates = [k["KeyId"] for k in _pages(api, "ListKeys", {}, "Keys") if k["KeyId"] not in aliased]
    progress(f"looking for keys an interrupted run created: {len(candidates)} unaliased key(s)")
    for key_id in candidates:
        tags = {t["TagKey"]: t["TagValue"] for t in _pages(api, "ListResourceTags", {"KeyId": key_id}, "Tags")}
        alias = tags.get(PROVISION_TAG)
        if alias not in missing:
            continue
        state = api.call("DescribeKey", {"KeyId": key_id})["KeyMetadata"]["KeyState"]
        if state != "PendingDeletion":
            found.setdefault(alias, []).append(key_id)
    several = {a: ids for a, ids in found.items() if len(ids) > 1}
    if several:
        raise ProvisionError(
            [
                f"{alias}: keys {', '.join(sorted(ids))} are all tagged {PROVISION_TAG}={alias} and have no "
                "alias; keep one (create the alias for it) and schedule the others for deletion"
                for alias, ids in sorted(several.items())
            ]
        )
    return {alias: ids[0] for alias, ids in found.items()}


def read_state(api: KmsApi, desired: DesiredFile, progress: Progress = lambda _: None) -> CurrentState:
    """Read what ``desired`` manages. Raises KMSError from the calls, ProvisionError for an
    ambiguous orphan."""
    progress("reading aliases")
    alias_targets = {
        a["AliasName"]: a["TargetKeyId"]
        for a in _pages(api, "ListAliases", {}, "Aliases")
        if a.get("TargetKeyId")
    }
    key_ids = {e.alias: alias_targets[e.alias] for e in desired.entries if e.alias in alias_targets}
    # Only keys still to be created are looked for (a steady state with absent entries costs
    # no scan); an orphan of an entry since made absent is left alone.
    missing = {e.alias for e in desired.entries if e.state is State.PRESENT} - set(key_ids)
    orphans = _find_orphans(api, missing, alias_targets, progress) if missing else {}
    keys: dict[str, CurrentKey] = {}
    for entry in desired.entries:
        key_id = key_ids.get(entry.alias) or orphans.get(entry.alias)
        if key_id is not None:
            progress(f"reading {entry.alias}")
            keys[entry.alias] = _read_key(api, entry, key_id, alias_targets, adopted=entry.alias in orphans)
    return CurrentState(MappingProxyType(alias_targets), MappingProxyType(keys))


def _read_key(
    api: KmsApi, entry: KeyEntry, key_id: str, alias_targets: Mapping[str, str], *, adopted: bool
) -> CurrentKey:
    md = api.call("DescribeKey", {"KeyId": key_id})["KeyMetadata"]
    key_id = md["KeyId"]
    key = CurrentKey(
        key_id=key_id,
        arn=md.get("Arn", key_id),
        key_spec=md.get("KeySpec") or md.get("CustomerMasterKeySpec") or "SYMMETRIC_DEFAULT",
        key_usage=md.get("KeyUsage", "ENCRYPT_DECRYPT"),
        origin=md.get("Origin", "AWS_KMS"),
        key_state=md["KeyState"],
        description=md.get("Description", ""),
        aliases=tuple(sorted(a for a, k in alias_targets.items() if k == key_id)),
        adopted=adopted,
    )
    if entry.state is State.ABSENT or (key.key_spec, key.key_usage, key.origin) != (
        entry.key_spec,
        entry.key_usage,
        entry.origin,
    ):
        return key  # nothing more to compare (absent, or a mismatch the plan refuses)
    rotation = tags = policy = grants = None
    readable = key.key_state in ("Enabled", "Disabled")
    if entry.rotation is not None and readable:
        status = api.call("GetKeyRotationStatus", {"KeyId": key_id})
        enabled = bool(status.get("KeyRotationEnabled"))
        rotation = RotationState(enabled, status.get("RotationPeriodInDays") if enabled else None)
    if entry.tags is not None:
        pairs = _pages(api, "ListResourceTags", {"KeyId": key_id}, "Tags")
        tags = MappingProxyType({t["TagKey"]: t["TagValue"] for t in pairs if t["TagKey"] != PROVISION_TAG})
    if entry.policy is not None:
        text = api.call("GetKeyPolicy", {"KeyId": key_id, "PolicyName": "default"}).get("Policy") or "{}"
        try:
            policy = json.loads(text)
        except ValueError:
            policy = text  # differs from any document in the file, so PutKeyPolicy replaces it
    if entry.grants is not None:
        grants = read_grants(api, key_id)
    return replace(key, rotation=rotation, tags=tags, policy=policy, grants=grants)
