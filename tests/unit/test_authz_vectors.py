"""Every case of tests/vectors/authz/decisions.json run through decide()."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from hsmkeys.authz import (
    AuthzRequest,
    ConditionValue,
    GrantView,
    Principal,
    access_denied,
    compile_policy,
    decide,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "authz" / "decisions.json"
CASES: list[dict[str, Any]] = json.loads(VECTORS.read_text(encoding="utf-8"))["cases"]


def _context_value(raw: Any) -> ConditionValue:
    if isinstance(raw, list):
        return tuple(raw)
    if isinstance(raw, dict):
        return datetime.fromisoformat(raw["$time"])
    assert isinstance(raw, str | bool | int)
    return raw


def request_of(case: dict[str, Any]) -> AuthzRequest:
    identity = case["identity_policy"]
    principal = Principal(
        case["principal"],
        identity_policy=compile_policy(json.dumps(identity), kind="identity") if identity else None,
    )
    return AuthzRequest(
        principal=principal,
        action=case["action"],
        resource=case["resource"],
        key_account=case["key_account"],
        context={k: _context_value(v) for k, v in case["context"].items()},
        grant_operation=case["grant_operation"],
        encryption_context=case["encryption_context"],
    )


def test_vectors_cover_at_least_eighty_cases() -> None:
    assert len(CASES) >= 80


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_decision_vector(case: dict[str, Any]) -> None:
    request = request_of(case)
    key_policy = case["key_policy"]
    compiled = compile_policy(json.dumps(key_policy), kind="key") if key_policy else None
    grants = [
        GrantView(
            grant_id=g["grant_id"],
            grantee_principal=g["grantee_principal"],
            operations=tuple(g["operations"]),
            encryption_context_equals=g["encryption_context_equals"],
            encryption_context_subset=g["encryption_context_subset"],
        )
        for g in case["grants"]
    ]
    decision = decide(request, key_policy=compiled, grants=grants)
    expect = case["expect"]
    assert (decision.allowed, decision.by, decision.explicit_deny) == (
        expect["allowed"],
        expect["by"],
        expect["explicit_deny"],
    )
    if not decision.allowed:
        message = access_denied(request, decision).message
        assert request.principal.arn in message
        assert request.action in message
        assert request.resource in message
