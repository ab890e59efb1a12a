"""AWS managed keys: alias/aws/<service> created on first use, exactly once, not manageable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hsmkeys.authz import compile_policy
from hsmkeys.authz.model import Principal
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.clock import FakeClock
from hsmkeys.context import CallContext, call_context
from hsmkeys.errors import (
    AccessDeniedException,
    InvalidAliasNameException,
    KMSError,
    NotFoundException,
    UnsupportedOperationException,
)
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.keystore import KeyStore
from hsmkeys.models import KeySpec, KeyUsage, KeyVersionRef

ACCOUNT = "111122223333"
OTHER = "444455556666"
ADMIN = f"arn:aws:iam::{ACCOUNT}:user/admin"
APP = f"arn:aws:iam::{ACCOUNT}:role/app"
PARTNER = f"arn:aws:iam::{OTHER}:role/partner"
ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]})
REPO = Path(__file__).resolve().parents[2]


class SlowCreateHsm(MemoryHsm):
    """Holds every key creation a moment, so racing first uses all miss the alias first."""

    def create_key(self, ref: KeyVersionRef, spec: KeySpec, usage: KeyUsage) -> None:
        time.sleep(0.05)
        super().create_key(ref, spec, usage)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    catalog = SqliteCatalog(tmp_path / "catalog.db")
    allow_all = compile_policy(ALLOW_ALL, kind="identity")
    principals = {
        ADMIN: Principal(ADMIN, identity_policy=allow_all),
        APP: Principal(APP),
        PARTNER: Principal(PARTNER, identity_policy=allow_all),
    }
    ks = KeyStore(hsm=MemoryHsm(), catalog=catalog, clock=FakeClock(), account_id=ACCOUNT, principals=principals)
    yield ks
    catalog.close()


@contextmanager
def as_caller(store: KeyStore, arn: str) -> Iterator[None]:
    with call_context(CallContext(principal=store.principal(arn), request_id="req-1", source="127.0.0.1")):
        yield


def _managed_arn(store: KeyStore, alias: str = "alias/aws/s3") -> str:
    return store.describe_key(key_id=alias).key_metadata.arn


# ------------------------------------------------------------------ creation on first use


@pytest.mark.parametrize(
    "first_use",
    [
        lambda s: s.encrypt(key_id="alias/aws/s3", plaintext=b"x"),
        lambda s: s.generate_data_key(key_id="alias/aws/s3", key_spec="AES_256"),
        lambda s: s.generate_data_key_without_plaintext(key_id="alias/aws/s3", number_of_bytes=32),
        lambda s: s.generate_data_key_pair(key_id="alias/aws/s3", key_pair_spec="ECC_NIST_P256"),
        lambda s: s.generate_data_key_pair_without_plaintext(key_id="alias/aws/s3", key_pair_spec="ECC_NIST_P256"),
        lambda s: s.describe_key(key_id="arn:aws:kms:us-east-1:111122223333:alias/aws/s3"),
        lambda s: s.re_encrypt(
            ciphertext_blob=s.encrypt(key_id=s.create_key().key_metadata.key_id, plaintext=b"x").ciphertext_blob,
            destination_key_id="alias/aws/s3",
        ),
    ],
    ids=["Encrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "GenerateDataKeyPair",
         "GenerateDataKeyPairWithoutPlaintext", "DescribeKey-alias-arn", "ReEncrypt-destination"],
)
def test_first_use_creates_the_aws_managed_key_as_aws_makes_it(
    store: KeyStore, first_use: Callable[[KeyStore], Any]
) -> None:
    first_use(store)
    md = store.describe_key(key_id="alias/aws/s3").key_metadata
    assert md.key_manager == "AWS" and md.enabled and md.key_spec == "SYMMETRIC_DEFAULT"
    assert md.description == "Default key that protects my s3 data when no other key is defined"
    status = store.get_key_rotation_status(key_id=md.key_id)
    assert status.key_rotation_enabled and status.rotation_period_in_days == 365
    assert md.key_id in {k.key_id for k in store.list_keys().keys}


def test_the_managed_key_decrypts_what_it_encrypted_and_is_reused(store: KeyStore) -> None:
    blob = store.encrypt(key_id="alias/aws/ebs", plaintext=b"secret").ciphertext_blob
    again = store.encrypt(key_id="alias/aws/ebs", plaintext=b"more").key_id
    assert store.decrypt(ciphertext_blob=blob).plaintext == b"secret"
    assert again == _managed_arn(store, "alias/aws/ebs")
    assert len(store.list_keys().keys) == 1


def test_operations_that_do_not_create_find_no_managed_key(store: KeyStore) -> None:
    with pytest.raises(NotFoundException):
        store.sign(key_id="alias/aws/s3", message=b"m", signing_algorithm="ECDSA_SHA_256")
    with pytest.raises(NotFoundException):
        store.encrypt(key_id="alias/aws/Not_A_Service", plaintext=b"x")
    assert store.list_keys().keys == ()


def test_eight_racing_threads_create_one_key_and_losers_destroy_their_objects(tmp_path: Path) -> None:
    catalog = SqliteCatalog(tmp_path / "catalog.db")
    hsm = SlowCreateHsm()
    store = KeyStore(hsm=hsm, catalog=catalog, clock=FakeClock(), account_id=ACCOUNT)
    barrier = threading.Barrier(8)
    arns: list[str] = []

    def first_use() -> None:
        barrier.wait()
        arns.append(store.encrypt(key_id="alias/aws/lambda", plaintext=b"x").key_id)

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keys = store.list_keys().keys
    assert len(arns) == 8 and len(set(arns)) == 1
    assert [k.key_arn for k in keys] == arns[:1]
    assert {ref.key_uuid for ref in hsm.list_key_refs()} == {__import__("uuid").UUID(keys[0].key_id)}
    catalog.close()


_CHILD = """
import sys, time, uuid
from pathlib import Path
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.keystore import KeyStore

class Slow(MemoryHsm):
    def create_key(self, ref, spec, usage):
        time.sleep(0.2)
        super().create_key(ref, spec, usage)

hsm = Slow()
store = KeyStore(hsm=hsm, catalog=SqliteCatalog(sys.argv[1]))
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
# DescribeKey: each process has its own in-memory HSM, so the loser could not encrypt
arn = store.describe_key(key_id="alias/aws/rds").key_metadata.arn
mine = {str(r.key_uuid) for r in hsm.list_key_refs()}
print(arn, ",".join(sorted(mine)))
store.close()
"""


def test_two_processes_racing_on_one_sqlite_file_create_one_key(tmp_path: Path) -> None:
    db, go = tmp_path / "catalog.db", tmp_path / "go"
    SqliteCatalog(db).close()  # migrated before the race
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(db), str(go)], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    time.sleep(1.0)  # both are waiting for the go file
    go.touch()
    outputs = [c.communicate(timeout=60)[0].split() for c in children]
    assert all(c.returncode == 0 for c in children)
    arns = {out[0] for out in outputs}
    assert len(arns) == 1
    winner = arns.pop().rsplit("/", 1)[1]
    # The winner's process holds the key's object; the loser destroyed its own.
    assert sorted(out[1] if len(out) > 1 else "" for out in outputs) == ["", winner]
    catalog = SqliteCatalog(db)
    assert [str(k.key_uuid) for k in catalog.list_keys(limit=10)] == [winner]
    catalog.close()


# ------------------------------------------------------------------ policy


def test_any_principal_of_the_account_uses_it_without_an_identity_policy(store: KeyStore) -> None:
    with as_caller(store, APP):
        blob = store.encrypt(key_id="alias/aws/s3", plaintext=b"x").ciphertext_blob
        assert store.decrypt(ciphertext_blob=blob).plaintext == b"x"
        with pytest.raises(AccessDeniedException):
            store.get_key_policy(key_id=_managed_arn(store))  # reading the policy is the root's


def test_another_accounts_principal_is_denied_and_creates_nothing(store: KeyStore) -> None:
    arn = _managed_arn(store)
    with as_caller(store, PARTNER):
        with pytest.raises(AccessDeniedException):
            store.encrypt(key_id=arn, plaintext=b"x")
        with pytest.raises(AccessDeniedException):
            store.describe_key(key_id=arn)
        with pytest.raises(NotFoundException):
            store.encrypt(key_id="alias/aws/glue", plaintext=b"x")
    assert [k.key_arn for k in store.list_keys().keys] == [arn]


def test_the_key_policy_is_fixed_and_names_only_the_owning_account(store: KeyStore) -> None:
    policy = json.loads(store.get_key_policy(key_id=_managed_arn(store)).policy)
    first = policy["Statement"][0]
    assert first["Principal"] == {"AWS": "*"}
    assert first["Condition"] == {"StringEquals": {"kms:CallerAccount": ACCOUNT}}
    assert "kms:PutKeyPolicy" not in json.dumps(policy) and "kms:*" not in json.dumps(policy)


# ------------------------------------------------------------------ not manageable


def _refusals(arn: str) -> list[tuple[str, Callable[[KeyStore], Any], type[KMSError]]]:
    policy = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Action": "kms:*", "Resource": "*"}]})
    return [
        ("PutKeyPolicy", lambda s: s.put_key_policy(key_id=arn, policy=policy), UnsupportedOperationException),
        ("EnableKeyRotation", lambda s: s.enable_key_rotation(key_id=arn), UnsupportedOperationException),
        ("DisableKeyRotation", lambda s: s.disable_key_rotation(key_id=arn), UnsupportedOperationException),
        ("RotateKeyOnDemand", lambda s: s.rotate_key_on_demand(key_id=arn), UnsupportedOperationException),
        ("EnableKey", lambda s: s.enable_key(key_id=arn), AccessDeniedException),
        ("DisableKey", lambda s: s.disable_key(key_id=arn), AccessDeniedException),
        ("ScheduleKeyDeletion", lambda s: s.schedule_key_deletion(key_id=arn), AccessDeniedException),
        ("TagResource", lambda s: s.tag_resource(key_id=arn, tags=[{"TagKey": "a", "TagValue": "b"}]),
         AccessDeniedException),
        ("UntagResource", lambda s: s.untag_resource(key_id=arn, tag_keys=["a"]), AccessDeniedException),
        ("UpdateKeyDescription", lambda s: s.update_key_description(key_id=arn, description="mine"),
         AccessDeniedException),
        ("CreateGrant", lambda s: s.create_grant(key_id=arn, grantee_principal=APP, operations=["Encrypt"]),
         AccessDeniedException),
        ("CreateAlias-reserved-name", lambda s: s.create_alias(alias_name="alias/aws/mine", target_key_id=arn),
         InvalidAliasNameException),
        ("CreateAlias-to-managed-key", lambda s: s.create_alias(alias_name="alias/mine", target_key_id=arn),
         AccessDeniedException),
        ("UpdateAlias", lambda s: s.update_alias(alias_name="alias/aws/s3",
                                                 target_key_id=s.create_key().key_metadata.key_id),
         AccessDeniedException),
        ("DeleteAlias", lambda s: s.delete_alias(alias_name="alias/aws/s3"), AccessDeniedException),
        ("DeleteAlias-predefined", lambda s: s.delete_alias(alias_name="alias/aws/xray"), AccessDeniedException),
    ]


@pytest.mark.parametrize("index", range(16))
@pytest.mark.parametrize("caller", [None, ADMIN])
def test_managing_an_aws_managed_key_is_refused_with_the_aws_error(
    store: KeyStore, index: int, caller: str | None
) -> None:
    arn = _managed_arn(store)
    name, call, error = _refusals(arn)[index]
    if caller is None:
        with pytest.raises(error):
            call(store)
    else:
        with as_caller(store, caller), pytest.raises(error):
            call(store)
    md = store.describe_key(key_id="alias/aws/s3").key_metadata
    assert md.arn == arn and md.enabled and md.description.startswith("Default key"), name
    assert store.get_key_rotation_status(key_id=arn).key_rotation_enabled
    assert store.list_resource_tags(key_id=arn).tags == ()
    assert store.list_grants(key_id=arn).grants == ()


def test_the_refusal_list_covers_every_refused_operation() -> None:
    from hsmkeys.ops.managed import REFUSED

    covered = {name.split("-")[0] for name, _, _ in _refusals("arn")} | {"CancelKeyDeletion"}
    assert covered == set(REFUSED)


# ------------------------------------------------------------------ listing


def test_list_aliases_shows_predefined_names_without_target_until_first_use(store: KeyStore) -> None:
    before = {a.alias_name: a.target_key_id for a in store.list_aliases(limit=100).aliases}
    for service in ("acm", "dynamodb", "ebs", "lambda", "rds", "s3", "secretsmanager", "ssm", "xray"):
        assert f"alias/aws/{service}" in before and before[f"alias/aws/{service}"] is None
    s3 = store.encrypt(key_id="alias/aws/s3", plaintext=b"x").key_id
    custom = store.encrypt(key_id="alias/aws/my-service2", plaintext=b"x").key_id
    after = {a.alias_name: a.target_key_id for a in store.list_aliases(limit=100).aliases}
    assert after["alias/aws/s3"] == s3.rsplit("/", 1)[1]
    assert after["alias/aws/my-service2"] == custom.rsplit("/", 1)[1]
    assert after["alias/aws/ebs"] is None
    assert {k.key_arn for k in store.list_keys().keys} == {s3, custom}


def test_list_aliases_pages_through_predefined_and_stored_names_in_order(store: KeyStore) -> None:
    store.create_alias(alias_name="alias/app", target_key_id=store.create_key().key_metadata.key_id)
    store.encrypt(key_id="alias/aws/s3", plaintext=b"x")
    seen: list[str] = []
    marker = None
    while True:
        page = store.list_aliases(limit=4, marker=marker)
        seen += [a.alias_name for a in page.aliases]
        if not page.truncated:
            break
        marker = page.next_marker
    assert seen == sorted(seen) and len(seen) == len(set(seen)) == 15
    assert seen[0] == "alias/app"


def test_maintenance_rotates_the_managed_key_after_365_days(store: KeyStore, ) -> None:
    arn = _managed_arn(store)
    clock = store._clock
    assert isinstance(clock, FakeClock)
    clock.advance(days=365)
    report = store.run_maintenance()
    assert report.rotated == (arn.rsplit("/", 1)[1],)
    assert store.describe_key(key_id=arn).key_metadata.current_version == 2
