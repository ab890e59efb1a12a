"""plan/apply on the in-memory store through LocalKms: output, exit codes, idempotence, drift."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from hsmkeys.errors import KMSError, NotFoundException
from hsmkeys.kmsclient import LocalKms
from hsmkeys.provision import (
    PROVISION_TAG,
    ProvisionError,
    apply_plan,
    build_plan,
    load_file,
    read_state,
)

from .conftest import RunProvision

PAYMENTS = """\
keys:
  - alias: alias/payments
    description: Payments master key
    rotation: {enabled: true, period_days: 180}
    tags: {team: payments}
    policy:
      Version: "2012-10-17"
      Statement:
        - {Sid: root, Effect: Allow, Principal: {AWS: "arn:aws:iam::111122223333:root"}, Action: "kms:*", Resource: "*"}
    grants:
      - name: checkout
        grantee: arn:aws:iam::111122223333:role/checkout
        operations: [Encrypt, Decrypt]
        constraints: {encryption_context_equals: {service: checkout}}
    extra_aliases: [alias/pay]
  - alias: alias/mac
    key_spec: HMAC_256
    enabled: false
"""


def key_id(kms: LocalKms, alias: str) -> str:
    return str(kms.call("DescribeKey", {"KeyId": alias})["KeyMetadata"]["KeyId"])


def tags_of(kms: LocalKms, alias: str) -> dict[str, str]:
    tags = kms.call("ListResourceTags", {"KeyId": key_id(kms, alias) if alias.startswith("alias/") else alias})["Tags"]
    return {t["TagKey"]: t["TagValue"] for t in tags}


def grants_of(kms: LocalKms, alias: str) -> list[dict[str, Any]]:
    return list(kms.call("ListGrants", {"KeyId": key_id(kms, alias)})["Grants"])


def all_key_ids(kms: LocalKms) -> list[str]:
    return [k["KeyId"] for k in kms.call("ListKeys", {"Limit": 1000})["Keys"]]


def test_plan_of_new_keys_prints_each_change_and_exits_2(provision: RunProvision, kms: LocalKms) -> None:
    ran = provision("plan", PAYMENTS)
    assert ran.code == 2
    assert ran.out.splitlines() == [
        "+ create alias/payments (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT)",
        "~ update alias/payments rotation: disabled → enabled (180 days)",
        "+ create grant checkout on alias/payments",
        "+ create alias alias/pay → alias/payments",
        "+ create alias/mac (HMAC_256, GENERATE_VERIFY_MAC)",
        "~ update alias/mac enabled: true → false",
        "Plan: 4 to create, 2 to update, 0 to delete.",
    ]
    assert "provision: reading aliases" in ran.err  # progress goes to stderr
    assert all_key_ids(kms) == []  # plan changes nothing


def test_plan_json_lists_the_changes(provision: RunProvision) -> None:
    ran = provision("plan", PAYMENTS, "--json")
    assert ran.code == 2
    plan = json.loads(ran.out)
    assert plan["pending"] is True
    assert plan["counts"] == {"create": 4, "update": 2, "delete": 0}
    first = plan["changes"][0]
    assert (first["action"], first["alias"], first["field"], first["key_id"]) == (
        "create",
        "alias/payments",
        "key",
        None,
    )
    assert first["new"] == {"key_spec": "SYMMETRIC_DEFAULT", "key_usage": "ENCRYPT_DECRYPT", "origin": "AWS_KMS"}


def test_apply_creates_everything_and_a_second_apply_changes_nothing(
    provision: RunProvision, kms: LocalKms
) -> None:
    ran = provision("apply", PAYMENTS, "--yes")
    assert ran.code == 0, ran.err
    assert ran.out.splitlines()[-1] == "Applied: 4 created, 2 updated, 0 deleted."

    md = kms.call("DescribeKey", {"KeyId": "alias/payments"})["KeyMetadata"]
    assert md["Description"] == "Payments master key"
    assert tags_of(kms, "alias/payments") == {"team": "payments", PROVISION_TAG: "alias/payments"}
    rotation = kms.call("GetKeyRotationStatus", {"KeyId": md["KeyId"]})
    assert (rotation["KeyRotationEnabled"], rotation["RotationPeriodInDays"]) == (True, 180)
    assert key_id(kms, "alias/pay") == md["KeyId"]
    policy = json.loads(kms.call("GetKeyPolicy", {"KeyId": md["KeyId"], "PolicyName": "default"})["Policy"])
    assert policy["Statement"][0]["Sid"] == "root"
    (grant,) = grants_of(kms, "alias/payments")
    assert grant["Name"] == "checkout" and sorted(grant["Operations"]) == ["Decrypt", "Encrypt"]
    assert grant["Constraints"] == {"EncryptionContextEquals": {"service": "checkout"}}
    mac = kms.call("DescribeKey", {"KeyId": "alias/mac"})["KeyMetadata"]
    assert (mac["KeySpec"], mac["KeyState"]) == ("HMAC_256", "Disabled")

    again = provision("apply", PAYMENTS, "--yes")
    assert (again.code, again.out) == (0, "no changes\n")
    plan = provision("plan", PAYMENTS)
    assert (plan.code, plan.out) == (0, "no changes\n")
    assert len(all_key_ids(kms)) == 2


def _set_description(kms: LocalKms, k: str) -> None:
    kms.call("UpdateKeyDescription", {"KeyId": k, "Description": "changed by hand"})


def _add_tag(kms: LocalKms, k: str) -> None:
    kms.call("TagResource", {"KeyId": k, "Tags": [{"TagKey": "owner", "TagValue": "someone"}]})


def _change_tag(kms: LocalKms, k: str) -> None:
    kms.call("TagResource", {"KeyId": k, "Tags": [{"TagKey": "team", "TagValue": "fraud"}]})


def _disable_rotation(kms: LocalKms, k: str) -> None:
    kms.call("DisableKeyRotation", {"KeyId": k})


def _change_rotation_period(kms: LocalKms, k: str) -> None:
    kms.call("EnableKeyRotation", {"KeyId": k, "RotationPeriodInDays": 365})


def _disable_key(kms: LocalKms, k: str) -> None:
    kms.call("DisableKey", {"KeyId": k})


def _delete_extra_alias(kms: LocalKms, k: str) -> None:
    kms.call("DeleteAlias", {"AliasName": "alias/pay"})


def _move_extra_alias(kms: LocalKms, k: str) -> None:
    other = kms.call("CreateKey", {})["KeyMetadata"]["KeyId"]
    kms.call("UpdateAlias", {"AliasName": "alias/pay", "TargetKeyId": other})


def _add_alias(kms: LocalKms, k: str) -> None:
    kms.call("CreateAlias", {"AliasName": "alias/stray", "TargetKeyId": k})


def _change_policy(kms: LocalKms, k: str) -> None:
    policy = {"Version": "2012-10-17", "Statement": [{"Sid": "other", "Effect": "Allow",
              "Principal": {"AWS": "arn:aws:iam::111122223333:root"}, "Action": "kms:*", "Resource": "*"}]}  # fmt: skip
    kms.call("PutKeyPolicy", {"KeyId": k, "PolicyName": "default", "Policy": json.dumps(policy)})


def _revoke_grant(kms: LocalKms, k: str) -> None:
    (grant,) = kms.call("ListGrants", {"KeyId": k})["Grants"]
    kms.call("RevokeGrant", {"KeyId": k, "GrantId": grant["GrantId"]})


def _change_grant(kms: LocalKms, k: str) -> None:
    _revoke_grant(kms, k)
    kms.call("CreateGrant", {"KeyId": k, "Name": "checkout", "Operations": ["Encrypt"],
                             "GranteePrincipal": "arn:aws:iam::111122223333:role/checkout"})  # fmt: skip


def _add_named_grant(kms: LocalKms, k: str) -> None:
    kms.call("CreateGrant", {"KeyId": k, "Name": "stray", "Operations": ["Decrypt"],
                             "GranteePrincipal": "arn:aws:iam::111122223333:role/stray"})  # fmt: skip


def _schedule_deletion(kms: LocalKms, k: str) -> None:
    kms.call("ScheduleKeyDeletion", {"KeyId": k, "PendingWindowInDays": 7})


DRIFTS: list[tuple[Callable[[LocalKms, str], None], list[str]]] = [
    (_set_description, ["~ update alias/payments description: 'changed by hand' → 'Payments master key'"]),
    (_add_tag, ['~ update alias/payments tags: {"owner": "someone", "team": "payments"} → {"team": "payments"}']),
    (_change_tag, ['~ update alias/payments tags: {"team": "fraud"} → {"team": "payments"}']),
    (_disable_rotation, ["~ update alias/payments rotation: disabled → enabled (180 days)"]),
    (_change_rotation_period, ["~ update alias/payments rotation: enabled (365 days) → enabled (180 days)"]),
    (_disable_key, ["~ update alias/payments enabled: false → true"]),
    (_delete_extra_alias, ["+ create alias alias/pay → alias/payments"]),
    (_move_extra_alias, ["~ update alias alias/pay → alias/payments (was key "]),
    (_add_alias, ["- delete alias alias/stray (of alias/payments)"]),
    (_change_policy, ["~ update alias/payments policy: the document differs"]),
    (_revoke_grant, ["+ create grant checkout on alias/payments"]),
    (_change_grant, ["~ replace grant checkout on alias/payments (revoke + create)"]),
    (_add_named_grant, ["- revoke grant stray on alias/payments"]),
    (
        _schedule_deletion,
        [
            "~ cancel deletion alias/payments",
            "~ update alias/payments enabled: false → true",
            "~ update alias/payments rotation: unknown → enabled (180 days)",
        ],
    ),
]


@pytest.mark.parametrize(("drift", "expected"), DRIFTS, ids=[d.__name__.strip("_") for d, _ in DRIFTS])
def test_drift_made_outside_the_file_is_planned_and_undone(
    provision: RunProvision, kms: LocalKms, drift: Callable[[LocalKms, str], None], expected: list[str]
) -> None:
    assert provision("apply", PAYMENTS, "--yes").code == 0
    before = _snapshot(kms)
    drift(kms, key_id(kms, "alias/payments"))

    plan = provision("plan", PAYMENTS)
    lines = plan.out.splitlines()[:-1]
    assert plan.code == 2, plan.err
    assert len(lines) == len(expected) and all(
        line.startswith(want) for line, want in zip(lines, expected, strict=True)
    ), lines

    assert provision("apply", PAYMENTS, "--yes").code == 0
    assert provision("plan", PAYMENTS).out == "no changes\n"
    assert _snapshot(kms) == before


def _snapshot(kms: LocalKms) -> dict[str, Any]:
    """What the file manages for alias/payments (grant ids change when a grant is re-created)."""
    k = key_id(kms, "alias/payments")
    md = kms.call("DescribeKey", {"KeyId": k})["KeyMetadata"]
    rotation = kms.call("GetKeyRotationStatus", {"KeyId": k})
    aliases = kms.call("ListAliases", {"KeyId": k})["Aliases"]
    return {
        "key": k,
        "state": md["KeyState"],
        "description": md["Description"],
        "tags": tags_of(kms, k),
        "rotation": (rotation["KeyRotationEnabled"], rotation.get("RotationPeriodInDays")),
        "aliases": sorted(a["AliasName"] for a in aliases),
        "policy": json.loads(kms.call("GetKeyPolicy", {"KeyId": k, "PolicyName": "default"})["Policy"]),
        "grants": sorted(
            (g["Name"], g["GranteePrincipal"], tuple(sorted(g["Operations"])), json.dumps(g.get("Constraints")))
            for g in grants_of(kms, k)
        ),
    }


def test_unnamed_grants_and_keys_missing_from_the_file_are_left_alone(
    provision: RunProvision, kms: LocalKms
) -> None:
    assert provision("apply", PAYMENTS, "--yes").code == 0
    k = key_id(kms, "alias/payments")
    kms.call("CreateGrant", {"KeyId": k, "Operations": ["Decrypt"], "GranteePrincipal": "arn:aws:iam::111122223333:role/x"})
    other = kms.call("CreateKey", {"Description": "not in the file"})["KeyMetadata"]["KeyId"]
    kms.call("CreateAlias", {"AliasName": "alias/unmanaged", "TargetKeyId": other})
    ran = provision("plan", PAYMENTS)
    assert (ran.code, ran.out) == (0, "no changes\n")


def test_a_different_key_spec_is_an_error_never_a_replacement(provision: RunProvision, kms: LocalKms) -> None:
    existing = kms.call("CreateKey", {"KeySpec": "HMAC_256", "KeyUsage": "GENERATE_VERIFY_MAC"})
    kms.call("CreateAlias", {"AliasName": "alias/payments", "TargetKeyId": existing["KeyMetadata"]["KeyId"]})
    ran = provision("apply", PAYMENTS, "--yes")
    assert ran.code == 1
    assert ran.out == ""
    spec, usage = ran.errors
    assert spec.startswith("error: ") and "/keys.yaml:2: alias/payments: key_spec: the existing key " in spec
    assert "has HMAC_256, the file says SYMMETRIC_DEFAULT; provision never replaces a key" in spec
    assert "alias/payments: key_usage: the existing key " in usage
    assert len(all_key_ids(kms)) == 1  # nothing was created, not even alias/mac


def test_absent_key_is_scheduled_for_deletion_once(provision: RunProvision, kms: LocalKms) -> None:
    k = kms.call("CreateKey", {})["KeyMetadata"]["KeyId"]
    kms.call("CreateAlias", {"AliasName": "alias/old-signing", "TargetKeyId": k})
    text = "keys:\n  - alias: alias/old-signing\n    state: absent\n    pending_window_days: 7\n  - alias: alias/gone\n    state: absent\n"
    plan = provision("plan", text)
    assert (plan.code, plan.out.splitlines()) == (
        2,
        ["- schedule deletion alias/old-signing (7 days)", "Plan: 0 to create, 0 to update, 1 to delete."],
    )
    assert provision("apply", text, "--yes").code == 0
    md = kms.call("DescribeKey", {"KeyId": k})["KeyMetadata"]
    assert md["KeyState"] == "PendingDeletion" and "PendingDeletionWindowInDays" not in md  # multi-Region only
    assert md["DeletionDate"] - md["CreationDate"] >= timedelta(days=7)  # the store's clock is fake
    assert provision("plan", text).out == "no changes\n"


class FailOnce:
    """A KmsApi that fails the first call of one operation, as a crash or network fault would."""

    def __init__(self, inner: LocalKms, operation: str) -> None:
        self.inner = inner
        self.operation = operation
        self.failed = False

    def call(self, operation: str, params: Any) -> dict[str, Any]:
        if operation == self.operation and not self.failed:
            self.failed = True
            raise KMSError("injected failure")
        return self.inner.call(operation, params)


@pytest.mark.parametrize("operation", ["CreateAlias", "EnableKeyRotation", "CreateGrant", "DisableKey"])
def test_apply_that_failed_midway_is_finished_by_a_rerun_without_a_second_key(
    provision: RunProvision, kms: LocalKms, write_file: Callable[[str, str], Path], operation: str
) -> None:
    desired = load_file(write_file("keys.yaml", PAYMENTS))
    failing = FailOnce(kms, operation)
    with pytest.raises(ProvisionError, match=r"injected failure \(\d of 6 change\(s\) were made before it"):
        apply_plan(failing, build_plan(desired, read_state(failing, desired)))
    assert failing.failed

    plan = provision("plan", PAYMENTS)
    assert plan.code == 2
    if operation == "CreateAlias":  # the key exists without its alias: found by its tag
        assert plan.out.startswith("+ create alias alias/payments → key ")
        assert "(created by an interrupted run)" in plan.out.splitlines()[0]
    assert provision("apply", PAYMENTS, "--yes").code == 0
    assert provision("plan", PAYMENTS).out == "no changes\n"
    assert len(all_key_ids(kms)) == 2


def test_two_orphans_for_one_alias_are_an_error(provision: RunProvision, kms: LocalKms) -> None:
    tag = [{"TagKey": PROVISION_TAG, "TagValue": "alias/mac"}]
    for _ in range(2):
        kms.call("CreateKey", {"KeySpec": "HMAC_256", "KeyUsage": "GENERATE_VERIFY_MAC", "Tags": tag})
    ran = provision("plan", "keys:\n  - alias: alias/mac\n    key_spec: HMAC_256\n")
    assert ran.code == 1
    assert "alias/mac: keys " in ran.err and "are all tagged hsmkeys:provision-alias=alias/mac" in ran.err


def test_rotation_change_on_a_key_that_stays_disabled_is_an_error(provision: RunProvision, kms: LocalKms) -> None:
    k = kms.call("CreateKey", {})["KeyMetadata"]["KeyId"]
    kms.call("CreateAlias", {"AliasName": "alias/cold", "TargetKeyId": k})
    kms.call("DisableKey", {"KeyId": k})
    ran = provision("plan", "keys:\n  - alias: alias/cold\n    enabled: false\n    rotation: {enabled: true}\n")
    assert ran.code == 1
    assert "keys.yaml:4: alias/cold: rotation: KMS changes rotation only on an enabled key" in ran.err


def test_a_grant_to_create_on_a_key_that_stays_disabled_is_an_error(provision: RunProvision, kms: LocalKms) -> None:
    k = kms.call("CreateKey", {})["KeyMetadata"]["KeyId"]
    kms.call("CreateAlias", {"AliasName": "alias/cold", "TargetKeyId": k})
    kms.call("DisableKey", {"KeyId": k})
    grant = "    grants:\n      - {name: app, grantee: 'arn:aws:iam::111122223333:role/app', operations: [Decrypt]}\n"
    ran = provision("plan", "keys:\n  - alias: alias/cold\n    enabled: false\n" + grant)
    assert ran.code == 1
    assert "keys.yaml:5: alias/cold: grants: KMS creates grants only on an enabled key" in ran.err
    # enabling it in the same file: the grant is made while it is enabled
    assert provision("apply", "keys:\n  - alias: alias/cold\n" + grant, "--yes").code == 0
    assert [g["Name"] for g in grants_of(kms, "alias/cold")] == ["app"]


def test_two_entries_on_one_key_are_an_error(provision: RunProvision, kms: LocalKms) -> None:
    k = kms.call("CreateKey", {})["KeyMetadata"]["KeyId"]
    for name in ("alias/a", "alias/b"):
        kms.call("CreateAlias", {"AliasName": name, "TargetKeyId": k})
    ran = provision("plan", "keys:\n  - alias: alias/a\n  - alias: alias/b\n")
    assert ran.code == 1
    assert f"keys.yaml:3: alias/b: alias: resolves to key {k}, which alias/a also manages" in ran.err


def test_apply_without_yes_on_a_pipe_refuses_and_changes_nothing(provision: RunProvision, kms: LocalKms) -> None:
    ran = provision("apply", PAYMENTS)
    assert ran.code == 1
    assert "pass --yes" in ran.errors[0]
    assert all_key_ids(kms) == []


def test_apply_on_a_terminal_asks_first(provision: RunProvision, kms: LocalKms) -> None:
    refused = provision("apply", PAYMENTS, stdin="n\n", tty=True)
    assert refused.code == 1 and "apply cancelled; nothing was changed" in refused.err
    assert "Apply these 6 change(s)? [y/N]" in refused.err
    assert all_key_ids(kms) == []
    accepted = provision("apply", PAYMENTS, stdin="yes\n", tty=True)
    assert accepted.code == 0
    assert len(all_key_ids(kms)) == 2


def test_kms_errors_while_reading_exit_1_with_the_code(
    provision: RunProvision, kms: LocalKms, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: LocalKms, operation: str, params: Any) -> dict[str, Any]:
        raise NotFoundException("gone")

    monkeypatch.setattr(LocalKms, "call", refuse)
    ran = provision("plan", PAYMENTS)
    assert (ran.code, ran.errors) == (1, ["error: NotFoundException: gone"])


def test_config_and_endpoint_together_are_refused(provision: RunProvision) -> None:
    ran = provision("plan", PAYMENTS, "--config", "x.yaml", "--endpoint", "http://127.0.0.1:1")
    assert (ran.code, ran.errors) == (1, ["error: give --config or --endpoint, not both"])
