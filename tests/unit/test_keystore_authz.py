"""Authorization through the KeyStore: key policies, identity policies, grants, cross-account.

Every call here runs as a principal (``as_caller``), through the same decision path the
server uses. The pure evaluator has its own decision table (tests/vectors/authz).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hsmkeys.authz import GRANT_OPERATIONS, compile_policy
from hsmkeys.authz.model import Principal
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.clock import FakeClock
from hsmkeys.context import CallContext, call_context
from hsmkeys.errors import (
    AccessDeniedException,
    DisabledException,
    DryRunOperationException,
    InvalidGrantTokenException,
    KMSError,
    KMSInvalidStateException,
    LimitExceededException,
    MalformedPolicyDocumentException,
    NotFoundException,
    ValidationException,
)
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.keystore import KeyStore
from hsmkeys.kmsclient import LocalKms
from hsmkeys.models import GrantConstraints
from hsmkeys.operations import OPERATIONS

ACCOUNT = "111122223333"
OTHER = "444455556666"
ADMIN = f"arn:aws:iam::{ACCOUNT}:user/admin"
APP = f"arn:aws:iam::{ACCOUNT}:role/app"
BYSTANDER = f"arn:aws:iam::{ACCOUNT}:user/bystander"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
PARTNER = f"arn:aws:iam::{OTHER}:role/partner"
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}


def _identity(doc: dict[str, Any]) -> Any:
    return compile_policy(json.dumps(doc), kind="identity")


@pytest.fixture
def store(tmp_path: Any) -> Iterator[KeyStore]:
    catalog = SqliteCatalog(tmp_path / "catalog.db")
    principals = {
        ADMIN: Principal(ADMIN, identity_policy=_identity(ALLOW_ALL)),
        APP: Principal(APP),
        BYSTANDER: Principal(BYSTANDER),
        ROOT: Principal(ROOT),
    }
    ks = KeyStore(hsm=MemoryHsm(), catalog=catalog, clock=FakeClock(), account_id=ACCOUNT, principals=principals)
    yield ks
    catalog.close()


@contextmanager
def as_caller(store: KeyStore, arn: str | Principal) -> Iterator[None]:
    principal = arn if isinstance(arn, Principal) else store.principal(arn)
    with call_context(CallContext(principal=principal, request_id="req-1", source="127.0.0.1")):
        yield


def _policy(*statements: dict[str, Any]) -> str:
    base = {
        "Sid": "Admin",
        "Effect": "Allow",
        "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
        "Action": "kms:*",
        "Resource": "*",
    }
    return json.dumps({"Version": "2012-10-17", "Statement": [base, *statements]})


def _key(store: KeyStore, policy: str | None = None, **kwargs: Any) -> str:
    with as_caller(store, ADMIN):
        return store.create_key(policy=policy, **kwargs).key_metadata.arn


# ------------------------------------------------------------------ key policy and identity policy


def test_default_policy_lets_an_identity_policy_allow_and_denies_a_caller_without_one(store: KeyStore) -> None:
    arn = _key(store)
    with as_caller(store, ADMIN):
        blob = store.encrypt(key_id=arn, plaintext=b"x").ciphertext_blob
    with as_caller(store, APP), pytest.raises(AccessDeniedException) as denied:
        store.decrypt(ciphertext_blob=blob)
    message = denied.value.message
    assert APP in message and "kms:Decrypt" in message and arn in message


def test_account_root_uses_what_the_key_policy_gives_the_account(store: KeyStore) -> None:
    arn = _key(store)
    with as_caller(store, ROOT):
        assert store.encrypt(key_id=arn, plaintext=b"x").key_id == arn


def test_a_key_policy_naming_the_role_allows_it_without_an_identity_policy(store: KeyStore) -> None:
    arn = _key(store, _policy({"Sid": "App", "Effect": "Allow", "Principal": {"AWS": APP},
                               "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*"}))
    with as_caller(store, APP):
        blob = store.encrypt(key_id=arn, plaintext=b"hello").ciphertext_blob
        assert store.decrypt(ciphertext_blob=blob).plaintext == b"hello"
        with pytest.raises(AccessDeniedException):
            store.disable_key(key_id=arn)


def test_explicit_deny_in_the_key_policy_beats_an_identity_allow(store: KeyStore) -> None:
    arn = _key(store, _policy({"Sid": "NoAdminDecrypt", "Effect": "Deny", "Principal": {"AWS": ADMIN},
                               "Action": "kms:Decrypt", "Resource": "*"}))
    with as_caller(store, ADMIN):
        blob = store.encrypt(key_id=arn, plaintext=b"x").ciphertext_blob
        with pytest.raises(AccessDeniedException) as denied:
            store.decrypt(ciphertext_blob=blob)
    assert "explicit deny" in denied.value.message


def test_explicit_deny_in_the_identity_policy_beats_a_key_policy_allow(store: KeyStore) -> None:
    deny = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "kms:*", "Resource": "*"},
        {"Effect": "Deny", "Action": "kms:Encrypt", "Resource": "*"},
    ]}
    careful = Principal(f"arn:aws:iam::{ACCOUNT}:user/careful", identity_policy=_identity(deny))
    arn = _key(store)
    with as_caller(store, careful), pytest.raises(AccessDeniedException):
        store.encrypt(key_id=arn, plaintext=b"x")


def test_keyless_operations_are_decided_by_the_identity_policy_alone(store: KeyStore) -> None:
    with as_caller(store, APP):
        for call in (lambda: store.create_key(), store.list_keys, lambda: store.generate_random(number_of_bytes=8)):
            with pytest.raises(AccessDeniedException):
                call()
    with as_caller(store, ADMIN):
        assert len(store.generate_random(number_of_bytes=8).plaintext) == 8


def test_a_trusted_library_caller_needs_no_policy(store: KeyStore) -> None:
    arn = _key(store, _policy())
    blob = store.encrypt(key_id=arn, plaintext=b"x").ciphertext_blob
    assert store.decrypt(ciphertext_blob=blob).plaintext == b"x"


def test_a_remembered_allow_ends_with_the_policy_or_context_that_made_it(store: KeyStore) -> None:
    app_statement = {"Sid": "App", "Effect": "Allow", "Principal": {"AWS": APP}, "Action": "kms:Encrypt",
                     "Resource": "*", "Condition": {"StringEquals": {"kms:EncryptionContext:t": "a"}}}
    arn = _key(store, _policy(app_statement))
    with as_caller(store, APP):
        for _ in range(3):  # allowed again and again (memoised after the first)
            store.encrypt(key_id=arn, plaintext=b"x", encryption_context={"t": "a"})
        with pytest.raises(AccessDeniedException):
            store.encrypt(key_id=arn, plaintext=b"x", encryption_context={"t": "b"})
    with as_caller(store, ADMIN):
        store.put_key_policy(key_id=arn, policy=_policy())
    with as_caller(store, APP), pytest.raises(AccessDeniedException):
        store.encrypt(key_id=arn, plaintext=b"x", encryption_context={"t": "a"})


def test_time_conditions_are_decided_at_every_call(store: KeyStore) -> None:
    until = "2026-01-02T00:00:00Z"
    arn = _key(store, _policy({"Sid": "App", "Effect": "Allow", "Principal": {"AWS": APP}, "Action": "kms:Encrypt",
                               "Resource": "*", "Condition": {"DateLessThan": {"aws:CurrentTime": until}}}))
    with as_caller(store, APP):
        store.encrypt(key_id=arn, plaintext=b"x")
        store._clock.advance(days=2)  # type: ignore[attr-defined]
        with pytest.raises(AccessDeniedException):
            store.encrypt(key_id=arn, plaintext=b"x")


# ------------------------------------------------------------------ conditions


def test_encryption_context_conditions_are_honoured_on_every_context_operation(store: KeyStore) -> None:
    arn = _key(store, _policy({
        "Sid": "AppFinance", "Effect": "Allow", "Principal": {"AWS": APP},
        "Action": ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey", "kms:ReEncrypt*"], "Resource": "*",
        "Condition": {"StringEquals": {"kms:EncryptionContext:dept": "finance"}},
    }))
    good, bad = {"dept": "finance"}, {"dept": "sales"}
    with as_caller(store, APP):
        blob = store.encrypt(key_id=arn, plaintext=b"x", encryption_context=good).ciphertext_blob
        assert store.decrypt(ciphertext_blob=blob, encryption_context=good).plaintext == b"x"
        store.generate_data_key(key_id=arn, key_spec="AES_256", encryption_context=good)
        store.re_encrypt(ciphertext_blob=blob, source_encryption_context=good,
                         destination_key_id=arn, destination_encryption_context=good)
        for call in (
            lambda: store.encrypt(key_id=arn, plaintext=b"x", encryption_context=bad),
            lambda: store.generate_data_key(key_id=arn, key_spec="AES_256", encryption_context=bad),
            lambda: store.generate_data_key(key_id=arn, key_spec="AES_256"),
            lambda: store.re_encrypt(ciphertext_blob=blob, source_encryption_context=good,
                                     destination_key_id=arn, destination_encryption_context=bad),
        ):
            with pytest.raises(AccessDeniedException):
                call()
    with as_caller(store, ADMIN):
        other = store.encrypt(key_id=arn, plaintext=b"y", encryption_context=bad).ciphertext_blob
    with as_caller(store, APP), pytest.raises(AccessDeniedException):
        store.decrypt(ciphertext_blob=other, encryption_context=bad)


def test_re_encrypt_checks_both_keys(store: KeyStore) -> None:
    source = _key(store, _policy({"Sid": "From", "Effect": "Allow", "Principal": {"AWS": APP},
                                  "Action": "kms:ReEncryptFrom", "Resource": "*"}))
    open_dest = _key(store, _policy({"Sid": "To", "Effect": "Allow", "Principal": {"AWS": APP},
                                     "Action": "kms:ReEncryptTo", "Resource": "*"}))
    closed_dest = _key(store)
    blob = store.encrypt(key_id=source, plaintext=b"x").ciphertext_blob
    with as_caller(store, APP):
        out = store.re_encrypt(ciphertext_blob=blob, destination_key_id=open_dest)
        assert out.source_key_id == source and out.key_id == open_dest
        with pytest.raises(AccessDeniedException) as denied:
            store.re_encrypt(ciphertext_blob=blob, destination_key_id=closed_dest)
    assert "kms:ReEncryptTo" in denied.value.message


# ------------------------------------------------------------------ cross-account


def test_cross_account_needs_the_key_policy_and_the_callers_identity_policy(store: KeyStore) -> None:
    arn = _key(store, _policy({"Sid": "Partner", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{OTHER}:root"},
                               "Action": ["kms:Encrypt", "kms:DescribeKey"], "Resource": "*"}))
    allowed = Principal(PARTNER, identity_policy=_identity(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:Encrypt", "Resource": arn}]}
    ))
    without = Principal(PARTNER)
    with as_caller(store, allowed):
        assert store.encrypt(key_id=arn, plaintext=b"x").key_id == arn
        with pytest.raises(AccessDeniedException):
            store.describe_key(key_id=arn)  # the key policy allows it; the identity policy does not
    with as_caller(store, without), pytest.raises(AccessDeniedException):
        store.encrypt(key_id=arn, plaintext=b"x")
    closed = _key(store)
    with as_caller(store, allowed), pytest.raises(AccessDeniedException):
        store.encrypt(key_id=closed, plaintext=b"x")


def test_another_account_uses_keys_only_where_kms_allows_cross_account_use(store: KeyStore) -> None:
    arn = _key(store, _policy({"Sid": "Partner", "Effect": "Allow", "Principal": {"AWS": OTHER},
                               "Action": "kms:*", "Resource": "*"}))  # fmt: skip
    partner = Principal(PARTNER, identity_policy=_identity(ALLOW_ALL))
    key_id = arn.rsplit("/", 1)[1]
    with as_caller(store, partner):
        assert store.encrypt(key_id=arn, plaintext=b"x").key_id == arn  # "Cross-account use: Yes"
        assert store.describe_key(key_id=arn).key_metadata.arn == arn
        with pytest.raises(NotFoundException):  # a bare id names a key of the caller's own account
            store.encrypt(key_id=key_id, plaintext=b"x")
        refused: list[Callable[[], object]] = [  # "Cross-account use: No", whatever the policies say
            lambda: store.disable_key(key_id=arn),
            lambda: store.schedule_key_deletion(key_id=arn, pending_window_in_days=7),
            lambda: store.put_key_policy(key_id=arn, policy=_policy(), policy_name="default"),
            lambda: store.tag_resource(key_id=arn, tags=[{"TagKey": "t", "TagValue": "v"}]),
            lambda: store.update_key_description(key_id=arn, description="mine now"),
            lambda: store.create_alias(alias_name="alias/partner", target_key_id=arn),
            lambda: store.create_key(),
            lambda: store.list_keys(),
        ]
        for call in refused:
            with pytest.raises(AccessDeniedException, match="cannot be used across accounts"):
                call()
    assert store.describe_key(key_id=arn).key_metadata.enabled  # nothing changed


def test_the_cross_account_table_is_what_the_api_reference_says() -> None:
    import re

    import botocore.session

    model = botocore.session.get_session().get_service_model("kms")
    documented = {
        name
        for name in OPERATIONS
        if re.search(r"Cross-account use:\s*Yes", re.sub(r"<[^>]+>", "", model.operation_model(name).documentation))
    }
    assert {name for name, op in OPERATIONS.items() if op.cross_account} == documented | {"ListRetirableGrants"}


def test_a_condition_on_a_parameter_left_at_its_default_sees_the_default(store: KeyStore) -> None:
    only_symmetric = Principal(APP, identity_policy=_identity({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "kms:CreateKey", "Resource": "*",
         "Condition": {"StringEquals": {"kms:KeySpec": "SYMMETRIC_DEFAULT", "kms:KeyUsage": "ENCRYPT_DECRYPT"}}}]}))  # fmt: skip
    with as_caller(store, only_symmetric):
        store.create_key()  # no KeySpec, no KeyUsage: their defaults meet the condition
        with pytest.raises(AccessDeniedException):
            store.create_key(key_spec="HMAC_256", key_usage="GENERATE_VERIFY_MAC")
    arn = _key(store, _policy({"Sid": "App", "Effect": "Allow", "Principal": {"AWS": APP}, "Action": "kms:Encrypt",
                               "Resource": "*",
                               "Condition": {"StringEquals": {"kms:EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}}}))  # fmt: skip
    with as_caller(store, APP):
        store.encrypt(key_id=arn, plaintext=b"x")  # EncryptionAlgorithm left out: SYMMETRIC_DEFAULT


# ------------------------------------------------------------------ grants


def test_a_grant_allows_its_operations_until_revoked(store: KeyStore) -> None:
    arn = _key(store)
    with as_caller(store, APP), pytest.raises(AccessDeniedException):
        store.encrypt(key_id=arn, plaintext=b"x")
    with as_caller(store, ADMIN):
        grant = store.create_grant(key_id=arn, grantee_principal=APP, operations=["Encrypt", "Decrypt"])
    with as_caller(store, APP):
        blob = store.encrypt(key_id=arn, plaintext=b"x", grant_tokens=[grant.grant_token]).ciphertext_blob
        assert store.decrypt(ciphertext_blob=blob).plaintext == b"x"
        with pytest.raises(AccessDeniedException):
            store.generate_data_key(key_id=arn, key_spec="AES_256")
    with as_caller(store, ADMIN):
        store.revoke_grant(key_id=arn, grant_id=grant.grant_id)
    with as_caller(store, APP), pytest.raises(AccessDeniedException):
        store.decrypt(ciphertext_blob=blob)


def test_grant_constraints_limit_the_encryption_context(store: KeyStore) -> None:
    arn = _key(store)
    with as_caller(store, ADMIN):
        store.create_grant(key_id=arn, grantee_principal=APP, operations=["Encrypt"],
                           constraints=GrantConstraints(encryption_context_equals={"a": "1"}))
        store.create_grant(key_id=arn, grantee_principal=APP, operations=["GenerateDataKey"],
                           constraints=GrantConstraints(encryption_context_subset={"a": "1"}))
    with as_caller(store, APP):
        store.encrypt(key_id=arn, plaintext=b"x", encryption_context={"a": "1"})
        store.generate_data_key(key_id=arn, key_spec="AES_256", encryption_context={"a": "1", "b": "2"})
        for call in (
            lambda: store.encrypt(key_id=arn, plaintext=b"x", encryption_context={"a": "1", "b": "2"}),
            lambda: store.encrypt(key_id=arn, plaintext=b"x"),
            lambda: store.generate_data_key(key_id=arn, key_spec="AES_256", encryption_context={"a": "2"}),
        ):
            with pytest.raises(AccessDeniedException):
                call()


@pytest.mark.parametrize(
    "constraints",
    [
        GrantConstraints(encryption_context_equals={f"k{i}": "v" for i in range(9)}),
        GrantConstraints(encryption_context_subset={f"k{i}": "v" for i in range(9)}),
        GrantConstraints(encryption_context_equals={"k": "v" * 385}),
        GrantConstraints(encryption_context_subset={"k": "v" * 385}),
    ],
)
def test_grant_constraints_take_at_most_8_pairs_of_384_character_values(
    store: KeyStore, constraints: GrantConstraints
) -> None:
    arn = _key(store)
    with pytest.raises(ValidationException):
        store.create_grant(key_id=arn, grantee_principal=APP, operations=["Decrypt"], constraints=constraints)
    most = GrantConstraints(encryption_context_subset={f"k{i}": "v" * 384 for i in range(8)})
    store.create_grant(key_id=arn, grantee_principal=APP, operations=["Decrypt"], constraints=most)


def test_create_grant_needs_an_enabled_key_as_the_key_state_table_says(store: KeyStore) -> None:
    disabled, external, pending = _key(store), _key(store, origin="EXTERNAL"), _key(store)
    store.disable_key(key_id=disabled)
    store.schedule_key_deletion(key_id=pending, pending_window_in_days=7)
    for arn, error in (
        (disabled, DisabledException),
        (external, KMSInvalidStateException),  # pending import
        (pending, KMSInvalidStateException),
    ):
        with pytest.raises(error):
            store.create_grant(key_id=arn, grantee_principal=APP, operations=["Decrypt"])
    store.enable_key(key_id=disabled)
    store.create_grant(key_id=disabled, grantee_principal=APP, operations=["Decrypt"])


def test_create_grant_with_a_name_is_idempotent_with_a_fresh_token(store: KeyStore) -> None:
    arn = _key(store)
    with as_caller(store, ADMIN):
        first = store.create_grant(key_id=arn, grantee_principal=APP, operations=["Encrypt"], name="checkout")
        again = store.create_grant(key_id=arn, grantee_principal=APP, operations=["Encrypt"], name="checkout")
        assert again.grant_id == first.grant_id and again.grant_token != first.grant_token
        listed = store.list_grants(key_id=arn)
    assert [g.grant_id for g in listed.grants] == [first.grant_id]
    assert listed.grants[0].name == "checkout" and listed.grants[0].operations == ("Encrypt",)


def test_retire_grant_by_token_is_for_the_retiring_principal_not_a_bystander(store: KeyStore) -> None:
    arn = _key(store)
    with as_caller(store, ADMIN):
        grant = store.create_grant(key_id=arn, grantee_principal=APP, retiring_principal=BYSTANDER,
                                   operations=["Encrypt"])
        other = store.create_grant(key_id=arn, grantee_principal=APP, operations=["Encrypt", "RetireGrant"])
    with as_caller(store, APP), pytest.raises(AccessDeniedException):
        store.retire_grant(grant_token=grant.grant_token)
    with as_caller(store, ADMIN):
        assert [g.grant_id for g in store.list_retirable_grants(retiring_principal=BYSTANDER).grants] == [grant.grant_id]
    with as_caller(store, BYSTANDER):
        store.retire_grant(grant_token=grant.grant_token)
        with pytest.raises(NotFoundException):
            store.retire_grant(grant_token=grant.grant_token)
    with as_caller(store, APP):
        store.retire_grant(key_id=arn, grant_id=other.grant_id)  # the grantee, allowed by the grant
    with as_caller(store, ADMIN):
        assert store.list_grants(key_id=arn).grants == ()


_GRANT_TABLE = json.loads(
    (Path(__file__).resolve().parent.parent / "vectors" / "grant_operations.json").read_text()
)["key_types"]


@pytest.mark.parametrize("key_type", sorted(_GRANT_TABLE))
def test_a_grant_may_allow_only_operations_the_key_supports(store: KeyStore, key_type: str) -> None:
    spec, usage = key_type.split("/")
    arn = _key(store, key_spec=spec, key_usage=usage)
    allowed = set(_GRANT_TABLE[key_type])
    with as_caller(store, ADMIN):
        for operation in sorted(GRANT_OPERATIONS):
            if operation in allowed:
                store.create_grant(key_id=arn, grantee_principal=APP, operations=[operation])
                continue
            with pytest.raises(ValidationException, match=operation):
                store.create_grant(key_id=arn, grantee_principal=APP, operations=["DescribeKey", operation])
        granted = {op for g in store.list_grants(key_id=arn).grants for op in g.operations}
    assert granted == allowed  # every refusal stored nothing


def test_malformed_grant_tokens_are_invalid_grant_token(store: KeyStore) -> None:
    arn = _key(store)
    with pytest.raises(InvalidGrantTokenException):
        store.encrypt(key_id=arn, plaintext=b"x", grant_tokens=["not-a-token"])


def test_grants_die_with_their_key(store: KeyStore, tmp_path: Any) -> None:
    arn = _key(store)
    with as_caller(store, ADMIN):
        store.create_grant(key_id=arn, grantee_principal=APP, retiring_principal=APP, operations=["Encrypt"])
        assert len(store.list_retirable_grants(retiring_principal=APP).grants) == 1
        store.schedule_key_deletion(key_id=arn, pending_window_in_days=7)
    store._clock.advance(days=8)  # type: ignore[attr-defined]
    store.run_maintenance()
    with as_caller(store, ADMIN):
        assert store.list_retirable_grants(retiring_principal=APP).grants == ()


# ------------------------------------------------------------------ key policies


def test_key_policy_round_trips_and_defaults_to_the_kms_default(store: KeyStore) -> None:
    arn = _key(store)
    with as_caller(store, ADMIN):
        default = json.loads(store.get_key_policy(key_id=arn).policy)
        assert default["Statement"][0]["Principal"] == {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}
        assert store.list_key_policies(key_id=arn).policy_names == ("default",)
        new = _policy({"Sid": "App", "Effect": "Allow", "Principal": {"AWS": APP}, "Action": "kms:Encrypt",
                       "Resource": "*"})
        store.put_key_policy(key_id=arn, policy=new, policy_name="default")
        assert store.get_key_policy(key_id=arn, policy_name="default").policy == new
        with pytest.raises(NotFoundException):
            store.get_key_policy(key_id=arn, policy_name="other")
    with as_caller(store, APP):
        store.encrypt(key_id=arn, plaintext=b"x")


def test_a_key_pending_deletion_takes_a_new_policy(store: KeyStore) -> None:
    arn = _key(store)
    store.schedule_key_deletion(key_id=arn, pending_window_in_days=7)
    new = _policy({"Sid": "App", "Effect": "Allow", "Principal": {"AWS": APP}, "Action": "kms:*", "Resource": "*"})
    with as_caller(store, ADMIN):
        store.put_key_policy(key_id=arn, policy=new, policy_name="default")  # every key state (KMS key-state table)
        assert store.get_key_policy(key_id=arn).policy == new


@pytest.mark.parametrize(
    "policy",
    [
        "not json",
        "[]",
        '{"Statement": []}',
        '{"Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}',  # no Principal
        '{"Statement": [{"Effect": "Maybe", "Principal": "*", "Action": "kms:*", "Resource": "*"}]}',
        '{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*",'
        ' "Condition": {"StringEqualsSometimes": {"kms:CallerAccount": "1"}}}]}',
        '{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*",'
        ' "Condition": {"StringEquals": {"kms:NoSuchKey": "1"}}}]}',
        '{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*", "Bogus": 1}]}',
    ],
)
def test_a_malformed_key_policy_is_refused_when_set(store: KeyStore, policy: str) -> None:
    arn = _key(store)
    with as_caller(store, ADMIN):
        with pytest.raises(MalformedPolicyDocumentException):
            store.put_key_policy(key_id=arn, policy=policy)
        with pytest.raises(MalformedPolicyDocumentException):
            store.create_key(policy=policy)


def test_a_policy_over_32_kib_is_limit_exceeded(store: KeyStore) -> None:
    big = _policy(*({"Sid": f"S{i}", "Effect": "Allow", "Principal": {"AWS": APP}, "Action": "kms:Encrypt",
                     "Resource": "*"} for i in range(400)))
    assert len(big) > 32768
    with as_caller(store, ADMIN), pytest.raises(LimitExceededException):
        store.create_key(policy=big)


def test_a_policy_that_locks_the_caller_out_is_refused_unless_bypassed(store: KeyStore) -> None:
    arn = _key(store)
    lockout = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "AppOnly", "Effect": "Allow", "Principal": {"AWS": APP}, "Action": "kms:*", "Resource": "*"}]})
    with as_caller(store, ADMIN):
        with pytest.raises(MalformedPolicyDocumentException):
            store.put_key_policy(key_id=arn, policy=lockout)
        with pytest.raises(MalformedPolicyDocumentException):
            store.create_key(policy=lockout)
        store.put_key_policy(key_id=arn, policy=lockout, bypass_policy_lockout_safety_check=True)
        with pytest.raises(AccessDeniedException):
            store.put_key_policy(key_id=arn, policy=_policy())


# ------------------------------------------------------------------ every operation


class _CountingHsm(MemoryHsm):
    """Counts the calls that touch key material or create objects."""

    def __init__(self) -> None:
        super().__init__()
        self.touched = 0

    def _count(self, name: str) -> Callable[..., Any]:
        inner = getattr(super(), name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.touched += 1
            return inner(*args, **kwargs)

        return counted

    def __getattribute__(self, name: str) -> Any:
        if name in {"create_key", "destroy_key", "encrypt_aes_gcm", "decrypt_aes_gcm", "sign_digest",
                    "decrypt_rsa_oaep", "mac", "derive_ecdh", "public_key"}:
            return object.__getattribute__(self, "_count")(name)
        return object.__getattribute__(self, name)


def _request_for(name: str, keys: dict[str, Any], blob: bytes, grant_id: str) -> dict[str, Any]:
    sym, sign, mac, ecdh = keys["sym"], keys["sign"], keys["mac"], keys["ecdh"]
    return {
        "CancelKeyDeletion": {"key_id": sym},
        "CreateAlias": {"alias_name": "alias/new", "target_key_id": sym},
        "CreateGrant": {"key_id": sym, "grantee_principal": BYSTANDER, "operations": ["Encrypt"]},
        "CreateKey": {},
        "Decrypt": {"ciphertext_blob": blob},
        "DeleteAlias": {"alias_name": "alias/existing"},
        "DeleteImportedKeyMaterial": {"key_id": sym},
        "GetParametersForImport": {"key_id": sym, "wrapping_algorithm": "RSAES_OAEP_SHA_1",
                                   "wrapping_key_spec": "RSA_2048"},
        "ImportKeyMaterial": {"key_id": sym, "import_token": b"t" * 90, "encrypted_key_material": b"m" * 256},
        "DeriveSharedSecret": {"key_id": ecdh, "key_agreement_algorithm": "ECDH", "public_key": keys["peer"]},
        "DescribeKey": {"key_id": sym},
        "DisableKey": {"key_id": sym},
        "DisableKeyRotation": {"key_id": sym},
        "EnableKey": {"key_id": sym},
        "EnableKeyRotation": {"key_id": sym},
        "Encrypt": {"key_id": sym, "plaintext": b"x"},
        "GenerateDataKey": {"key_id": sym, "key_spec": "AES_256"},
        "GenerateDataKeyPair": {"key_id": sym, "key_pair_spec": "ECC_NIST_P256"},
        "GenerateDataKeyPairWithoutPlaintext": {"key_id": sym, "key_pair_spec": "ECC_NIST_P256"},
        "GenerateDataKeyWithoutPlaintext": {"key_id": sym, "key_spec": "AES_256"},
        "GenerateMac": {"key_id": mac, "message": b"m", "mac_algorithm": "HMAC_SHA_256"},
        "GenerateRandom": {"number_of_bytes": 8},
        "GetKeyLastUsage": {"key_id": sym},
        "GetKeyPolicy": {"key_id": sym},
        "GetKeyRotationStatus": {"key_id": sym},
        "GetPublicKey": {"key_id": sign},
        "ListAliases": {},
        "ListGrants": {"key_id": sym},
        "ListKeyPolicies": {"key_id": sym},
        "ListKeyRotations": {"key_id": sym},
        "ListKeys": {},
        "ListResourceTags": {"key_id": sym},
        "ListRetirableGrants": {"retiring_principal": ADMIN},
        "PutKeyPolicy": {"key_id": sym, "policy": _policy()},
        "ReEncrypt": {"ciphertext_blob": blob, "destination_key_id": sym},
        "RetireGrant": {"key_id": sym, "grant_id": grant_id},
        "RevokeGrant": {"key_id": sym, "grant_id": grant_id},
        "RotateKeyOnDemand": {"key_id": sym},
        "ScheduleKeyDeletion": {"key_id": sym},
        "Sign": {"key_id": sign, "message": b"m", "signing_algorithm": "ECDSA_SHA_256"},
        "TagResource": {"key_id": sym, "tags": [{"TagKey": "k", "TagValue": "v"}]},
        "UntagResource": {"key_id": sym, "tag_keys": ["k"]},
        "UpdateAlias": {"alias_name": "alias/existing", "target_key_id": sym},
        "UpdateKeyDescription": {"key_id": sym, "description": "d"},
        "Verify": {"key_id": sign, "message": b"m", "signature": b"s" * 70, "signing_algorithm": "ECDSA_SHA_256"},
        "VerifyMac": {"key_id": mac, "message": b"m", "mac": b"x" * 32, "mac_algorithm": "HMAC_SHA_256"},
    }[name]


def test_every_operation_refuses_a_caller_without_permission_and_touches_nothing(tmp_path: Any) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    hsm = _CountingHsm()
    catalog = SqliteCatalog(tmp_path / "c.db")
    store = KeyStore(hsm=hsm, catalog=catalog, clock=FakeClock(), account_id=ACCOUNT)
    keys: dict[str, Any] = {
        "sym": store.create_key().key_metadata.arn,
        "sign": store.create_key(key_spec="ECC_NIST_P256", key_usage="SIGN_VERIFY").key_metadata.arn,
        "mac": store.create_key(key_spec="HMAC_256", key_usage="GENERATE_VERIFY_MAC").key_metadata.arn,
        "rsa": store.create_key(key_spec="RSA_2048", key_usage="ENCRYPT_DECRYPT").key_metadata.arn,
        "ecdh": store.create_key(key_spec="ECC_NIST_P256", key_usage="KEY_AGREEMENT").key_metadata.arn,
    }
    keys["peer"] = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    store.create_alias(alias_name="alias/existing", target_key_id=keys["sym"])
    blob = store.encrypt(key_id=keys["sym"], plaintext=b"x").ciphertext_blob
    grant = store.create_grant(key_id=keys["sym"], grantee_principal=ADMIN, operations=["Encrypt"])
    before_rows = catalog.count_keys()
    checked = []
    for name, op in sorted(OPERATIONS.items()):
        request = _request_for(name, keys, blob, grant.grant_id)
        hsm.touched = 0
        with as_caller(store, BYSTANDER), pytest.raises(KMSError) as refused:
            store.invoke(op, request)
        assert refused.value.code == "AccessDeniedException", (name, refused.value)
        assert hsm.touched == 0, name
        checked.append(name)
    assert catalog.count_keys() == before_rows
    assert set(checked) == set(OPERATIONS)
    catalog.close()


# ------------------------------------------------------------------ DryRunModifiers


IGNORE = ["IGNORE_CIPHERTEXT"]


def test_a_dry_run_ignoring_the_ciphertext_checks_the_callers_permission_on_the_named_key(store: KeyStore) -> None:
    arn = _key(store, _policy({"Sid": "App", "Effect": "Allow", "Principal": {"AWS": APP},
                               "Action": ["kms:Decrypt", "kms:ReEncrypt*"], "Resource": "*"}))  # fmt: skip
    other = _key(store)  # default policy: APP has nothing on it
    with as_caller(store, APP):
        with pytest.raises(DryRunOperationException):
            store.decrypt(key_id=arn, dry_run=True, dry_run_modifiers=IGNORE)
        with pytest.raises(AccessDeniedException):
            store.decrypt(key_id=other, dry_run=True, dry_run_modifiers=IGNORE)
        with pytest.raises(ValidationException):  # a list of modifiers, not one string
            store.decrypt(key_id=arn, dry_run=True, dry_run_modifiers="IGNORE_CIPHERTEXT")  # type: ignore[arg-type]
        with pytest.raises(DryRunOperationException):
            store.re_encrypt(source_key_id=arn, destination_key_id=arn, dry_run=True, dry_run_modifiers=IGNORE)
        for source, destination in ((arn, other), (other, arn)):
            with pytest.raises(AccessDeniedException):
                store.re_encrypt(
                    source_key_id=source, destination_key_id=destination, dry_run=True, dry_run_modifiers=IGNORE
                )


def test_dry_run_modifiers_on_the_wire(store: KeyStore) -> None:
    kms = LocalKms(store)
    key = kms.call("CreateKey", {})["KeyMetadata"]["KeyId"]
    blob = kms.call("Encrypt", {"KeyId": key, "Plaintext": b"x"})["CiphertextBlob"]

    def code(operation: str, params: dict[str, Any]) -> str:
        with pytest.raises(KMSError) as caught:
            kms.call(operation, params)
        return caught.value.code

    dry = {"DryRun": True, "DryRunModifiers": IGNORE}
    assert code("Decrypt", {"KeyId": key, **dry}) == "DryRunOperationException"
    assert code("Decrypt", dry) == "ValidationException"  # no ciphertext: the key must be named
    assert code("Decrypt", {"KeyId": key, "DryRun": True, "DryRunModifiers": ["SKIP_IT"]}) == "ValidationException"
    assert code("Decrypt", {"KeyId": key, "DryRunModifiers": IGNORE}) == "ValidationException"  # only with DryRun
    assert kms.call("Decrypt", {"CiphertextBlob": blob, "DryRunModifiers": IGNORE})["Plaintext"] == b"x"
    assert code("ReEncrypt", {"SourceKeyId": key, "DestinationKeyId": key, **dry}) == "DryRunOperationException"
    assert code("ReEncrypt", {"DestinationKeyId": key, **dry}) == "ValidationException"
    kms.call("DisableKey", {"KeyId": key})
    assert code("Decrypt", {"KeyId": key, **dry}) == "DisabledException"
    assert code("ReEncrypt", {"SourceKeyId": key, "DestinationKeyId": key, **dry}) == "DisabledException"


# ------------------------------------------------------------------ RetireGrant


def test_retire_grant_follows_the_documented_rules_not_the_key_policy(store: KeyStore) -> None:
    arn = _key(store, _policy({"Sid": "AppRetires", "Effect": "Allow", "Principal": {"AWS": APP},
                               "Action": "kms:RetireGrant", "Resource": "*"}))  # fmt: skip

    def grant(**kwargs: Any) -> str:
        with as_caller(store, ADMIN):
            made = store.create_grant(key_id=arn, grantee_principal=BYSTANDER, operations=["Decrypt"], **kwargs)
        return made.grant_id

    first = grant()
    with as_caller(store, APP), pytest.raises(AccessDeniedException):  # "not effective in a key policy"
        store.retire_grant(key_id=arn, grant_id=first)
    with as_caller(store, ROOT):  # "the AWS account in which the grant was created can retire the grant"
        store.retire_grant(key_id=arn, grant_id=first)
    second = grant()
    with as_caller(store, ADMIN):  # an identity policy of that account delegating kms:RetireGrant
        store.retire_grant(key_id=arn, grant_id=second)
    third = grant(retiring_principal=BYSTANDER)
    no_retiring = Principal(BYSTANDER, identity_policy=_identity({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Action": "kms:RetireGrant", "Resource": "*"}]}))  # fmt: skip
    with as_caller(store, no_retiring), pytest.raises(AccessDeniedException):  # a Deny refuses even a party
        store.retire_grant(key_id=arn, grant_id=third)
    with as_caller(store, BYSTANDER):  # the retiring principal itself
        store.retire_grant(key_id=arn, grant_id=third)
    partner_root = Principal(f"arn:aws:iam::{OTHER}:root")
    fourth = grant()
    with as_caller(store, partner_root), pytest.raises(AccessDeniedException):  # another account's root is no issuer
        store.retire_grant(key_id=arn, grant_id=fourth)


def test_list_retirable_grants_authorizes_the_retiring_principal_of_the_callers_account(store: KeyStore) -> None:
    arn = _key(store)
    with as_caller(store, ADMIN):
        store.create_grant(key_id=arn, grantee_principal=APP, retiring_principal=BYSTANDER, operations=["Encrypt"])
        with pytest.raises(AccessDeniedException):  # "You must specify a principal in your account"
            store.list_retirable_grants(retiring_principal=PARTNER)
    # "The authorized resource in ListRetirableGrants calls is the retiring principal"
    for_bystander = Principal(APP, identity_policy=_identity({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "kms:ListRetirableGrants", "Resource": BYSTANDER}]}))  # fmt: skip
    with as_caller(store, for_bystander):
        assert len(store.list_retirable_grants(retiring_principal=BYSTANDER).grants) == 1
        with pytest.raises(AccessDeniedException):
            store.list_retirable_grants(retiring_principal=ROOT)
    partner = Principal(PARTNER, identity_policy=_identity(ALLOW_ALL))
    with as_caller(store, partner), pytest.raises(AccessDeniedException):
        store.list_retirable_grants(retiring_principal=BYSTANDER)
