"""In-process messages against ``hsmkeys serve`` and the SDK's standard KMS provider.

The in-process side runs ``hsmkeys encrypt-file`` / ``decrypt-file`` in a child process
opened on the server's own token and catalog (the ephemeral server prints its
directory), so both sides use the same keys; SoftHSM2 reads its config once per
process, hence the child. The SDK side is StrictAwsKmsMasterKeyProvider with a botocore
session pointed at the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aws_encryption_sdk
import botocore.session
import pytest
from aws_encryption_sdk import CommitmentPolicy
from aws_encryption_sdk.key_providers.kms import StrictAwsKmsMasterKeyProvider

from hsmkeys.hsm import softhsm
from hsmkeys.testing.server import EphemeralKms

CONTEXT = {"tenant": "7", "purpose": "interop"}
SDK = aws_encryption_sdk.EncryptionSDKClient(
    commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
)


@pytest.fixture(scope="module")
def key_arn(hsmkeys_kms_client: Any) -> str:
    arn: str = hsmkeys_kms_client.create_key(Description="envelope interop")["KeyMetadata"]["Arn"]
    return arn


@pytest.fixture(scope="module")
def sdk_provider(
    hsmkeys_kms: EphemeralKms, key_arn: str
) -> Iterator[StrictAwsKmsMasterKeyProvider]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL_KMS", hsmkeys_kms.url)
        patch.delenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", raising=False)
        session = botocore.session.Session()
        session.set_credentials(hsmkeys_kms.access_key_id, hsmkeys_kms.secret_access_key)
        session.set_config_variable("region", hsmkeys_kms.region)
        yield StrictAwsKmsMasterKeyProvider(key_ids=[key_arn], botocore_session=session)


@pytest.fixture(scope="module")
def server_store_config(
    hsmkeys_kms: EphemeralKms, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A config file opening the server's token and catalog (no audit log of its own)."""
    directory = hsmkeys_kms.audit_log.parent  # the ephemeral store's directory
    config = tmp_path_factory.mktemp("envelope-interop") / "hsmkeys.yaml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "hsm": {
                    "module": str(softhsm.find_module()),
                    "token_label": "hsmkeys-ephemeral",
                    "pin_file": str(directory / "pin"),
                    "softhsm2_conf": str(directory / softhsm.CONF_NAME),
                },
                "catalog": str(directory / "catalog.sqlite3"),
                "region": hsmkeys_kms.region,
                "account_id": hsmkeys_kms.account_id,
            }
        )
    )
    return config


def hsmkeys_cli(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "HSMKEYS_")) and k != "SOFTHSM2_CONF"
    }
    return subprocess.run(
        [sys.executable, "-m", "hsmkeys", "--config", str(config), *argv],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def test_in_process_message_decrypts_through_the_server_with_the_sdk_kms_provider(
    server_store_config: Path,
    sdk_provider: StrictAwsKmsMasterKeyProvider,
    key_arn: str,
    tmp_path: Path,
) -> None:
    data = os.urandom(300_000)
    (tmp_path / "plain").write_bytes(data)
    context = [arg for k, v in CONTEXT.items() for arg in ("--context", f"{k}={v}")]
    ran = hsmkeys_cli(
        server_store_config,
        "encrypt-file",
        str(tmp_path / "plain"),
        str(tmp_path / "sealed"),
        "--key-id",
        key_arn,
        *context,
    )
    assert ran.returncode == 0, ran.stderr
    plaintext, header = SDK.decrypt(
        source=(tmp_path / "sealed").read_bytes(), key_provider=sdk_provider
    )
    assert plaintext == data
    assert CONTEXT.items() <= header.encryption_context.items()


def test_server_message_decrypts_in_process(
    server_store_config: Path,
    sdk_provider: StrictAwsKmsMasterKeyProvider,
    key_arn: str,
    tmp_path: Path,
) -> None:
    data = os.urandom(100_000)
    message, _ = SDK.encrypt(source=data, key_provider=sdk_provider, encryption_context=CONTEXT)
    (tmp_path / "sealed").write_bytes(message)
    ran = hsmkeys_cli(
        server_store_config, "decrypt-file", str(tmp_path / "sealed"), str(tmp_path / "opened"),
        "--key-id", key_arn, "--context", "tenant=7",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "opened").read_bytes() == data
    ran = hsmkeys_cli(
        server_store_config, "decrypt-file", str(tmp_path / "sealed"), "-", "--context", "tenant=8"
    )
    assert ran.returncode == 1
    assert "does not contain tenant=8" in ran.stderr


def test_in_process_data_key_is_what_the_kms_provider_writes(
    server_store_config: Path,
    sdk_provider: StrictAwsKmsMasterKeyProvider,
    hsmkeys_kms_client: Any,
    key_arn: str,
    tmp_path: Path,
) -> None:
    ran = hsmkeys_cli(
        server_store_config,
        "encrypt-file",
        "-",
        str(tmp_path / "sealed"),
        "--key-id",
        key_arn,
        "--context",
        "tenant=7",
    )
    assert ran.returncode == 0, ran.stderr
    _, ours = SDK.decrypt(source=(tmp_path / "sealed").read_bytes(), key_provider=sdk_provider)
    message, _ = SDK.encrypt(
        source=b"", key_provider=sdk_provider, encryption_context={"tenant": "7"}
    )
    _, theirs = SDK.decrypt(source=message, key_provider=sdk_provider)
    [our_edk], [their_edk] = ours.encrypted_data_keys, theirs.encrypted_data_keys
    assert (
        our_edk.key_provider == their_edk.key_provider
    )  # provider id aws-kms, key info the key ARN
    assert (
        our_edk.key_provider.provider_id == "aws-kms"
        and our_edk.key_provider.key_info == key_arn.encode()
    )
    # Same blob format (version, key UUID, key version; IV and ciphertext differ) ...
    assert len(our_edk.encrypted_data_key) == len(their_edk.encrypted_data_key)
    assert our_edk.encrypted_data_key[:21] == their_edk.encrypted_data_key[:21]
    # ... and KMS Decrypt on the server opens ours with the message's encryption context.
    opened = hsmkeys_kms_client.decrypt(
        CiphertextBlob=our_edk.encrypted_data_key,
        EncryptionContext=ours.encryption_context,
        KeyId=key_arn,
    )
    assert opened["KeyId"] == key_arn and len(opened["Plaintext"]) == 32
