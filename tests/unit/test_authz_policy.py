"""compile_policy: each MalformedPolicyDocument reason, the default policy, messages, speed."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from hsmkeys.authz import (
    GRANT_OPERATIONS,
    AuthzRequest,
    Decision,
    Principal,
    access_denied,
    compile_policy,
    decide,
    default_key_policy,
)
from hsmkeys.errors import AccessDeniedException, MalformedPolicyDocumentException

A = "111122223333"
KEY = f"arn:aws:kms:us-east-1:{A}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
BOB = f"arn:aws:iam::{A}:user/bob"


def key_stmt(**overrides: Any) -> dict[str, Any]:
    statement: dict[str, Any] = {
        "Sid": "S",
        "Effect": "Allow",
        "Principal": {"AWS": BOB},
        "Action": "kms:Encrypt",
        "Resource": "*",
    }
    for name, value in overrides.items():
        if value is None:
            statement.pop(name, None)
        else:
            statement[name] = value
    return statement


def doc(*statements: dict[str, Any], **top: Any) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements), **top})


MALFORMED: list[tuple[str, str, str, str]] = [
    ("invalid JSON", "{", "key", "not valid JSON"),
    ("NaN is not JSON", '{"Version": NaN}', "key", "not valid JSON"),
    ("duplicate JSON member", '{"Statement": [], "Statement": []}', "key", "duplicate JSON member"),
    ("not an object", "[]", "key", "must be a JSON object"),
    ("a string", '"policy"', "identity", "must be a JSON object"),
    ("missing Statement", json.dumps({"Version": "2012-10-17"}), "key", "Statement"),
    ("empty Statement", doc(), "key", "Statement"),
    ("Statement not a list", json.dumps({"Statement": "x"}), "key", "Statement"),
    ("statement not an object", json.dumps({"Statement": [1]}), "key", "must be a JSON object"),
    ("unknown top-level element", doc(key_stmt(), Extra=1), "key", "unknown policy element"),
    ("unknown statement element", doc(key_stmt(Foo="bar")), "key", "unknown element"),
    ("bad Version", json.dumps({"Version": "2020-01-01", "Statement": [key_stmt()]}), "key", "Version"),
    ("Version not a string", json.dumps({"Version": [], "Statement": [key_stmt()]}), "key", "Version"),
    ("Id not a string", doc(key_stmt(), Id=5), "key", "Id"),
    ("Effect missing", doc(key_stmt(Effect=None)), "key", "Effect"),
    ("Effect lower-case", doc(key_stmt(Effect="allow")), "key", "Effect"),
    ("both Action and NotAction", doc(key_stmt(NotAction="kms:Decrypt")), "key", "not both"),
    ("neither Action nor NotAction", doc(key_stmt(Action=None)), "key", "Action or NotAction"),
    ("empty Action list", doc(key_stmt(Action=[])), "key", "Action"),
    ("non-kms action", doc(key_stmt(Action="s3:GetObject")), "key", "not a kms: action"),
    ("action without service", doc(key_stmt(Action="Encrypt")), "key", "not a kms: action"),
    ("key statement without Principal", doc(key_stmt(Principal=None)), "key", "needs a Principal"),
    ("identity statement with Principal", doc(key_stmt()), "identity", "must not name a Principal"),
    ("identity statement with NotPrincipal", doc(key_stmt(Principal=None, NotPrincipal="*")), "identity", "must not name a Principal"),
    ("both Principal and NotPrincipal", doc(key_stmt(NotPrincipal="*")), "key", "not both"),
    ("Principal a bare string", doc(key_stmt(Principal=BOB)), "key", "Principal"),
    ("Principal empty object", doc(key_stmt(Principal={})), "key", "Principal"),
    ("Principal unsupported type", doc(key_stmt(Principal={"CanonicalUser": "x"})), "key", "unsupported Principal"),
    ("Principal not an ARN", doc(key_stmt(Principal={"AWS": "bob"})), "key", "not an account id"),
    ("Principal partial wildcard", doc(key_stmt(Principal={"AWS": f"arn:aws:iam::{A}:user/*"})), "key", "not an account id"),
    ("Principal short account id", doc(key_stmt(Principal={"AWS": "12345"})), "key", "not an account id"),
    ("Principal value a number", doc(key_stmt(Principal={"AWS": 111122223333})), "key", "Principal.AWS"),
    ("Resource missing", doc(key_stmt(Resource=None)), "key", "Resource or NotResource"),
    ("both Resource and NotResource", doc(key_stmt(NotResource="*")), "key", "not both"),
    ("Resource not an ARN", doc(key_stmt(Resource="my-key")), "key", "not * or an ARN"),
    ("duplicate Sid", doc(key_stmt(), key_stmt()), "key", "duplicate Sid"),
    ("Sid not a string", doc(key_stmt(Sid=3)), "key", "Sid"),
    ("Condition not an object", doc(key_stmt(Condition=[])), "key", "Condition"),
    ("unknown condition operator", doc(key_stmt(Condition={"StringMaybe": {"kms:CallerAccount": A}})), "key", "unknown condition operator"),
    ("unknown condition key", doc(key_stmt(Condition={"StringEquals": {"kms:Colour": "red"}})), "key", "unknown condition key"),
    ("encryption context key with no name", doc(key_stmt(Condition={"StringEquals": {"kms:EncryptionContext:": "x"}})), "key", "unknown condition key"),
    ("operator without keys", doc(key_stmt(Condition={"StringEquals": {}})), "key", "must map condition keys"),
    ("condition value an object", doc(key_stmt(Condition={"StringEquals": {"kms:CallerAccount": {"a": 1}}})), "key", "condition value"),
    ("condition with no values", doc(key_stmt(Condition={"StringEquals": {"kms:CallerAccount": []}})), "key", "at least one value"),
    ("numeric value not a number", doc(key_stmt(Condition={"NumericLessThan": {"kms:RotationPeriodInDays": "soon"}})), "key", "not a valid value"),
    ("date value not a date", doc(key_stmt(Condition={"DateLessThan": {"aws:CurrentTime": "tomorrow"}})), "key", "not a valid value"),
    ("bad CIDR", doc(key_stmt(Condition={"IpAddress": {"aws:SourceIp": "10.0.0.0/33"}})), "key", "IP address"),
    ("Bool value not a boolean", doc(key_stmt(Condition={"Bool": {"aws:SecureTransport": "yes"}})), "key", "true or false"),
    ("Null with a qualifier", doc(key_stmt(Condition={"ForAnyValue:Null": {"kms:ViaService": "true"}})), "key", "Null takes no"),
    ("ArnLike value not an ARN", doc(key_stmt(Condition={"ArnLike": {"aws:PrincipalArn": "bob"}})), "key", "not an ARN pattern"),
    ("key policy over 32 KiB", doc(key_stmt(), Id="x" * 33_000), "key", "at most 32768 bytes"),
]


@pytest.mark.parametrize(("text", "kind", "fragment"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_policy_is_refused_with_its_reason(text: str, kind: Any, fragment: str) -> None:
    with pytest.raises(MalformedPolicyDocumentException) as info:
        compile_policy(text, kind=kind)
    assert fragment in info.value.message


def test_identity_policy_may_exceed_the_key_policy_size_limit() -> None:
    text = json.dumps({"Version": "2012-10-17", "Id": "x" * 40_000,
                       "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]})
    assert compile_policy(text, kind="identity").kind == "identity"


def test_well_formed_variants_compile() -> None:
    single = json.dumps({"Statement": key_stmt(Principal={"AWS": [A, "*"], "Service": "s3.amazonaws.com"})})
    assert compile_policy(single, kind="key").sids == ("S",)
    keys = doc(key_stmt(Condition={
        "stringequals": {"KMS:EncryptionContext:Dept": "IT", "aws:RequestTag/Owner": "x"},
        "ForAllValues:StringLikeIfExists": {"aws:TagKeys": ["a*"]},
        "NumericLessThan": {"kms:RotationPeriodInDays": 400},
        "DateGreaterThan": {"aws:CurrentTime": "2020-01-01"},
        "Bool": {"aws:SecureTransport": True},
    }))
    assert compile_policy(keys, kind="key").statements[0].label == "S"


def test_statement_labels_are_sids_or_indexes() -> None:
    policy = compile_policy(doc(key_stmt(), key_stmt(Sid=None)), kind="key")
    assert policy.sids == ("S", "#1")


def test_default_key_policy_lets_the_account_root_do_everything() -> None:
    text = default_key_policy(A)
    parsed = json.loads(text)
    assert parsed["Statement"][0]["Principal"] == {"AWS": f"arn:aws:iam::{A}:root"}
    assert parsed["Statement"][0]["Action"] == "kms:*"
    policy = compile_policy(text, kind="key")
    root = Principal(f"arn:aws:iam::{A}:root")
    decision = decide(AuthzRequest(root, "kms:PutKeyPolicy", KEY, A), key_policy=policy)
    assert decision == Decision(True, "key-policy:Enable IAM User Permissions")
    with pytest.raises(ValueError):
        default_key_policy("acct")


def test_grant_operations_match_the_kms_service_model() -> None:
    import botocore.session  # a runtime dependency: never skipped

    model = botocore.session.get_session().get_service_model("kms")
    assert set(model.shape_for("GrantOperation").enum) == GRANT_OPERATIONS


def test_access_denied_wording_for_implicit_and_explicit_denials() -> None:
    request = AuthzRequest(Principal(BOB), "kms:Encrypt", KEY, A)
    implicit = access_denied(request, Decision(False, "implicit-deny", False, "resource-based"))
    assert isinstance(implicit, AccessDeniedException)
    assert implicit.message == (
        f"User: {BOB} is not authorized to perform: kms:Encrypt on resource: {KEY} "
        "because no resource-based policy allows the kms:Encrypt action"
    )
    explicit = access_denied(request, Decision(False, "key-policy:Deny", True, "resource-based"))
    assert explicit.message.endswith("with an explicit deny in a resource-based policy")
    by_iam = access_denied(request, Decision(False, "identity-policy:Deny", True, "identity-based"))
    assert by_iam.message.endswith("with an explicit deny in an identity-based policy")
    keyless = AuthzRequest(Principal(BOB), "kms:CreateKey", "*")
    assert access_denied(keyless, Decision(False, "implicit-deny")).message.endswith(
        "on resource: * because no identity-based policy allows the kms:CreateKey action"
    )


def test_delegated_denial_names_the_missing_identity_policy() -> None:
    request = AuthzRequest(Principal(BOB), "kms:Encrypt", KEY, A)
    decision = decide(request, key_policy=compile_policy(default_key_policy(A), kind="key"))
    assert decision.policy_type == "identity-based"
    assert "because no identity-based policy allows" in access_denied(request, decision).message


def test_identity_policy_must_be_compiled() -> None:
    request = AuthzRequest(Principal(BOB, identity_policy="{}"), "kms:CreateKey", "*")
    with pytest.raises(TypeError):
        decide(request, key_policy=None)


def test_twenty_statement_policy_decides_in_microseconds() -> None:
    statements = [
        {"Sid": f"S{i}", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{A}:role/r{i}"},
         "Action": ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey*"], "Resource": "*",
         "Condition": {"StringEquals": {"kms:EncryptionContext:dept": f"d{i}"},
                       "ForAllValues:StringLike": {"kms:EncryptionContextKeys": ["dept", "app*"]}}}
        for i in range(19)
    ]
    statements.append({"Sid": "TLS", "Effect": "Deny", "Principal": "*", "Action": "kms:*", "Resource": "*",
                       "Condition": {"Bool": {"aws:SecureTransport": "false"}}})
    policy = compile_policy(json.dumps({"Version": "2012-10-17", "Statement": statements}), kind="key")
    context = {"kms:CallerAccount": A, "aws:SecureTransport": True, "aws:CurrentTime": datetime.now(UTC),
               "kms:EncryptionContext:dept": "d18", "kms:EncryptionContextKeys": ("dept", "appname")}
    request = AuthzRequest(Principal(f"arn:aws:iam::{A}:role/r18"), "kms:Decrypt", KEY, A, context, "Decrypt")
    assert decide(request, key_policy=policy).by == "key-policy:S18"
    rounds = 20_000
    start = time.perf_counter()
    for _ in range(rounds):
        decide(request, key_policy=policy)
    per_call = (time.perf_counter() - start) / rounds
    assert per_call < 100e-6  # ~6 µs on a laptop core; generous for shared CI machines
