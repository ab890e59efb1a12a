"""Hypothesis: compile_policy never raises anything but MalformedPolicyDocument, and the
compiled evaluator decides exactly as a slow reference interpreter walking the raw JSON."""

from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
import json
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hsmkeys.authz import AuthzRequest, GrantView, Principal, compile_policy, decide
from hsmkeys.errors import MalformedPolicyDocumentException

A, B = "111122223333", "444455556666"
KEY = f"arn:aws:kms:us-east-1:{A}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
OTHER_KEY = f"arn:aws:kms:us-east-1:{A}:key/0000abcd-12ab-34cd-56ef-000000000000"
ROOT_A, ROOT_B = f"arn:aws:iam::{A}:root", f"arn:aws:iam::{B}:root"
BOB, ALICE = f"arn:aws:iam::{A}:user/bob", f"arn:aws:iam::{A}:user/alice"
ROLE, SESSION = f"arn:aws:iam::{A}:role/app", f"arn:aws:sts::{A}:assumed-role/app/s1"
CAROL = f"arn:aws:iam::{B}:user/carol"
CALLERS = [ROOT_A, ROOT_B, BOB, ALICE, ROLE, SESSION, CAROL]

# ---- (1) any JSON value ------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=25,
)
ELEMENTS = ["Version", "Id", "Statement", "Sid", "Effect", "Principal", "NotPrincipal", "Action",
            "NotAction", "Resource", "NotResource", "Condition", "AWS", "StringEquals",
            "ForAnyValue:StringLike", "kms:EncryptionContext:x", "aws:SourceIp", "Null"]
LEAVES = ["2012-10-17", "Allow", "Deny", "*", "kms:*", "kms:Encrypt", A, ROOT_A, BOB, KEY, "true",
          "10.0.0.0/8", "2020-01-01", "${aws:username}", "${", "arn:aws:kms:*"]
policy_like = st.recursive(
    st.sampled_from(LEAVES) | st.none() | st.booleans() | st.integers(-2, 2) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(ELEMENTS), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values | policy_like, kind=st.sampled_from(["key", "identity"]))
def test_any_json_compiles_or_is_malformed(value: Any, kind: Any) -> None:
    try:
        text = json.dumps(value)
    except ValueError:  # NaN / infinities: hand the raw repr through instead
        text = repr(value)
    with contextlib.suppress(MalformedPolicyDocumentException):
        compile_policy(text, kind=kind)


@given(text=st.text(max_size=60))
def test_any_text_compiles_or_is_malformed(text: str) -> None:
    with contextlib.suppress(MalformedPolicyDocumentException):
        compile_policy(text, kind="key")


def test_deeply_nested_json_is_malformed_not_recursion_error() -> None:
    with contextlib.suppress(MalformedPolicyDocumentException):
        compile_policy("[" * 100_000 + "]" * 100_000, kind="key")


# ---- (2) reference interpreter ------------------------------------------------------

def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _role_of(arn: str) -> str | None:
    if ":assumed-role/" not in arn:
        return None
    account = arn.split(":")[4]
    return f"arn:aws:iam::{account}:role/" + arn.split(":assumed-role/")[1].split("/")[0]


def _account_of(arn: str) -> str:
    return arn.split(":")[4]


def _lookup(context: dict[str, Any], principal: str, key: str) -> tuple[bool, Any]:
    for k, v in context.items():
        if k.lower() == key.lower():
            return True, v
    low = key.lower()
    if low == "aws:principalarn":
        return True, _role_of(principal) or principal
    if low in ("kms:calleraccount", "aws:principalaccount"):
        return True, _account_of(principal)
    if low == "aws:username" and ":user/" in principal:
        return True, principal.rsplit("/", 1)[1]
    return False, None


def _epoch(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _positive_match(base: str, request_value: Any, policy_value: Any) -> bool:
    r, p = _text(request_value), _text(policy_value)
    if base == "stringequals":
        return r == p
    if base == "stringequalsignorecase":
        return r.lower() == p.lower()
    if base == "stringlike":
        return fnmatch.fnmatchcase(r, p)
    if base.startswith("numeric"):
        try:
            a, b = float(request_value), float(p)
        except (TypeError, ValueError):
            return False
        return {"equals": a == b, "lessthan": a < b, "lessthanequals": a <= b,
                "greaterthan": a > b, "greaterthanequals": a >= b}[base[7:]]
    if base.startswith("date"):
        a2, b2 = _epoch(request_value), _epoch(p)
        if a2 is None or b2 is None:
            return False
        return {"equals": a2 == b2, "lessthan": a2 < b2, "lessthanequals": a2 <= b2,
                "greaterthan": a2 > b2, "greaterthanequals": a2 >= b2}[base[4:]]
    if base in ("arnequals", "arnlike"):
        rs, ps = r.split(":", 5), p.split(":", 5)
        return len(rs) == 6 and len(ps) == 6 and all(fnmatch.fnmatchcase(x, y) for x, y in zip(rs, ps, strict=True))
    if base == "ipaddress":
        try:
            return ipaddress.ip_address(r) in ipaddress.ip_network(p, strict=False)
        except (ValueError, TypeError):
            return False
    if base == "bool":
        return r.lower() == p.lower()
    raise AssertionError(base)


NEGATIONS = {"stringnotequals": "stringequals", "stringnotequalsignorecase": "stringequalsignorecase",
             "stringnotlike": "stringlike", "numericnotequals": "numericequals", "datenotequals": "dateequals",
             "arnnotequals": "arnequals", "arnnotlike": "arnlike", "notipaddress": "ipaddress"}


def _condition_holds(op: str, key: str, values: Any, context: dict[str, Any], principal: str) -> bool:
    name = op.lower()
    qualifier = None
    if ":" in name:
        qualifier, name = name.split(":", 1)
    if_exists = name.endswith("ifexists")
    if if_exists:
        name = name[: -len("ifexists")]
    present, raw = _lookup(context, principal, key)
    if present and raw == ():
        present = False
    if name == "null":
        return any(_text(v).lower() == ("false" if present else "true") for v in _as_list(values))
    negated = name in NEGATIONS
    base = NEGATIONS.get(name, name)
    policy_values = _as_list(values)
    if not present:
        if qualifier == "forallvalues" or if_exists:
            return True
        if qualifier == "foranyvalue":
            return False
        return negated
    request_values = list(raw) if isinstance(raw, tuple) else [raw]

    def one(v: Any) -> bool:
        return any(_positive_match(base, v, p) for p in policy_values) != negated

    if qualifier == "forallvalues":
        return all(one(v) for v in request_values)
    if qualifier == "foranyvalue":
        return any(one(v) for v in request_values)
    hit = any(any(_positive_match(base, v, p) for p in policy_values) for v in request_values)
    return hit != negated


def _statements(policy: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(s.get("Sid") or f"#{i}", s) for i, s in enumerate(_as_list(policy["Statement"]))]


def _action_ok(s: dict[str, Any], action: str) -> bool:
    listed = s.get("Action", s.get("NotAction"))
    hit = any(fnmatch.fnmatchcase(action.lower(), p.lower()) for p in _as_list(listed))
    return hit if "Action" in s else not hit


def _resource_ok(s: dict[str, Any], resource: str) -> bool:
    listed = s.get("Resource", s.get("NotResource"))
    hit = any(p == "*" or fnmatch.fnmatchcase(resource, p) for p in _as_list(listed))
    return hit if "Resource" in s else not hit


def _conditions_ok(s: dict[str, Any], context: dict[str, Any], principal: str) -> bool:
    return all(_condition_holds(op, k, v, context, principal)
               for op, entries in s.get("Condition", {}).items() for k, v in entries.items())


def _principal_level(s: dict[str, Any], caller: str) -> int:
    """2 direct, 1 account, 0 none."""
    element = s.get("Principal", s.get("NotPrincipal"))
    names: list[str] = []
    names = ["*"] if element == "*" else list(_as_list(element.get("AWS", [])))
    names = [f"arn:aws:iam::{n}:root" if n.isdigit() else n for n in names]
    account = _account_of(caller)
    root = f"arn:aws:iam::{account}:root"
    role = _role_of(caller)
    if "NotPrincipal" in s:
        if "*" in names:
            return 0
        identities = [caller, root] + ([role] if role else [])
        return 0 if all(i in names for i in identities) else 2
    if "*" in names or caller in names or (role is not None and role in names):
        return 2
    if root in names:
        return 2 if caller == root else 1
    return 0


def reference_decide(principal: str, identity: dict[str, Any] | None, key_policy: dict[str, Any] | None,
                     grants: list[GrantView], action: str, resource: str, context: dict[str, Any],
                     grant_operation: str | None) -> tuple[bool, str, bool]:
    def applies(s: dict[str, Any]) -> bool:
        return _action_ok(s, action) and _resource_ok(s, resource) and _conditions_ok(s, context, principal)

    if key_policy is not None:
        for label, s in _statements(key_policy):
            if s["Effect"] == "Deny" and _principal_level(s, principal) and applies(s):
                return False, f"key-policy:{label}", True
    if identity is not None:
        for label, s in _statements(identity):
            if s["Effect"] == "Deny" and applies(s):
                return False, f"identity-policy:{label}", True
    is_root = principal.endswith(":root")
    if resource == "*":
        if is_root:
            return True, "account-root", False
        for label, s in _statements(identity or {"Statement": []}):
            if s["Effect"] == "Allow" and applies(s):
                return True, f"identity-policy:{label}", False
        return False, "implicit-deny", False
    levels = [(label, _principal_level(s, principal)) for label, s in _statements(key_policy or {"Statement": []})
              if s["Effect"] == "Allow" and applies(s)]
    direct = next((label for label, level in levels if level == 2), None)
    delegated = next((label for label, level in levels if level == 1), None)
    chosen = direct or delegated
    if chosen is not None:
        same_account = _account_of(principal) == A
        if (direct is not None and same_account) or is_root:
            return True, f"key-policy:{chosen}", False
        for label, s in _statements(identity or {"Statement": []}):
            if s["Effect"] == "Allow" and applies(s):
                return True, f"key-policy+identity-policy:{chosen}/{label}", False
    for g in grants:
        if grant_operation in g.operations and g.grantee_principal in (principal, _role_of(principal)):
            return True, f"grant:{g.grant_id}", False
    return False, "implicit-deny", False


# ---- generators of valid policies and requests ---------------------------------------

STRING_VALUES = ["IT", "it", "HR", "I*", "?T", "Dept", "Project", "h*"]
CONDITIONS: list[tuple[list[str], str, st.SearchStrategy[Any]]] = [
    (["StringEquals", "StringNotEquals", "StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase",
      "StringLike", "StringNotLike"], "kms:EncryptionContext:Dept", st.sampled_from(STRING_VALUES)),
    (["StringEquals", "StringNotEquals", "StringLike", "StringNotLike"], "kms:EncryptionContextKeys",
     st.sampled_from(STRING_VALUES)),
    (["NumericLessThan", "NumericEquals", "NumericNotEquals", "NumericGreaterThanEquals"],
     "kms:RotationPeriodInDays", st.sampled_from([90, 365, "400"])),
    (["Bool"], "aws:SecureTransport", st.sampled_from(["true", "false", True])),
    (["DateLessThan", "DateGreaterThan", "DateEquals"], "aws:CurrentTime",
     st.sampled_from(["2025-01-01T00:00:00Z", "2030-01-01", "1748779200"])),
    (["ArnLike", "ArnNotEquals", "ArnEquals", "ArnNotLike"], "aws:PrincipalArn",
     st.sampled_from([ROLE, BOB, "arn:aws:iam::*:user/*", f"arn:aws:*:*:{A}:*"])),
    (["IpAddress", "NotIpAddress"], "aws:SourceIp", st.sampled_from(["10.0.0.0/8", "192.0.2.1", "2001:db8::/32"])),
    (["StringEquals", "StringNotEquals"], "kms:CallerAccount", st.sampled_from([A, B])),
]


@st.composite
def conditions(draw: st.DrawFn) -> dict[str, dict[str, Any]]:
    block: dict[str, dict[str, Any]] = {}
    for _ in range(draw(st.integers(0, 3))):
        ops, key, values = draw(st.sampled_from(CONDITIONS))
        op = draw(st.sampled_from(ops))
        if op.startswith("String") and draw(st.booleans()):
            op = draw(st.sampled_from(["ForAnyValue:", "ForAllValues:"])) + op
        elif draw(st.integers(0, 3)) == 0:
            op += "IfExists"
        if draw(st.integers(0, 5)) == 0:
            op, key, values = "Null", draw(st.sampled_from([c[1] for c in CONDITIONS])), st.sampled_from(["true", "false"])
        vals = draw(st.lists(values, min_size=1, max_size=3))
        block.setdefault(op, {})[key if draw(st.booleans()) else key.upper()] = vals if len(vals) > 1 else vals[0]
    return block


ACTION_PATTERNS = ["kms:Encrypt", "kms:Decrypt", "kms:Get*", "kms:*", "*", "KMS:encrypt", "kms:ReEncrypt*",
                   "kms:PutKeyPolicy", "kms:Create*", "kms:?ecrypt"]
RESOURCE_PATTERNS = ["*", KEY, OTHER_KEY, f"arn:aws:kms:*:{A}:key/*", f"arn:aws:kms:us-east-1:{B}:key/*",
                     "arn:aws:kms:us-east-?:*:*"]
PRINCIPAL_NAMES = [ROOT_A, ROOT_B, A, B, BOB, ALICE, ROLE, SESSION, CAROL, "*"]


@st.composite
def statements(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    s: dict[str, Any] = {"Effect": draw(st.sampled_from(["Allow", "Allow", "Deny"]))}
    if kind == "key":
        if draw(st.integers(0, 5)) == 0:
            s["NotPrincipal"] = {"AWS": draw(st.lists(st.sampled_from(PRINCIPAL_NAMES[:-1]), min_size=1, max_size=3))}
        elif draw(st.integers(0, 4)) == 0:
            s["Principal"] = "*"
        else:
            s["Principal"] = {"AWS": draw(st.lists(st.sampled_from(PRINCIPAL_NAMES), min_size=1, max_size=3))}
    actions = draw(st.lists(st.sampled_from(ACTION_PATTERNS), min_size=1, max_size=3))
    s["NotAction" if draw(st.integers(0, 4)) == 0 else "Action"] = actions
    resources = draw(st.lists(st.sampled_from(RESOURCE_PATTERNS), min_size=1, max_size=2))
    s["NotResource" if draw(st.integers(0, 5)) == 0 else "Resource"] = resources
    block = draw(conditions())
    if block:
        s["Condition"] = block
    return s


@st.composite
def policies(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    body = draw(st.lists(statements(kind), min_size=1, max_size=5))
    for i, s in enumerate(body):
        if draw(st.booleans()):
            s["Sid"] = f"S{i}"
    return {"Version": "2012-10-17", "Statement": body}


@st.composite
def contexts(draw: st.DrawFn) -> dict[str, Any]:
    ctx: dict[str, Any] = {}
    if draw(st.booleans()):
        ctx[draw(st.sampled_from(["kms:EncryptionContext:Dept", "kms:encryptioncontext:dept"]))] = draw(st.sampled_from(STRING_VALUES))
    if draw(st.booleans()):
        ctx["kms:EncryptionContextKeys"] = tuple(draw(st.lists(st.sampled_from(STRING_VALUES), max_size=3, unique=True)))
    if draw(st.booleans()):
        ctx["kms:RotationPeriodInDays"] = draw(st.sampled_from([90, 365, 400, 1000]))
    if draw(st.booleans()):
        ctx["aws:SecureTransport"] = draw(st.booleans())
    if draw(st.booleans()):
        ctx["aws:CurrentTime"] = draw(st.sampled_from([datetime(2025, 6, 1, 12, tzinfo=UTC), datetime(2031, 1, 1, tzinfo=UTC)]))
    if draw(st.booleans()):
        ctx["aws:SourceIp"] = draw(st.sampled_from(["10.1.2.3", "192.0.2.1", "2001:db8::1", "198.51.100.7"]))
    return ctx


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key_policy=policies("key"),
    identity=st.none() | policies("identity"),
    caller=st.sampled_from(CALLERS),
    action=st.sampled_from(["kms:Encrypt", "kms:Decrypt", "kms:GetPublicKey", "kms:PutKeyPolicy",
                            "kms:ReEncryptFrom", "kms:CreateKey"]),
    keyless=st.sampled_from([True, False, False, False, False, False, False]),
    context=contexts(),
    grantees=st.lists(st.sampled_from(CALLERS), max_size=2),
)
def test_compiled_decisions_equal_the_reference(key_policy: dict[str, Any], identity: dict[str, Any] | None,
                                                caller: str, action: str, keyless: bool, context: dict[str, Any],
                                                grantees: list[str]) -> None:
    resource = "*" if keyless else KEY
    operation = action.split(":")[1] if resource != "*" and action != "kms:PutKeyPolicy" else None
    grants = [GrantView(f"g{i}", g, ("Encrypt", "Decrypt")) for i, g in enumerate(grantees)]
    principal = Principal(caller, identity_policy=compile_policy(json.dumps(identity), kind="identity") if identity else None)
    request = AuthzRequest(principal, action, resource, A if resource != "*" else None, context, operation)
    compiled_kp = compile_policy(json.dumps(key_policy), kind="key") if resource != "*" else None
    got = decide(request, key_policy=compiled_kp, grants=grants)
    want = reference_decide(caller, identity, key_policy if resource != "*" else None, grants, action, resource,
                            context, operation)
    event(got.by.split(":")[0] + (" (explicit)" if got.explicit_deny else ""))
    assert (got.allowed, got.by, got.explicit_deny) == want
