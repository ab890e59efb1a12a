"""Policy documents compiled once into matchers: key policies and IAM identity policies.

:func:`compile_policy` does all JSON and validation work; a :class:`CompiledPolicy` then
answers, per action, which of its Deny and Allow statements can apply (memoised), and
each statement checks principal, resource and conditions with set lookups and
pre-compiled regexes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, Literal

from hsmkeys.authz.conditions import (
    Condition,
    Env,
    compile_condition,
    expand_variables,
    glob_regex,
    has_variables,
    principal_role_arn,
)
from hsmkeys.authz.model import Principal
from hsmkeys.errors import MalformedPolicyDocumentException

PolicyKind = Literal["key", "identity"]

MAX_KEY_POLICY_BYTES: Final = 32 * 1024
VERSIONS: Final = frozenset({"2012-10-17", "2008-10-17"})
_TOP_LEVEL: Final = frozenset({"Version", "Id", "Statement"})
_STATEMENT_ELEMENTS: Final = frozenset(
    {"Sid", "Effect", "Principal", "NotPrincipal", "Action", "NotAction", "Resource",
     "NotResource", "Condition"}
)
_PRINCIPAL_TYPES: Final = frozenset({"AWS", "Service", "Federated"})
_ACTION: Final = re.compile(r"^kms:[A-Za-z0-9*?]+$", re.IGNORECASE)
_ACCOUNT_ID: Final = re.compile(r"^\d{12}$")
_PARTITION = r"arn:aws(?:-cn|-us-gov)?"
_NAME = r"[\w+=,.@-]+"
_AWS_PRINCIPAL: Final = re.compile(
    rf"^{_PARTITION}:(?:iam::\d{{12}}:(?:root|user/(?:{_NAME}/)*{_NAME}|role/(?:{_NAME}/)*{_NAME})"
    rf"|sts::\d{{12}}:(?:assumed-role/{_NAME}/{_NAME}|federated-user/{_NAME}))$"
)
_RESOURCE_ARN: Final = re.compile(r"^arn:[^:]*:[^:]*:[^:]*:[^:]*:.+$", re.DOTALL)
_ROOT_ARN: Final = re.compile(rf"^{_PARTITION}:iam::(\d{{12}}):root$")


class PrincipalMatch:
    """How a statement's Principal names a caller, strongest first."""

    DIRECT: Final = 2  # the caller's own ARN (or its role's), "*", or NotPrincipal
    ACCOUNT: Final = 1  # the caller's account: IAM in that account may delegate
    NONE: Final = 0


@dataclass(frozen=True, slots=True)
class Caller:
    """The identities a caller's ARN carries, worked out once per ARN."""

    arn: str
    account: str
    is_root: bool
    role: str | None  # the role ARN behind an assumed-role session
    root: str  # the account root ARN


@lru_cache(maxsize=4096)
def caller_of(arn: str) -> Caller:
    p = Principal(arn)
    account = p.account
    return Caller(arn, account, p.is_root, principal_role_arn(arn), f"arn:aws:iam::{account}:root")


@dataclass(frozen=True, slots=True)
class _Principals:
    """A compiled Principal / NotPrincipal element (AWS principals only; others never match)."""

    negated: bool
    anyone: bool  # "*" or {"AWS": "*"}
    arns: frozenset[str]  # users, roles, sessions, and account roots (account ids normalised)
    accounts: frozenset[str]  # account ids named by id or by root ARN

    def match(self, caller: Caller) -> int:
        """A :class:`PrincipalMatch` level for the caller."""
        if self.negated:
            if self.anyone:
                return PrincipalMatch.NONE
            # NotPrincipal excludes a caller only when every identity it carries is listed
            # (IAM: exempting a user from a Deny also needs its account listed).
            arns = self.arns
            if caller.arn in arns and caller.root in arns and (caller.role is None or caller.role in arns):
                return PrincipalMatch.NONE
            return PrincipalMatch.DIRECT
        if self.anyone or caller.arn in self.arns:
            return PrincipalMatch.DIRECT
        if caller.role is not None and caller.role in self.arns:
            return PrincipalMatch.DIRECT
        if caller.account in self.accounts:
            return PrincipalMatch.DIRECT if caller.is_root else PrincipalMatch.ACCOUNT
        return PrincipalMatch.NONE


@dataclass(frozen=True, slots=True)
class Statement:
    """One compiled statement. ``label`` is its Sid, or ``#<index>`` without one."""

    label: str
    allow: bool
    principals: _Principals | None  # None in identity policies
    resource: Callable[[str, Env], bool]
    conditions: tuple[Condition, ...]

    def applies(self, resource: str, env: Env) -> bool:
        """Resource and conditions hold (principal and action are checked by the caller)."""
        if not self.resource(resource, env):
            return False
        return all(c(env) for c in self.conditions)


@dataclass(frozen=True, slots=True)
class _StatementActions:
    statement: Statement
    match_action: Callable[[str], bool]  # takes the lower-cased action


class CompiledPolicy:
    """A validated policy ready for evaluation; build with :func:`compile_policy`.

    Immutable after construction except for the per-action memo, which only caches what
    the statements would compute anyway (safe to share between threads).
    """

    __slots__ = ("_by_action", "_by_caller", "_statements", "id", "kind", "source", "statements", "version")

    _MEMO_LIMIT: Final = 1024

    def __init__(self, kind: PolicyKind, version: str | None, policy_id: str | None,
                 statements: list[_StatementActions], source: str = "") -> None:
        self.source = source  # the policy text it was compiled from
        self.kind = kind
        self.version = version
        self.id = policy_id
        self._statements = tuple(statements)
        self.statements: tuple[Statement, ...] = tuple(s.statement for s in statements)
        self._by_action: dict[str, tuple[tuple[Statement, ...], tuple[Statement, ...]]] = {}
        self._by_caller: dict[
            tuple[str, str], tuple[tuple[Statement, ...], tuple[tuple[Statement, int], ...]]
        ] = {}

    @property
    def sids(self) -> tuple[str, ...]:
        return tuple(s.label for s in self.statements)

    def for_action(self, action: str) -> tuple[tuple[Statement, ...], tuple[Statement, ...]]:
        """(Deny statements, Allow statements) whose Action/NotAction covers ``action``."""
        found = self._by_action.get(action)
        if found is not None:
            return found
        low = action.lower()
        denies = tuple(s.statement for s in self._statements
                       if not s.statement.allow and s.match_action(low))
        allows = tuple(s.statement for s in self._statements
                       if s.statement.allow and s.match_action(low))
        found = (denies, allows)
        if len(self._by_action) < self._MEMO_LIMIT:
            self._by_action[action] = found
        return found

    def for_caller(
        self, action: str, caller: Caller
    ) -> tuple[tuple[Statement, ...], tuple[tuple[Statement, int], ...]]:
        """A key policy's statements for one caller and action: (Deny statements whose
        Principal names the caller, (Allow statement, PrincipalMatch level) pairs), in
        document order. Memoised: a decision is then a dict lookup plus conditions."""
        memo_key = (action, caller.arn)
        found = self._by_caller.get(memo_key)
        if found is not None:
            return found
        denies, allows = self.for_action(action)
        found = (
            tuple(st for st in denies if st.principals is not None and st.principals.match(caller)),
            tuple(
                (st, level)
                for st in allows
                if st.principals is not None and (level := st.principals.match(caller)) != PrincipalMatch.NONE
            ),
        )
        if len(self._by_caller) >= self._MEMO_LIMIT:
            self._by_caller.clear()
        self._by_caller[memo_key] = found
        return found

    def __repr__(self) -> str:
        return f"CompiledPolicy(kind={self.kind!r}, statements={list(self.sids)!r})"


def _bad(message: str) -> MalformedPolicyDocumentException:
    return MalformedPolicyDocumentException(message)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _bad(f"duplicate JSON member {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise _bad(f"{name} is not valid JSON")


def _load(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except MalformedPolicyDocumentException:
        raise
    except (ValueError, RecursionError) as exc:
        raise _bad(f"the policy is not valid JSON: {exc}") from None


def _strings(raw: Any, where: str) -> list[str]:
    values = raw if isinstance(raw, list) else [raw]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise _bad(f"{where} must be a non-empty string or a non-empty list of non-empty strings")
    return values


def compile_policy(text: str, *, kind: PolicyKind) -> CompiledPolicy:
    """Validate and compile a policy document.

    Raises MalformedPolicyDocumentException, with the reason in its message, for anything
    that is not a policy hsmkeys can evaluate exactly; never any other exception.
    """
    if kind not in ("key", "identity"):
        raise ValueError(f"kind must be 'key' or 'identity', not {kind!r}")
    if not isinstance(text, str):
        raise _bad("the policy must be a JSON text")
    if kind == "key" and len(text.encode("utf-8", "surrogatepass")) > MAX_KEY_POLICY_BYTES:
        raise _bad(f"a key policy must be at most {MAX_KEY_POLICY_BYTES} bytes")
    doc = _load(text)
    if not isinstance(doc, dict):
        raise _bad("the policy must be a JSON object")
    unknown = set(doc) - _TOP_LEVEL
    if unknown:
        raise _bad(f"unknown policy element(s): {', '.join(sorted(unknown))}")
    version = doc.get("Version")
    if version is not None and (not isinstance(version, str) or version not in VERSIONS):
        raise _bad(f"Version must be one of {', '.join(sorted(VERSIONS))}, not {version!r}")
    policy_id = doc.get("Id")
    if policy_id is not None and not isinstance(policy_id, str):
        raise _bad("Id must be a string")
    raw_statements = doc.get("Statement")
    if isinstance(raw_statements, dict):
        raw_statements = [raw_statements]
    if not isinstance(raw_statements, list) or not raw_statements:
        raise _bad("Statement must be a non-empty list of statements")
    variables = version == "2012-10-17"  # policy variables exist from this version on
    seen_sids: set[str] = set()
    compiled = [
        _compile_statement(raw, index, kind, variables, seen_sids)
        for index, raw in enumerate(raw_statements)
    ]
    return CompiledPolicy(kind, version, policy_id, compiled, text)


def _compile_statement(raw: Any, index: int, kind: PolicyKind, variables: bool,
                       seen_sids: set[str]) -> _StatementActions:
    where = f"Statement #{index}"
    if not isinstance(raw, dict):
        raise _bad(f"{where} must be a JSON object")
    unknown = set(raw) - _STATEMENT_ELEMENTS
    if unknown:
        raise _bad(f"{where}: unknown element(s): {', '.join(sorted(unknown))}")

    sid = raw.get("Sid")
    if sid is not None and not isinstance(sid, str):
        raise _bad(f"{where}: Sid must be a string")
    if sid:
        if sid in seen_sids:
            raise _bad(f"{where}: duplicate Sid {sid!r}")
        seen_sids.add(sid)
        where = f"Statement {sid!r}"
    label = sid or f"#{index}"

    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise _bad(f"{where}: Effect must be Allow or Deny")

    principals = _compile_principal_element(raw, where, kind)
    match_action = _compile_actions(raw, where)
    resource = _compile_resources(raw, where, variables)

    conditions: list[Condition] = []
    block = raw.get("Condition")
    if block is not None:
        if not isinstance(block, dict):
            raise _bad(f"{where}: Condition must be an object")
        for operator, entries in block.items():
            if not isinstance(entries, dict) or not entries:
                raise _bad(f"{where}: Condition {operator} must map condition keys to values")
            for key, values in entries.items():
                try:
                    conditions.append(compile_condition(operator, key, values, variables=variables))
                except MalformedPolicyDocumentException as exc:
                    raise _bad(f"{where}: {exc.message}") from None

    statement = Statement(label, effect == "Allow", principals, resource, tuple(conditions))
    return _StatementActions(statement, match_action)


def _compile_principal_element(raw: dict[str, Any], where: str, kind: PolicyKind) -> _Principals | None:
    has_p, has_np = "Principal" in raw, "NotPrincipal" in raw
    if kind == "identity":
        if has_p or has_np:
            raise _bad(f"{where}: an identity policy statement must not name a Principal")
        return None
    if has_p and has_np:
        raise _bad(f"{where}: use Principal or NotPrincipal, not both")
    if not (has_p or has_np):
        raise _bad(f"{where}: a key policy statement needs a Principal")
    element = "Principal" if has_p else "NotPrincipal"
    value = raw[element]
    if value == "*":
        return _Principals(has_np, True, frozenset(), frozenset())
    if not isinstance(value, dict) or not value:
        raise _bad(f'{where}: {element} must be "*" or an object such as {{"AWS": [...]}}')
    unknown = set(value) - _PRINCIPAL_TYPES
    if unknown:
        raise _bad(f"{where}: unsupported {element} type(s): {', '.join(sorted(unknown))}")
    anyone = False
    arns: set[str] = set()
    accounts: set[str] = set()
    for ptype, entries in value.items():
        names = _strings(entries, f"{where}: {element}.{ptype}")
        if ptype != "AWS":
            continue  # service and federated principals are valid but never match a caller
        for name in names:
            if name == "*":
                anyone = True
            elif _ACCOUNT_ID.match(name):
                accounts.add(name)
                arns.add(f"arn:aws:iam::{name}:root")
            elif _AWS_PRINCIPAL.match(name):
                arns.add(name)
                root = _ROOT_ARN.match(name)
                if root is not None:
                    accounts.add(root.group(1))
            else:
                raise _bad(f"{where}: {element} {name!r} is not an account id, an IAM or STS ARN, or *")
    return _Principals(has_np, anyone, frozenset(arns), frozenset(accounts))


def _compile_actions(raw: dict[str, Any], where: str) -> Callable[[str], bool]:
    has_a, has_na = "Action" in raw, "NotAction" in raw
    if has_a and has_na:
        raise _bad(f"{where}: use Action or NotAction, not both")
    if not (has_a or has_na):
        raise _bad(f"{where}: a statement needs Action or NotAction")
    element = "Action" if has_a else "NotAction"
    names = _strings(raw[element], f"{where}: {element}")
    exact: set[str] = set()
    patterns: list[str] = []
    for name in names:
        if name == "*":
            patterns.append(".*")
        elif not _ACTION.match(name):
            raise _bad(f"{where}: {element} {name!r} is not a kms: action")
        elif "*" in name or "?" in name:
            patterns.append(glob_regex(name.lower()))
        else:
            exact.add(name.lower())
    regex = re.compile("|".join(f"(?:{p})" for p in patterns), re.DOTALL) if patterns else None
    frozen = frozenset(exact)
    negated = has_na

    def match(action: str) -> bool:
        hit = action in frozen or (regex is not None and regex.fullmatch(action) is not None)
        return hit != negated

    return match


def _compile_resources(raw: dict[str, Any], where: str, variables: bool) -> Callable[[str, Env], bool]:
    has_r, has_nr = "Resource" in raw, "NotResource" in raw
    if has_r and has_nr:
        raise _bad(f"{where}: use Resource or NotResource, not both")
    if not (has_r or has_nr):
        raise _bad(f"{where}: a statement needs Resource or NotResource")
    element = "Resource" if has_r else "NotResource"
    patterns = _strings(raw[element], f"{where}: {element}")
    for p in patterns:
        if p != "*" and not _RESOURCE_ARN.match(p):
            raise _bad(f"{where}: {element} {p!r} is not * or an ARN")
    negated = has_nr
    if "*" in patterns:
        return lambda resource, env: not negated
    templated = [p for p in patterns if variables and has_variables(p)]
    plain = [p for p in patterns if p not in templated]
    exact = frozenset(p for p in plain if "*" not in p and "?" not in p)
    globs = [glob_regex(p) for p in plain if p not in exact]
    regex = re.compile("|".join(f"(?:{g})" for g in globs), re.DOTALL) if globs else None

    def match(resource: str, env: Env) -> bool:
        hit = resource in exact or (regex is not None and regex.fullmatch(resource) is not None)
        if not hit:
            for t in templated:
                expanded = expand_variables(t, env, glob=True)
                if expanded is not None and re.fullmatch(expanded, resource, re.DOTALL):
                    hit = True
                    break
        return hit != negated

    return match


def default_key_policy(account_id: str) -> str:
    """The key policy KMS gives a key created without one: the account may use IAM."""
    if not _ACCOUNT_ID.match(account_id):
        raise ValueError(f"not a 12-digit account id: {account_id!r}")
    # Laid out as KMS returns it from GetKeyPolicy.
    return (
        "{\n"
        '  "Version" : "2012-10-17",\n'
        '  "Id" : "key-default-1",\n'
        '  "Statement" : [ {\n'
        '    "Sid" : "Enable IAM User Permissions",\n'
        '    "Effect" : "Allow",\n'
        '    "Principal" : {\n'
        f'      "AWS" : "arn:aws:iam::{account_id}:root"\n'
        "    },\n"
        '    "Action" : "kms:*",\n'
        '    "Resource" : "*"\n'
        "  } ]\n"
        "}"
    )


__all__ = ["CompiledPolicy", "Statement", "compile_policy", "default_key_policy"]
