"""Any document gives a plan or a clear error (exit 1, "error: file:line: ..."), never a traceback."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsmkeys.keystore import KeyStore
from hsmkeys.provision.command import main
from hsmkeys.provision.schema import ProvisionError, parse_text

FIELDS = [
    "alias", "state", "description", "key_spec", "key_usage", "origin", "rotation", "tags", "policy",
    "policy_file", "grants", "extra_aliases", "enabled", "key_material_file", "pending_window_days",
    "enabled ", "colour",
]  # fmt: skip
WORDS = [
    "alias/a", "alias/b", "alias/aws/x", "alias/", "a", "present", "absent", "SYMMETRIC_DEFAULT",
    "HMAC_256", "RSA_2048", "ECC_NIST_P256", "ENCRYPT_DECRYPT", "SIGN_VERIFY", "EXTERNAL", "AWS_KMS",
    "Encrypt", "Decrypt", "2012-10-17", "hsmkeys:provision-alias",
]  # fmt: skip

scalars = st.one_of(
    st.sampled_from(WORDS),
    st.text(max_size=8),
    st.integers(min_value=-5, max_value=3000),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(WORDS + FIELDS), st.integers()), inner, max_size=3),
    ),
    max_leaves=10,
)
rotations = st.fixed_dictionaries(
    {}, optional={"enabled": st.one_of(st.booleans(), scalars), "period_days": st.one_of(st.integers(0, 3000), scalars)}
)
grants = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.sampled_from(["g", "h", "bad name"]),
            "grantee": st.sampled_from(["arn:aws:iam::111122223333:role/r", ""]),
            "operations": st.lists(st.sampled_from(["Encrypt", "Decrypt", "Shred"]), max_size=3),
            "constraints": st.one_of(values, st.fixed_dictionaries({"encryption_context_equals": values})),
        },
    ),
    max_size=2,
)
special = {"rotation": st.one_of(rotations, values), "grants": st.one_of(grants, values)}
entries = st.dictionaries(
    st.sampled_from(FIELDS), st.one_of(scalars, values), max_size=6
).flatmap(
    lambda d: st.fixed_dictionaries(
        {k: special.get(k, st.just(v)) for k, v in d.items()},
        optional={} if "alias" in d else {"alias": st.sampled_from(WORDS)},
    )
)
# Mostly well-formed entries, so that many documents get as far as a plan.
plausible = st.fixed_dictionaries(
    {"alias": st.sampled_from(["alias/a", "alias/b", "alias/c"])},
    optional={
        "state": st.sampled_from(["present", "absent"]),
        "description": st.text(max_size=10),
        "key_spec": st.sampled_from(["SYMMETRIC_DEFAULT", "HMAC_256", "ECC_NIST_P256", "RSA_2048"]),
        "key_usage": st.sampled_from(["ENCRYPT_DECRYPT", "SIGN_VERIFY", "GENERATE_VERIFY_MAC"]),
        "rotation": rotations,
        "tags": st.dictionaries(st.sampled_from(["team", "env", ""]), st.text(max_size=5), max_size=2),
        "enabled": st.booleans(),
        "extra_aliases": st.lists(st.sampled_from(["alias/x", "alias/y", "alias/a"]), max_size=2, unique=True),
        "grants": grants,
        "pending_window_days": st.integers(5, 31),
    },
)
documents = st.one_of(
    st.fixed_dictionaries({"keys": st.lists(st.one_of(plausible, entries), max_size=4)}),
    st.fixed_dictionaries({"keys": st.lists(plausible, max_size=3)}),
    values,
)

PROBLEM = re.compile(r"^error: (keys\.yaml:(\d+:)? |[A-Za-z]+Exception: )")


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents)
def test_random_documents_plan_or_fail_with_a_located_message(
    document: Any, store: KeyStore, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("keys.yaml").write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    capsys.readouterr()
    code = main(["plan", "keys.yaml"], open_store=lambda: contextlib.nullcontext(store))
    out, err = capsys.readouterr()
    assert code in (0, 1, 2)
    errors = [line for line in err.splitlines() if not line.startswith("provision: ")]
    if code == 1:
        assert errors and all(PROBLEM.match(line) for line in errors), err
        assert out == ""
    else:
        assert errors == [], err
        last = out.splitlines()[-1]
        assert last == "no changes" if code == 0 else last.startswith("Plan: ")


@given(text=st.text(max_size=200))
def test_random_text_is_valid_or_a_located_problem(text: str) -> None:
    try:
        parse_text(text, name="keys.yaml", base_dir=Path("/nonexistent"))
    except ProvisionError as exc:
        assert exc.problems and all(p.startswith("keys.yaml:") for p in exc.problems)
