"""Validating the provisioning file: every problem names file:line, the entry and the field."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import botocore.session
import pytest

from hsmkeys.provision.schema import (
    GRANT_OPERATIONS,
    KEY_SPECS,
    KEY_USAGES,
    ProvisionError,
    RotationSpec,
    State,
    load_file,
    parse_text,
)

from .conftest import RunProvision


def problems_of(text: str, base_dir: Path | None = None) -> tuple[str, ...]:
    with pytest.raises(ProvisionError) as info:
        parse_text(textwrap.dedent(text), name="keys.yaml", base_dir=base_dir or Path("/nonexistent"))
    return info.value.problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            """\
            keys:
              - alias: alias/a
                colour: blue
            """,
            "keys.yaml:3: alias/a: colour: unknown field",
        ),
        (
            """\
            keys:
              - description: no alias here
            """,
            "keys.yaml:2: keys[0]: alias: required",
        ),
        (
            """\
            keys:
              - alias: payments
            """,
            "keys.yaml:2: keys[0]: alias: must start with 'alias/'",
        ),
        (
            """\
            keys:
              - alias: alias/aws/s3
            """,
            "keys.yaml:2: keys[0]: alias: 'alias/aws/' is reserved",
        ),
        (
            """\
            keys:
              - alias: alias/a
                rotation:
                  enabled: true
                  period_days: 30
            """,
            "keys.yaml:5: alias/a: rotation.period_days: must be an integer from 90 to 2560, got integer 30",
        ),
        (
            """\
            keys:
              - alias: alias/a
                rotation: {period_days: 100}
            """,
            "keys.yaml:3: alias/a: rotation.enabled: required",
        ),
        (
            """\
            keys:
              - alias: alias/a
                key_spec: AES_256
            """,
            "keys.yaml:3: alias/a: key_spec: must be one of RSA_2048",
        ),
        (
            """\
            keys:
              - alias: alias/a
                key_spec: HMAC_256
                rotation: {enabled: true}
            """,
            "keys.yaml:4: alias/a: rotation: automatic rotation is only for SYMMETRIC_DEFAULT",
        ),
        (
            """\
            keys:
              - alias: alias/a
                key_spec: RSA_2048
            """,
            "keys.yaml:3: alias/a: key_usage: required for RSA_2048",
        ),
        (
            """\
            keys:
              - alias: alias/a
                key_spec: ECC_NIST_P256
                key_usage: ENCRYPT_DECRYPT
            """,
            "keys.yaml:4: alias/a: key_usage: ENCRYPT_DECRYPT is not allowed for ECC_NIST_P256",
        ),
        (
            """\
            keys:
              - alias: alias/a
                tags:
                  team: payments
                  cost: 42
            """,
            "keys.yaml:5: alias/a: tags.cost: must be a string, got integer 42",
        ),
        (
            """\
            keys:
              - alias: alias/a
                tags: {"hsmkeys:provision-alias": x}
            """,
            "keys.yaml:3: alias/a: tags.hsmkeys:provision-alias: this tag key is reserved",
        ),
        (
            """\
            keys:
              - alias: alias/a
                description: one
                description: two
            """,
            "keys.yaml:4: alias/a: description: given twice (first on line 3)",
        ),
        (
            """\
            keys:
              - alias: alias/a
              - alias: alias/b
                extra_aliases: [alias/a]
            """,
            "keys.yaml:4: alias/b: extra_aliases: alias/a is already used by the entry on line 2",
        ),
        (
            """\
            keys:
              - alias: alias/a
                enabled: "yes"
            """,
            "keys.yaml:3: alias/a: enabled: must be true or false, got string 'yes'",
        ),
        (
            """\
            keys:
              - alias: alias/a
                policy_file: policies/missing.json
            """,
            "keys.yaml:3: alias/a: policy_file: cannot read /nonexistent/policies/missing.json",
        ),
        (
            """\
            keys:
              - alias: alias/a
                policy: {Version: "2012-10-17"}
            """,
            "keys.yaml:3: alias/a: policy: a key policy needs a Statement",
        ),
        (
            """\
            keys:
              - alias: alias/a
                grants:
                  - name: checkout
                    operations: [Encrypt, Shred]
            """,
            "keys.yaml:4: alias/a: grants[0].grantee: required",
        ),
        (
            """\
            keys:
              - alias: alias/a
                grants:
                  - name: checkout
                    grantee: arn:aws:iam::111122223333:role/checkout
                    operations: [Encrypt, Shred]
            """,
            "keys.yaml:6: alias/a: grants[0].operations[1]: must be one of Decrypt",
        ),
        (
            """\
            keys:
              - alias: alias/signer
                key_spec: ECC_NIST_P256
                key_usage: SIGN_VERIFY
                grants:
                  - {name: g, grantee: r, operations: [Sign, Encrypt, GenerateDataKey]}
            """,
            "keys.yaml:6: alias/signer: grants (g): Encrypt, GenerateDataKey not supported by a key with key_spec ECC_NIST_P256 "
            "and key_usage SIGN_VERIFY",
        ),
        (
            """\
            keys:
              - alias: alias/a
                grants:
                  - {name: g, grantee: r, operations: [Encrypt]}
                  - {name: g, grantee: r, operations: [Decrypt]}
            """,
            "keys.yaml:5: alias/a: grants[1].name: 'g' is already used on line 4",
        ),
        (
            """\
            keys:
              - alias: alias/old
                state: absent
                description: going away
            """,
            "keys.yaml:4: alias/old: description: not allowed with state: absent",
        ),
        (
            """\
            keys:
              - alias: alias/old
                state: absent
                pending_window_days: 3
            """,
            "keys.yaml:4: alias/old: pending_window_days: must be an integer from 7 to 30, got integer 3",
        ),
        (
            """\
            keys:
              - alias: alias/a
                pending_window_days: 7
            """,
            "keys.yaml:3: alias/a: pending_window_days: only allowed with state: absent",
        ),
        (
            """\
            keys:
              - alias: alias/a
                origin: EXTERNAL
            """,
            "keys.yaml:3: alias/a: key_material_file: required with origin: EXTERNAL",
        ),
        (
            """\
            keys:
              - alias: alias/a
                key_material_file: secret.key
            """,
            "keys.yaml:3: alias/a: key_material_file: only allowed with origin: EXTERNAL",
        ),
        (
            """\
            keys:
              - alias: alias/a
                  description: bad indent
            """,
            "keys.yaml:3: not valid YAML",
        ),
        ("", "keys.yaml:1: the file is empty"),
        ("- alias: alias/a\n", "keys.yaml:1: file: : must be a mapping, got a list"),
        ("kees: []\n", "keys.yaml:1: file: kees: unknown field (allowed: keys)"),
        ("keys: {alias: alias/a}\n", "keys.yaml:1: file: keys: must be a list, got a mapping"),
    ],
)
def test_problem_names_line_entry_and_field(text: str, expected: str) -> None:
    found = problems_of(text)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_in_the_file_is_reported_together() -> None:
    found = problems_of(
        """\
        keys:
          - alias: alias/a
            enabled: maybe
          - alias: alias/b
            key_usage: SIGN
        """
    )
    assert [p.split(":")[1] for p in found] == ["3", "5"]
    assert "alias/a: enabled" in found[0] and "alias/b: key_usage" in found[1]


def test_invalid_file_exits_1_with_the_problems_and_touches_nothing(
    provision: RunProvision, store: object
) -> None:
    ran = provision("apply", "keys:\n  - alias: alias/a\n    colour: blue\n", "--yes")
    assert ran.code == 1
    assert ran.out == ""
    assert ran.errors == [f"error: {ran.err.split('error: ')[1].strip()}"]
    assert "keys.yaml:3: alias/a: colour: unknown field" in ran.err
    assert "provision: reading" not in ran.err  # no state was read


def test_missing_file_is_a_clear_error(provision: RunProvision, tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match=r"cannot read: No such file"):
        load_file(tmp_path / "absent.yaml")


def test_defaults_and_unmanaged_fields() -> None:
    desired = parse_text(
        "keys:\n  - alias: alias/a\n  - alias: alias/s\n    key_spec: ECC_NIST_P256\n",
        name="keys.yaml",
        base_dir=Path("."),
    )
    plain, ecc = desired.entries
    assert (plain.key_spec, plain.key_usage, plain.origin, plain.enabled) == (
        "SYMMETRIC_DEFAULT",
        "ENCRYPT_DECRYPT",
        "AWS_KMS",
        True,
    )
    assert plain.state is State.PRESENT
    assert (plain.description, plain.tags, plain.policy, plain.grants, plain.extra_aliases, plain.rotation) == (
        None,
        None,
        None,
        None,
        None,
        None,
    )
    assert ecc.key_usage == "SIGN_VERIFY"


def test_unquoted_policy_version_stays_a_string_and_policy_file_is_relative(
    write_file: Callable[[str, str], Path],
) -> None:
    write_file("policies/p.json", '{"Version": "2012-10-17", "Statement": []}')
    path = write_file(
        "keys.yaml",
        """\
        keys:
          - alias: alias/inline
            policy:
              Version: 2012-10-17
              Statement: [{Effect: Allow, Principal: {AWS: "*"}, Action: "kms:*", Resource: "*"}]
            rotation: {enabled: true, period_days: 180}
          - alias: alias/file
            policy_file: policies/p.json
        """,
    )
    inline, from_file = load_file(path).entries
    assert inline.policy is not None and inline.policy["Version"] == "2012-10-17"
    assert inline.rotation == RotationSpec(True, 180)
    assert from_file.policy == {"Version": "2012-10-17", "Statement": []}


def test_enumerations_match_the_botocore_model() -> None:
    model = botocore.session.get_session().get_service_model("kms")
    assert set(KEY_SPECS) == set(model.shape_for("KeySpec").metadata["enum"])
    assert set(KEY_USAGES) == set(model.shape_for("KeyUsageType").metadata["enum"])
    assert set(GRANT_OPERATIONS) == set(model.shape_for("GrantOperation").metadata["enum"])
