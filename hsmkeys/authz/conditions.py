"""Condition blocks compiled into closures: IAM's operators, qualifiers and case rules.

A compiled condition is a function of an :class:`Env` (the request's condition keys,
looked up by lower-cased name) returning whether it holds. All parsing of policy-side
values (numbers, dates, CIDRs, wildcard patterns) happens here at compile time; a
malformed value raises :class:`MalformedPolicyDocumentException`.

Semantics, as the IAM User Guide documents them:
* condition key names are case-insensitive, including the ``<key>`` part of
  ``kms:EncryptionContext:<key>``; values are case-sensitive except under the
  ``...IgnoreCase`` operators;
* several values for one key are ORed; several keys and several operators are ANDed;
* a key absent from the request fails a positive operator and satisfies a negated one
  (``StringNotEquals``, ``StringNotLike``, ``ArnNotLike``, ``NotIpAddress``, ...);
  ``...IfExists`` makes an absent key satisfy any operator;
* ``ForAllValues:`` holds on an absent or empty set; ``ForAnyValue:`` does not; a
  negated operator under a qualifier is applied to each request value (no request value
  may match any policy value);
* policy variables (``${aws:username}``, ``${*}``, ...) are expanded in String and Arn
  operators' values when the policy's Version is 2012-10-17.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final

from hsmkeys.authz.model import ConditionValue, Principal
from hsmkeys.errors import MalformedPolicyDocumentException

MISSING: Final = object()

# Every condition key hsmkeys knows, lower-cased (IAM compares key names case-insensitively).
KNOWN_CONDITION_KEYS: Final = frozenset(
    k.lower()
    for k in (
        "kms:EncryptionContextKeys",
        "kms:CallerAccount",
        "kms:ViaService",
        "kms:EncryptionAlgorithm",
        "kms:SigningAlgorithm",
        "kms:MacAlgorithm",
        "kms:KeySpec",
        "kms:KeyUsage",
        "kms:KeyOrigin",
        "kms:RequestAlias",
        "kms:ResourceAliases",
        "kms:GrantOperations",
        "kms:GranteePrincipal",
        "kms:RetiringPrincipal",
        "kms:GrantIsForAWSResource",
        "kms:BypassPolicyLockoutSafetyCheck",
        "kms:KeyAgreementAlgorithm",
        "kms:GrantConstraintType",
        "kms:MessageType",
        "kms:RotationPeriodInDays",
        "kms:DataKeyPairSpec",
        "kms:ExpirationModel",
        "kms:WrappingAlgorithm",
        "kms:WrappingKeySpec",
        "kms:ValidTo",
        "kms:ReEncryptOnSameKey",
        "aws:PrincipalArn",
        "aws:PrincipalAccount",
        "aws:username",
        "aws:userid",
        "aws:CurrentTime",
        "aws:EpochTime",
        "aws:SecureTransport",
        "aws:SourceIp",
        "aws:TagKeys",
        "aws:PrincipalType",
    )
)
# Keys with a caller-chosen suffix: the suffix must be non-empty.
KNOWN_CONDITION_KEY_PREFIXES: Final = ("kms:encryptioncontext:", "aws:requesttag/", "aws:resourcetag/")


def is_known_condition_key(name: str) -> bool:
    low = name.lower()
    if low in KNOWN_CONDITION_KEYS:
        return True
    return any(low.startswith(p) and len(low) > len(p) for p in KNOWN_CONDITION_KEY_PREFIXES)


class Env:
    """One request's condition keys, looked up by lower-cased name.

    Keys the request does not carry but the caller's identity answers (aws:PrincipalArn,
    aws:PrincipalAccount, aws:username, aws:PrincipalType, kms:CallerAccount) are derived
    from the principal. The lower-cased mapping is built on first use only.
    """

    __slots__ = ("_context", "_lowered", "principal")

    def __init__(self, principal: Principal, context: Mapping[str, ConditionValue]) -> None:
        self.principal = principal
        self._context = context
        self._lowered: dict[str, ConditionValue] | None = None

    def get(self, lkey: str, key: str | None = None) -> object:
        """The value of condition key ``lkey`` (lower-cased); ``key`` is its spelling in the
        policy, tried first since requests usually spell keys the same way."""
        value = self._context.get(key, MISSING) if key is not None else MISSING
        if value is not MISSING:
            return value
        lowered = self._lowered
        if lowered is None:
            lowered = self._lowered = {k.lower(): v for k, v in self._context.items()}
        value = lowered.get(lkey, MISSING)
        if value is MISSING:
            return derived_key(self.principal, lkey)
        return value


def principal_role_arn(arn: str) -> str | None:
    """The role ARN behind an assumed-role session ARN, else None."""
    if not arn.startswith("arn:") or ":assumed-role/" not in arn:
        return None
    parts = arn.split(":", 5)
    if len(parts) != 6 or parts[2] != "sts":
        return None
    role = parts[5][len("assumed-role/") :].split("/", 1)[0]
    return f"arn:{parts[1]}:iam::{parts[4]}:role/{role}" if role else None


def derived_key(principal: Principal, lkey: str) -> object:
    if lkey == "aws:principalarn":
        return principal_role_arn(principal.arn) or principal.arn
    if lkey in ("aws:principalaccount", "kms:calleraccount"):
        return principal.account or MISSING
    if lkey == "aws:username":
        return principal.username or MISSING
    if lkey == "aws:principaltype":
        if principal.is_root:
            return "Account"
        if ":assumed-role/" in principal.arn:
            return "AssumedRole"
        if ":federated-user/" in principal.arn:
            return "FederatedUser"
        return "User" if ":user/" in principal.arn else MISSING
    return MISSING


# ---- request-side value conversion -------------------------------------------------


def as_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def as_number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return parse_number(value)
    return None


def as_epoch(value: object) -> float | None:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return parse_date(value)
    return None


def parse_number(text: str) -> float | None:
    try:
        number = float(text.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def parse_date(text: str) -> float | None:
    """ISO 8601 (``2024-01-01T00:00:00Z``, date only, offsets) or epoch seconds."""
    number = parse_number(text)
    if number is not None:
        return number
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# ---- wildcard patterns and policy variables ------------------------------------------

_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_SPECIAL_VARIABLES: Final = {"*": "*", "?": "?", "$": "$"}


def glob_regex(pattern: str) -> str:
    """``*`` any run of characters, ``?`` any one character; everything else literal."""
    out: list[str] = []
    for ch in pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        else:
            out.append(re.escape(ch))
    return "".join(out)


@lru_cache(maxsize=4096)
def compiled_glob(pattern: str, ignore_case: bool = False) -> re.Pattern[str]:
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
    return re.compile(glob_regex(pattern), flags)


def has_variables(text: str) -> bool:
    return "${" in text and _VARIABLE.search(text) is not None


def expand_variables(text: str, env: Env, *, glob: bool) -> str | None:
    """``text`` with its ``${...}`` variables replaced; None when one is not in the request.

    With ``glob`` the result is a wildcard pattern: substituted values are escaped so that
    their own ``*`` and ``?`` match literally (``${*}`` writes a literal ``*``).
    """
    out: list[str] = []
    pos = 0
    for m in _VARIABLE.finditer(text):
        out.append(glob_regex(text[pos : m.start()]) if glob else text[pos : m.start()])
        name = m.group(1).strip()
        if name in _SPECIAL_VARIABLES:
            value: str = _SPECIAL_VARIABLES[name]
        else:
            raw = env.get(name.lower())
            if raw is MISSING or isinstance(raw, tuple):
                return None
            value = as_text(raw)
        out.append(re.escape(value) if glob else value)
        pos = m.end()
    out.append(glob_regex(text[pos:]) if glob else text[pos:])
    return "".join(out)


# ---- operators ---------------------------------------------------------------------

# A matcher tells whether ONE request value matches ANY of the statement's policy values.
Matcher = Callable[[object, Env], bool]
Condition = Callable[[Env], bool]

_STRING_OPS: Final = {
    "stringequals": ("eq", False),
    "stringnotequals": ("eq", True),
    "stringequalsignorecase": ("eqi", False),
    "stringnotequalsignorecase": ("eqi", True),
    "stringlike": ("like", False),
    "stringnotlike": ("like", True),
}
_NUMERIC_OPS: Final = {
    "equals": ("eq", False),
    "notequals": ("eq", True),
    "lessthan": ("lt", False),
    "lessthanequals": ("le", False),
    "greaterthan": ("gt", False),
    "greaterthanequals": ("ge", False),
}
_ARN_OPS: Final = {
    "arnequals": False,
    "arnlike": False,
    "arnnotequals": True,
    "arnnotlike": True,
}
_COMPARE: Final[dict[str, Callable[[float, float], bool]]] = {
    "eq": lambda a, b: a == b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
}


def _policy_values(raw: Any, where: str) -> list[str]:
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise MalformedPolicyDocumentException(f"{where}: a condition needs at least one value")
    out: list[str] = []
    for v in values:
        if isinstance(v, bool):
            out.append("true" if v else "false")
        elif isinstance(v, str):
            out.append(v)
        elif isinstance(v, int | float):
            if isinstance(v, float) and not math.isfinite(v):
                raise MalformedPolicyDocumentException(f"{where}: a condition value must be finite")
            out.append(str(v))
        else:
            raise MalformedPolicyDocumentException(
                f"{where}: a condition value must be a string, number or boolean"
            )
    return out


def _string_matcher(kind: str, values: list[str], variables: bool) -> Matcher:
    if variables and any(has_variables(v) for v in values):
        ignore_case = kind == "eqi"
        is_glob = kind == "like"

        def match_vars(value: object, env: Env) -> bool:
            text = as_text(value)
            for v in values:
                expanded = expand_variables(v, env, glob=is_glob)
                if expanded is None:
                    continue
                if is_glob:
                    if re.fullmatch(expanded, text, re.DOTALL):
                        return True
                elif (expanded.lower() == text.lower()) if ignore_case else expanded == text:
                    return True
            return False

        return match_vars
    if kind == "eq":
        exact = frozenset(values)
        return lambda value, env: as_text(value) in exact
    if kind == "eqi":
        folded = frozenset(v.lower() for v in values)
        return lambda value, env: as_text(value).lower() in folded
    if all("*" not in v and "?" not in v for v in values):
        exact = frozenset(values)
        return lambda value, env: as_text(value) in exact
    regex = re.compile("|".join(f"(?:{glob_regex(v)})" for v in values), re.DOTALL)
    fullmatch = regex.fullmatch
    return lambda value, env: fullmatch(as_text(value)) is not None


def _arn_segments(text: str) -> list[str] | None:
    parts = text.split(":", 5)
    return parts if len(parts) == 6 else None


def _arn_matcher(values: list[str], variables: bool, where: str) -> Matcher:
    """ArnEquals/ArnLike: the six ARN segments matched one by one, wildcards allowed."""
    use_vars = variables and any(has_variables(v) for v in values)
    static: list[list[re.Pattern[str]]] = []
    if not use_vars:
        for v in values:
            segs = _arn_segments(v)
            if segs is None:
                raise MalformedPolicyDocumentException(f"{where}: {v!r} is not an ARN pattern")
            static.append([compiled_glob(s) for s in segs])

    def match_segments(patterns: list[re.Pattern[str]], segs: list[str]) -> bool:
        return all(p.fullmatch(s) is not None for p, s in zip(patterns, segs, strict=True))

    def match(value: object, env: Env) -> bool:
        segs = _arn_segments(as_text(value))
        if segs is None:
            return False
        if not use_vars:
            return any(match_segments(p, segs) for p in static)
        for v in values:
            expanded = expand_variables(v, env, glob=False)
            if expanded is None:
                continue
            psegs = _arn_segments(expanded)
            if psegs is not None and match_segments([compiled_glob(s) for s in psegs], segs):
                return True
        return False

    return match


def _numeric_matcher(cmp: str, values: list[str], parse: Callable[[str], float | None],
                     convert: Callable[[object], float | None], where: str) -> Matcher:
    numbers: list[float] = []
    for v in values:
        n = parse(v)
        if n is None:
            raise MalformedPolicyDocumentException(f"{where}: {v!r} is not a valid value")
        numbers.append(n)
    compare = _COMPARE[cmp]

    def match(value: object, env: Env) -> bool:
        n = convert(value)
        return n is not None and any(compare(n, p) for p in numbers)

    return match


def _ip_matcher(values: list[str], where: str) -> Matcher:
    networks = []
    for v in values:
        try:
            networks.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise MalformedPolicyDocumentException(f"{where}: {v!r} is not an IP address or CIDR") from None

    def match(value: object, env: Env) -> bool:
        try:
            addr = ipaddress.ip_address(as_text(value))
        except ValueError:
            return False
        return any(addr.version == n.version and addr in n for n in networks)

    return match


def _bool_values(values: list[str], where: str) -> frozenset[str]:
    lowered = frozenset(v.lower() for v in values)
    if not lowered <= {"true", "false"}:
        raise MalformedPolicyDocumentException(f"{where}: Bool and Null take only true or false")
    return lowered


def compile_condition(operator: str, key: str, raw_values: Any, *, variables: bool) -> Condition:
    """One ``operator: {key: values}`` entry as a closure; raises MalformedPolicyDocument."""
    where = f"Condition {operator} {key}"
    if not is_known_condition_key(key):
        raise MalformedPolicyDocumentException(f"{where}: unknown condition key {key!r}")
    lkey = key.lower()
    values = _policy_values(raw_values, where)

    name = operator.lower()
    qualifier = ""
    for q in ("foranyvalue:", "forallvalues:"):
        if name.startswith(q):
            qualifier, name = q[:-1], name[len(q) :]
            break
    if_exists = name.endswith("ifexists")
    if if_exists:
        name = name[: -len("ifexists")]

    if name == "null":
        if qualifier or if_exists:
            raise MalformedPolicyDocumentException(f"{where}: Null takes no qualifier or IfExists")
        wanted = _bool_values(values, where)

        def null(env: Env) -> bool:
            raw = env.get(lkey, key)
            absent = raw is MISSING or raw == ()
            return ("true" if absent else "false") in wanted

        return null

    negated = False
    matcher: Matcher
    if name in _STRING_OPS:
        kind, negated = _STRING_OPS[name]
        matcher = _string_matcher(kind, values, variables)
    elif name.startswith("numeric") and name[7:] in _NUMERIC_OPS:
        cmp, negated = _NUMERIC_OPS[name[7:]]
        matcher = _numeric_matcher(cmp, values, parse_number, as_number, where)
    elif name.startswith("date") and name[4:] in _NUMERIC_OPS:
        cmp, negated = _NUMERIC_OPS[name[4:]]
        matcher = _numeric_matcher(cmp, values, parse_date, as_epoch, where)
    elif name in _ARN_OPS:
        negated = _ARN_OPS[name]
        matcher = _arn_matcher(values, variables, where)
    elif name in ("ipaddress", "notipaddress"):
        negated = name == "notipaddress"
        matcher = _ip_matcher(values, where)
    elif name == "bool":
        truth = _bool_values(values, where)
        matcher = lambda value, env: as_text(value).lower() in truth  # noqa: E731
    elif name == "binaryequals":
        exact = frozenset(values)
        matcher = lambda value, env: as_text(value) in exact  # noqa: E731
    else:
        raise MalformedPolicyDocumentException(f"{where}: unknown condition operator {operator!r}")

    return _with_semantics(lkey, key, matcher, negated=negated, qualifier=qualifier, if_exists=if_exists)


def _with_semantics(lkey: str, key: str, matcher: Matcher, *, negated: bool, qualifier: str,
                    if_exists: bool) -> Condition:
    if qualifier == "forallvalues":

        def for_all(env: Env) -> bool:
            raw = env.get(lkey, key)
            if raw is MISSING or raw == ():
                return True
            values = raw if isinstance(raw, tuple) else (raw,)
            return all(matcher(v, env) != negated for v in values)

        return for_all
    if qualifier == "foranyvalue":

        def for_any(env: Env) -> bool:
            raw = env.get(lkey, key)
            if raw is MISSING or raw == ():
                return if_exists
            values = raw if isinstance(raw, tuple) else (raw,)
            return any(matcher(v, env) != negated for v in values)

        return for_any
    absent_result = if_exists or negated

    def single(env: Env) -> bool:
        raw = env.get(lkey, key)
        if raw is MISSING or raw == ():
            return absent_result
        hit = any(matcher(v, env) for v in raw) if isinstance(raw, tuple) else matcher(raw, env)
        return hit != negated

    return single
