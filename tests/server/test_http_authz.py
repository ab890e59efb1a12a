"""Authorization end to end: a configured server (hsmkeys init + serve) and three boto3 principals.

admin has an identity policy allowing kms:*; app and bystander have none. The server is
set up exactly as a user would (config file, ``hsmkeys init --create-token``, ``serve``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from hsmkeys.hsm.softhsm import find_module

ACCOUNT = "111122223333"
ADMIN = f"arn:aws:iam::{ACCOUNT}:user/admin"
APP = f"arn:aws:iam::{ACCOUNT}:role/app"
BYSTANDER = f"arn:aws:iam::{ACCOUNT}:user/bystander"
KEYS = {ADMIN: "AKIAADMINE2E0000", APP: "AKIAAPPE2E000000", BYSTANDER: "AKIABYSTANDERE2E"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _config(folder: Path) -> Path:
    principals = []
    for arn, key_id in KEYS.items():
        entry: dict[str, Any] = {
            "arn": arn,
            "access_key_id": key_id,
            "secret_access_key_file": f"{key_id}.secret",
        }
        if arn == ADMIN:
            entry["policy"] = {"Version": "2012-10-17",
                               "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}
        principals.append(entry)
    config = {
        "hsm": {"module": str(find_module()), "token_label": "e2e", "pin_file": "pin",
                "softhsm2_conf": "softhsm2.conf"},
        "catalog": "catalog.db",
        "region": "us-east-1",
        "account_id": ACCOUNT,
        "audit_log": "audit.log",
        "principals": principals,
    }
    path = folder / "hsmkeys.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HSMKEYS_", "SOFTHSM2_CONF"))}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("authz-e2e")
    config = _config(folder)
    hsmkeys = [sys.executable, "-m", "hsmkeys", "--config", str(config)]
    subprocess.run([*hsmkeys, "init", "--create-token"], check=True, env=_env(), capture_output=True, timeout=120)
    port = _free_port()
    process = subprocess.Popen(
        [*hsmkeys, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        assert process.stdout is not None
        for line in process.stdout:
            if re.search(r"listening on https?://", line):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
        else:
            raise RuntimeError(f"server exited with {process.wait()}")
        yield {"url": f"http://127.0.0.1:{port}", "folder": folder}
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


def _client(server: dict[str, Any], arn: str) -> Any:
    key_id = KEYS[arn]
    secret = (server["folder"] / f"{key_id}.secret").read_text(encoding="utf-8").strip()
    return boto3.client(
        "kms", endpoint_url=server["url"], region_name="us-east-1",
        aws_access_key_id=key_id, aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1}),
    )


def _denied(call: Any) -> str:
    with pytest.raises(ClientError) as refused:
        call()
    assert refused.value.response["Error"]["Code"] == "AccessDeniedException"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    message: str = refused.value.response["Error"]["Message"]
    return message


def test_app_is_denied_then_allowed_by_a_grant_in_the_same_call_then_denied_after_revoke(
    server: dict[str, Any],
) -> None:
    admin, app, bystander = (_client(server, a) for a in (ADMIN, APP, BYSTANDER))
    key = admin.create_key(Description="e2e")["KeyMetadata"]["Arn"]
    message = _denied(lambda: app.encrypt(KeyId=key, Plaintext=b"x"))
    assert APP in message and "kms:Encrypt" in message and key in message
    grant = admin.create_grant(KeyId=key, GranteePrincipal=APP, Operations=["Encrypt", "Decrypt"],
                               Constraints={"EncryptionContextSubset": {"tenant": "acme"}})
    blob = app.encrypt(KeyId=key, Plaintext=b"secret", EncryptionContext={"tenant": "acme", "x": "1"},
                       GrantTokens=[grant["GrantToken"]])["CiphertextBlob"]
    plain = app.decrypt(CiphertextBlob=blob, EncryptionContext={"tenant": "acme", "x": "1"})["Plaintext"]
    assert plain == b"secret"
    _denied(lambda: app.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext={"tenant": "other"}))
    _denied(lambda: bystander.decrypt(CiphertextBlob=blob, EncryptionContext={"tenant": "acme", "x": "1"}))
    grants = admin.list_grants(KeyId=key)["Grants"]
    assert [g["GrantId"] for g in grants] == [grant["GrantId"]]
    assert grants[0]["Constraints"] == {"EncryptionContextSubset": {"tenant": "acme"}}
    admin.revoke_grant(KeyId=key, GrantId=grant["GrantId"])
    _denied(lambda: app.decrypt(CiphertextBlob=blob, EncryptionContext={"tenant": "acme", "x": "1"}))


def test_a_key_policy_statement_naming_the_app_allows_it_with_context_conditions(server: dict[str, Any]) -> None:
    admin, app = _client(server, ADMIN), _client(server, APP)
    policy = {"Version": "2012-10-17", "Statement": [
        {"Sid": "Admin", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
         "Action": "kms:*", "Resource": "*"},
        {"Sid": "AppFinance", "Effect": "Allow", "Principal": {"AWS": APP},
         "Action": ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey", "kms:ReEncrypt*"], "Resource": "*",
         "Condition": {"StringEquals": {"kms:EncryptionContext:dept": "finance"}}},
    ]}
    key = admin.create_key(Policy=json.dumps(policy))["KeyMetadata"]["Arn"]
    other = admin.create_key(Policy=json.dumps(policy))["KeyMetadata"]["Arn"]
    good = {"dept": "finance"}
    blob = app.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext=good)["CiphertextBlob"]
    assert app.decrypt(CiphertextBlob=blob, EncryptionContext=good)["Plaintext"] == b"x"
    app.generate_data_key(KeyId=key, KeySpec="AES_256", EncryptionContext=good)
    app.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext=good, DestinationKeyId=other,
                   DestinationEncryptionContext=good)
    _denied(lambda: app.generate_data_key(KeyId=key, KeySpec="AES_256", EncryptionContext={"dept": "sales"}))
    _denied(lambda: app.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext=good, DestinationKeyId=other,
                                   DestinationEncryptionContext={"dept": "sales"}))
    _denied(lambda: app.disable_key(KeyId=key))
    assert json.loads(admin.get_key_policy(KeyId=key, PolicyName="default")["Policy"]) == policy


def test_callers_without_an_identity_policy_cannot_use_keyless_operations(server: dict[str, Any]) -> None:
    app = _client(server, APP)
    _denied(lambda: app.create_key())
    _denied(lambda: app.list_keys())
    _denied(lambda: app.generate_random(NumberOfBytes=8))


def test_the_audit_log_records_each_decision(server: dict[str, Any]) -> None:
    admin, bystander = _client(server, ADMIN), _client(server, BYSTANDER)
    key = admin.create_key()["KeyMetadata"]["Arn"]
    _denied(lambda: bystander.describe_key(KeyId=key))
    time.sleep(0.2)
    lines = [json.loads(line) for line in (server["folder"] / "audit.log").read_text().splitlines()]
    denied = [x for x in lines if x.get("principal") == BYSTANDER and x.get("operation") == "DescribeKey"]
    assert denied and denied[-1]["outcome"] == "AccessDeniedException"
    assert denied[-1]["decision"].startswith("deny ")
    allowed = [x for x in lines if x.get("principal") == ADMIN and x.get("operation") == "CreateKey"]
    assert allowed and allowed[-1]["decision"].startswith("allow identity-policy")


def test_terraform_aws_kms_key_lifecycle_answers_as_aws_does(server: dict[str, Any]) -> None:
    """The calls Terraform's aws_kms_key / aws_kms_alias make, in its order."""
    kms = _client(server, ADMIN)
    policy = json.dumps({"Version": "2012-10-17", "Id": "key-default-1", "Statement": [
        {"Sid": "Enable IAM User Permissions", "Effect": "Allow",
         "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Action": "kms:*", "Resource": "*"}]})
    created = kms.create_key(Description="tf", CustomerMasterKeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT",
                             Policy=policy, BypassPolicyLockoutSafetyCheck=False,
                             Tags=[{"TagKey": "env", "TagValue": "test"}])["KeyMetadata"]
    key = created["KeyId"]
    kms.enable_key_rotation(KeyId=key, RotationPeriodInDays=180)
    for _ in range(3):  # Terraform polls until these read back the same several times
        assert json.loads(kms.get_key_policy(KeyId=key, PolicyName="default")["Policy"]) == json.loads(policy)
        assert kms.list_resource_tags(KeyId=key)["Tags"] == [{"TagKey": "env", "TagValue": "test"}]
    status = kms.get_key_rotation_status(KeyId=key)
    assert status["KeyRotationEnabled"] is True and status["RotationPeriodInDays"] == 180
    assert kms.describe_key(KeyId=key)["KeyMetadata"]["Description"] == "tf"
    kms.put_key_policy(KeyId=key, PolicyName="default", Policy=policy)
    kms.update_key_description(KeyId=key, Description="tf2")
    kms.disable_key(KeyId=key)
    kms.enable_key(KeyId=key)
    kms.tag_resource(KeyId=key, Tags=[{"TagKey": "team", "TagValue": "a"}])
    kms.untag_resource(KeyId=key, TagKeys=["env"])
    assert kms.list_resource_tags(KeyId=key)["Tags"] == [{"TagKey": "team", "TagValue": "a"}]
    kms.create_alias(AliasName="alias/tf-e2e", TargetKeyId=key)
    names = [a["AliasName"] for page in kms.get_paginator("list_aliases").paginate() for a in page["Aliases"]]
    assert "alias/tf-e2e" in names
    other = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.update_alias(AliasName="alias/tf-e2e", TargetKeyId=other)
    kms.delete_alias(AliasName="alias/tf-e2e")
    kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    assert kms.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "PendingDeletion"
