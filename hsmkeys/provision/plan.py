"""The plan: what apply would change, computed from the file and the current state (no I/O).

Each :class:`Change` is one printed line and the exact KMS calls that make it. Changes of
one entry come in the order that keeps every call valid: cancel deletion, create (or
adopt), import key material, enable, description, rotation, tags, policy, grants,
aliases, disable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from hsmkeys.provision.keymaterial import KeyMaterial
from hsmkeys.provision.schema import (
    PROVISION_TAG,
    DesiredFile,
    GrantSpec,
    KeyEntry,
    ProvisionError,
    State,
)
from hsmkeys.provision.state import CurrentGrant, CurrentKey, CurrentState, RotationState

__all__ = ["THIS_KEY", "Action", "Call", "Change", "ImportMaterial", "Plan", "build_plan"]


class Action(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"

    @property
    def sign(self) -> str:
        return {"create": "+", "update": "~", "delete": "-"}[self.value]


class _ThisKey:
    """Placeholder for the entry's key id in a Call's params (known only once it exists)."""

    def __repr__(self) -> str:
        return "THIS_KEY"


THIS_KEY: Any = _ThisKey()


@dataclass(frozen=True, slots=True)
class Call:
    operation: str  # KMS wire name
    params: Mapping[str, Any]  # THIS_KEY stands for the entry's key id


@dataclass(frozen=True, slots=True)
class ImportMaterial:
    """GetParametersForImport, wrap locally, ImportKeyMaterial."""

    material: KeyMaterial = field(repr=False)


Step = Call | ImportMaterial


@dataclass(frozen=True, slots=True)
class Change:
    action: Action
    alias: str  # the entry
    field: str  # what changes: key, description, tags, grant:<name>, alias:<name>, ...
    text: str  # the line, without its sign
    key_id: str | None  # None: the key an earlier change of this plan creates
    steps: tuple[Step, ...]
    old: Any = None  # JSON values for --json
    new: Any = None

    @property
    def line(self) -> str:
        return f"{self.action.sign} {self.text}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "action": self.action.value,
            "alias": self.alias,
            "field": self.field,
            "summary": self.line,
            "key_id": self.key_id,
        }
        if self.old is not None:
            out["old"] = self.old
        if self.new is not None:
            out["new"] = self.new
        return out


@dataclass(frozen=True, slots=True)
class Plan:
    changes: tuple[Change, ...]

    @property
    def pending(self) -> bool:
        return bool(self.changes)

    def counts(self) -> dict[str, int]:
        return {a.value: sum(c.action is a for c in self.changes) for a in Action}

    def summary(self) -> str:
        if not self.changes:
            return "no changes"
        n = self.counts()
        return f"{n['create']} to create, {n['update']} to update, {n['delete']} to delete"

    def to_json(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "counts": self.counts(),
            "changes": [c.to_json() for c in self.changes],
        }


# ==================================================================== diff


def _q(value: str) -> str:
    return repr(value)


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _rotation_text(enabled: bool, period: int | None) -> str:
    if not enabled:
        return "disabled"
    return f"enabled ({period} days)" if period is not None else "enabled"


def build_plan(desired: DesiredFile, current: CurrentState) -> Plan:
    """The changes that make ``current`` match ``desired``. Raises ProvisionError listing
    every entry that cannot be reconciled (a different key spec, an unusable key state,...)."""
    problems: list[str] = []
    changes: list[Change] = []
    owners: dict[str, str] = {}
    for entry in desired.entries:
        key = current.keys.get(entry.alias)
        if key is not None and key.key_id in owners:
            problems.append(
                f"{entry.where('alias')}: resolves to key {key.key_id}, which {owners[key.key_id]} also manages"
            )
            continue
        if key is not None:
            owners[key.key_id] = entry.alias
        if entry.state is State.ABSENT:
            changes += _absent(entry, key)
        else:
            _Differ(entry, key, current.alias_targets, changes, problems).run()
    if problems:
        raise ProvisionError(problems)
    return Plan(tuple(changes))


def _absent(entry: KeyEntry, key: CurrentKey | None) -> list[Change]:
    if key is None or key.key_state == "PendingDeletion":
        return []
    days = entry.pending_window_days
    params = {"KeyId": key.key_id, "PendingWindowInDays": days}
    return [
        Change(
            Action.DELETE,
            entry.alias,
            "key",
            f"schedule deletion {entry.alias} ({days} days)",
            key.key_id,
            (Call("ScheduleKeyDeletion", params),),
            old=key.key_state,
            new="PendingDeletion",
        )
    ]


_USABLE_STATES = frozenset({"Enabled", "Disabled", "PendingDeletion", "PendingImport"})


class _Differ:
    """Diffs one present entry against its key (None: the key does not exist yet)."""

    def __init__(
        self,
        entry: KeyEntry,
        key: CurrentKey | None,
        alias_targets: Mapping[str, str],
        changes: list[Change],
        problems: list[str],
    ) -> None:
        self.entry = entry
        self.key = key
        self.alias_targets = alias_targets
        self.changes = changes
        self.problems = problems
        self.key_id = key.key_id if key is not None else None
        # The key's state as the changes so far leave it; steps that need an enabled key check it.
        self.enabled_now = key is not None and key.key_state == "Enabled"

    def add(self, action: Action, field_name: str, text: str, *steps: Step, old: Any = None, new: Any = None) -> None:
        self.changes.append(
            Change(action, self.entry.alias, field_name, text, self.key_id, tuple(steps), old=old, new=new)
        )

    def call(self, operation: str, **params: Any) -> Call:
        return Call(operation, MappingProxyType({"KeyId": THIS_KEY, **params}))

    # -------------------------------------------------------------- the key itself

    def run(self) -> None:
        if self.key is None:
            self.create()
        elif not self.existing(self.key):
            return
        self.enable()
        self.description()
        self.rotation()
        self.tags()
        self.policy()
        self.grants()
        self.aliases()
        self.disable()

    def create(self) -> None:
        e = self.entry
        tags = [{"TagKey": k, "TagValue": v} for k, v in sorted((e.tags or {}).items())]
        tags.append({"TagKey": PROVISION_TAG, "TagValue": e.alias})
        params: dict[str, Any] = {"KeySpec": e.key_spec, "KeyUsage": e.key_usage, "Tags": tags}
        if e.origin != "AWS_KMS":
            params["Origin"] = e.origin
        if e.description is not None:
            params["Description"] = e.description
        if e.policy is not None:
            params["Policy"] = json.dumps(e.policy, indent=2)
        what = f"{e.key_spec}, {e.key_usage}" + (f", origin {e.origin}" if e.origin != "AWS_KMS" else "")
        self.add(
            Action.CREATE,
            "key",
            f"create {e.alias} ({what})",
            Call("CreateKey", MappingProxyType(params)),
            Call("CreateAlias", MappingProxyType({"AliasName": e.alias, "TargetKeyId": THIS_KEY})),
            new={"key_spec": e.key_spec, "key_usage": e.key_usage, "origin": e.origin},
        )
        if e.key_material is not None:
            self.import_material(e.key_material)
        else:
            self.enabled_now = True
        self.key = CurrentKey(
            key_id="",
            arn="",
            key_spec=e.key_spec,
            key_usage=e.key_usage,
            origin=e.origin,
            key_state="Enabled",
            description=e.description or "",
            aliases=(e.alias,),
            adopted=False,
            rotation=RotationState(enabled=False, period_days=None),  # as KMS creates keys
            tags=MappingProxyType(dict(e.tags or {})),
            policy=e.policy,
            grants=(),
        )

    def existing(self, key: CurrentKey) -> bool:
        """Check the key may be managed and plan the state changes; False after a problem."""
        e = self.entry
        ok = True
        for name, have, want in (
            ("key_spec", key.key_spec, e.key_spec),
            ("key_usage", key.key_usage, e.key_usage),
            ("origin", key.origin, e.origin),
        ):
            if have != want:
                self.problems.append(
                    f"{e.where(name)}: the existing key {key.key_id} has {have}, the file says {want}; "
                    "provision never replaces a key (use a new alias for a new key)"
                )
                ok = False
        if ok and key.key_state not in _USABLE_STATES:
            self.problems.append(f"{e.where('alias')}: key {key.key_id} is {key.key_state}; try again later")
            ok = False
        if not ok:
            return False
        if key.key_state == "PendingDeletion":
            self.add(
                Action.UPDATE,
                "deletion",
                f"cancel deletion {e.alias}",
                self.call("CancelKeyDeletion"),
                old="PendingDeletion",
                new="Disabled",
            )
        if key.adopted:
            self.add(
                Action.CREATE,
                f"alias:{e.alias}",
                f"create alias {e.alias} → key {key.key_id} (created by an interrupted run)",
                Call("CreateAlias", MappingProxyType({"AliasName": e.alias, "TargetKeyId": THIS_KEY})),
                new=key.key_id,
            )
            self.alias_targets = {**self.alias_targets, e.alias: key.key_id}
        if key.key_state == "PendingImport":
            if e.key_material is None:  # origin EXTERNAL always has material (schema)
                return False
            self.import_material(e.key_material)
        return True

    def import_material(self, material: KeyMaterial) -> None:
        self.add(Action.CREATE, "key_material", f"import key material {self.entry.alias}", ImportMaterial(material))
        self.enabled_now = True

    # -------------------------------------------------------------- attributes

    def enable(self) -> None:
        if self.entry.enabled and not self.enabled_now:
            self.add(Action.UPDATE, "enabled", f"update {self.entry.alias} enabled: false → true",
                     self.call("EnableKey"), old=False, new=True)  # fmt: skip
            self.enabled_now = True

    def disable(self) -> None:
        if not self.entry.enabled and self.enabled_now:
            self.add(Action.UPDATE, "enabled", f"update {self.entry.alias} enabled: true → false",
                     self.call("DisableKey"), old=True, new=False)  # fmt: skip

    def description(self) -> None:
        want = self.entry.description
        assert self.key is not None
        have = self.key.description
        if want is not None and want != have:
            self.add(Action.UPDATE, "description",
                     f"update {self.entry.alias} description: {_q(have)} → {_q(want)}",
                     self.call("UpdateKeyDescription", Description=want), old=have, new=want)  # fmt: skip

    def rotation(self) -> None:
        want = self.entry.rotation
        assert self.key is not None
        have = self.key.rotation  # None: unknown (the key was pending deletion or import)
        if want is None:
            return
        if have is not None and want.enabled == have.enabled and (
            not want.enabled or want.period_days in (None, have.period_days)
        ):
            return
        if not self.enabled_now:
            self.problems.append(
                f"{self.entry.where('rotation')}: KMS changes rotation only on an enabled key, and this "
                "key stays disabled; set enabled: true (or change rotation while it is enabled)"
            )
            return
        old = "unknown" if have is None else _rotation_text(have.enabled, have.period_days)
        new = _rotation_text(want.enabled, want.period_days)
        if want.enabled:
            params = {} if want.period_days is None else {"RotationPeriodInDays": want.period_days}
            step = self.call("EnableKeyRotation", **params)
        else:
            step = self.call("DisableKeyRotation")
        self.add(Action.UPDATE, "rotation", f"update {self.entry.alias} rotation: {old} → {new}", step,
                 old=None if have is None else {"enabled": have.enabled, "period_days": have.period_days},
                 new={"enabled": want.enabled, "period_days": want.period_days})  # fmt: skip

    def tags(self) -> None:
        want = self.entry.tags
        assert self.key is not None
        have = self.key.tags
        if want is None or have is None or dict(want) == dict(have):
            return
        steps: list[Step] = []
        extra = sorted(set(have) - set(want))
        if extra:
            steps.append(self.call("UntagResource", TagKeys=extra))
        changed = sorted((k, v) for k, v in want.items() if have.get(k) != v)
        if changed:
            steps.append(self.call("TagResource", Tags=[{"TagKey": k, "TagValue": v} for k, v in changed]))
        self.add(Action.UPDATE, "tags",
                 f"update {self.entry.alias} tags: {_compact(dict(have))} → {_compact(dict(want))}",
                 *steps, old=dict(have), new=dict(want))  # fmt: skip

    def policy(self) -> None:
        want = self.entry.policy
        assert self.key is not None
        have = self.key.policy
        if want is None or have == want:
            return
        self.add(Action.UPDATE, "policy", f"update {self.entry.alias} policy: the document differs",
                 self.call("PutKeyPolicy", PolicyName="default", Policy=json.dumps(want, indent=2)),
                 old=have, new=want)  # fmt: skip

    def grants(self) -> None:
        want = self.entry.grants
        assert self.key is not None
        have = self.key.grants
        if want is None or have is None:
            return
        by_name: dict[str, list[CurrentGrant]] = {}
        for g in have:
            if g.name:  # an unnamed grant was not made from a file: left alone
                by_name.setdefault(g.name, []).append(g)
        alias = self.entry.alias
        for spec in want:
            existing = by_name.pop(spec.name, [])
            keep = next((g for g in existing if _same_grant(spec, g)), None)
            revoke = [self.call("RevokeGrant", GrantId=g.grant_id) for g in existing if g is not keep]
            if keep is not None and not revoke:
                continue
            if keep is not None:
                self.add(Action.DELETE, f"grant:{spec.name}", f"revoke duplicate grant {spec.name} on {alias}", *revoke)
                continue
            if not self.enabled_now:
                self.problems.append(
                    f"{self.entry.where('grants')}: KMS creates grants only on an enabled key, and this key "
                    f"stays disabled; set enabled: true to create grant {spec.name}"
                )
                continue
            create = self.call("CreateGrant", **_grant_params(spec))
            if existing:
                self.add(Action.UPDATE, f"grant:{spec.name}", f"replace grant {spec.name} on {alias} (revoke + create)",
                         *revoke, create, old=_grant_json_current(existing[0]), new=_grant_json(spec))  # fmt: skip
            else:
                self.add(Action.CREATE, f"grant:{spec.name}", f"create grant {spec.name} on {alias}", create,
                         new=_grant_json(spec))  # fmt: skip
        for name, extra in sorted(by_name.items()):
            self.add(Action.DELETE, f"grant:{name}", f"revoke grant {name} on {alias}",
                     *(self.call("RevokeGrant", GrantId=g.grant_id) for g in extra),
                     old=_grant_json_current(extra[0]))  # fmt: skip

    def aliases(self) -> None:
        want = self.entry.extra_aliases
        assert self.key is not None
        if want is None:
            return
        alias = self.entry.alias
        for name in want:
            target = self.alias_targets.get(name)
            params = MappingProxyType({"AliasName": name, "TargetKeyId": THIS_KEY})
            if target is None:
                self.add(Action.CREATE, f"alias:{name}", f"create alias {name} → {alias}",
                         Call("CreateAlias", params), new=alias)  # fmt: skip
            elif target != self.key_id:
                self.add(Action.UPDATE, f"alias:{name}", f"update alias {name} → {alias} (was key {target})",
                         Call("UpdateAlias", params), old=target, new=alias)  # fmt: skip
        for name in self.key.aliases:
            if name != alias and name not in want:
                self.add(Action.DELETE, f"alias:{name}", f"delete alias {name} (of {alias})",
                         Call("DeleteAlias", MappingProxyType({"AliasName": name})), old=alias)  # fmt: skip


def _same_grant(spec: GrantSpec, grant: CurrentGrant) -> bool:
    return (
        spec.grantee == grant.grantee
        and spec.operations == grant.operations
        and spec.retiring_principal == grant.retiring_principal
        and dict(spec.context_equals or {}) == dict(grant.context_equals or {})
        and dict(spec.context_subset or {}) == dict(grant.context_subset or {})
    )


def _grant_params(spec: GrantSpec) -> dict[str, Any]:
    params: dict[str, Any] = {
        "GranteePrincipal": spec.grantee,
        "Operations": list(spec.operations),
        "Name": spec.name,
    }
    if spec.retiring_principal is not None:
        params["RetiringPrincipal"] = spec.retiring_principal
    constraints: dict[str, Any] = {}
    if spec.context_equals:
        constraints["EncryptionContextEquals"] = dict(spec.context_equals)
    if spec.context_subset:
        constraints["EncryptionContextSubset"] = dict(spec.context_subset)
    if constraints:
        params["Constraints"] = constraints
    return params


def _grant_json(spec: GrantSpec) -> dict[str, Any]:
    return {
        "grantee": spec.grantee,
        "operations": list(spec.operations),
        "retiring_principal": spec.retiring_principal,
        "encryption_context_equals": dict(spec.context_equals) if spec.context_equals else None,
        "encryption_context_subset": dict(spec.context_subset) if spec.context_subset else None,
    }


def _grant_json_current(grant: CurrentGrant) -> dict[str, Any]:
    return {
        "grant_id": grant.grant_id,
        "grantee": grant.grantee,
        "operations": list(grant.operations),
        "retiring_principal": grant.retiring_principal,
        "encryption_context_equals": dict(grant.context_equals) if grant.context_equals else None,
        "encryption_context_subset": dict(grant.context_subset) if grant.context_subset else None,
    }
