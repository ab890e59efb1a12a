"""HTTPS: a real server with a self-signed certificate, trusted by boto3 and the
Encryption SDK through a CA bundle, refused by clients that do not trust it.

The server runs with HSMKEYS_REGION / HSMKEYS_ACCOUNT_ID set (``serve --ephemeral``
honours them) and ``--workers 2``, so both workers' sockets serve TLS.
"""

from __future__ import annotations

import http.client
import os
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aws_encryption_sdk
import boto3
import botocore.session
import pytest
from aws_encryption_sdk import CommitmentPolicy
from aws_encryption_sdk.key_providers.kms import StrictAwsKmsMasterKeyProvider
from botocore.config import Config
from botocore.exceptions import SSLError
from server_harness import ACCESS_KEY_ID, SECRET_ACCESS_KEY

from hsmkeys.server.tls import write_self_signed_cert
from hsmkeys.testing.server import EphemeralKms, start_ephemeral_kms

pytestmark = pytest.mark.server

REGION = "eu-west-2"
ACCOUNT_ID = "444455556666"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    write_self_signed_cert(cert, key)
    return cert, key


@pytest.fixture(scope="module")
def https_server(tls_files: tuple[Path, Path]) -> Iterator[EphemeralKms]:
    cert, key = tls_files
    server = start_ephemeral_kms(
        "--workers",
        "2",
        access_key_id=ACCESS_KEY_ID,
        secret_access_key=SECRET_ACCESS_KEY,
        env={"HSMKEYS_REGION": REGION, "HSMKEYS_ACCOUNT_ID": ACCOUNT_ID},
        tls_cert=cert,
        tls_key=key,
    )
    yield server
    assert server.stop() == 0


def test_self_signed_key_is_owner_only(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"BEGIN CERTIFICATE" in cert.read_bytes()


def test_server_announces_https_and_the_environment_scope(
    https_server: EphemeralKms, tls_files: tuple[Path, Path]
) -> None:
    assert https_server.url.startswith("https://127.0.0.1:")
    assert (https_server.region, https_server.account_id) == (REGION, ACCOUNT_ID)
    assert https_server.ca_bundle == tls_files[0].resolve()


def test_boto3_trusting_the_ca_bundle_round_trips_encrypt_and_decrypt(
    https_server: EphemeralKms, tls_files: tuple[Path, Path]
) -> None:
    client = boto3.client(
        "kms",
        endpoint_url=https_server.url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        verify=str(tls_files[0]),
        config=Config(retries={"max_attempts": 1}),
    )
    arn = client.create_key()["KeyMetadata"]["Arn"]
    assert arn.startswith(f"arn:aws:kms:{REGION}:{ACCOUNT_ID}:key/")
    blob = client.encrypt(KeyId=arn, Plaintext=b"over tls", EncryptionContext={"a": "1"})
    plain = client.decrypt(CiphertextBlob=blob["CiphertextBlob"], EncryptionContext={"a": "1"})
    assert plain["Plaintext"] == b"over tls"
    assert plain["KeyId"] == arn


def test_every_worker_serves_tls(https_server: EphemeralKms, tls_files: tuple[Path, Path]) -> None:
    context = ssl.create_default_context(cafile=str(tls_files[0]))
    workers = set()
    for _ in range(40):
        connection = http.client.HTTPSConnection("127.0.0.1", https_server.port, context=context, timeout=10)
        try:
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            assert response.status == 200
            workers.add(response.getheader("x-hsmkeys-worker"))
            response.read()
        finally:
            connection.close()
        if len(workers) == 2:
            break
    assert len(workers) == 2


def test_client_that_does_not_trust_the_certificate_fails(
    https_server: EphemeralKms, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    client = https_server.client(verify=True)  # the default trust store, without our CA
    with pytest.raises(SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        client.list_keys()


def test_plain_http_to_the_tls_port_gets_no_kms_answer(https_server: EphemeralKms) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", https_server.port, timeout=10)
    try:
        connection.request("POST", "/", body=b"{}", headers={"X-Amz-Target": "TrentService.ListKeys"})
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            connection.getresponse().read()
    finally:
        connection.close()


@pytest.fixture
def sdk_session(https_server: EphemeralKms, tls_files: tuple[Path, Path]) -> Iterator[Any]:
    """A botocore session whose KMS clients reach the server over HTTPS, trusting its CA."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL_KMS", https_server.url)
        patch.delenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", raising=False)
        patch.delenv("AWS_CA_BUNDLE", raising=False)
        session = botocore.session.Session()
        session.set_credentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY)
        session.set_config_variable("region", REGION)
        session.set_config_variable("ca_bundle", str(tls_files[0]))
        yield session


def test_encryption_sdk_over_https_round_trips(https_server: EphemeralKms, sdk_session: Any) -> None:
    arn = https_server.client().create_key(Description="sdk over tls")["KeyMetadata"]["Arn"]
    provider = StrictAwsKmsMasterKeyProvider(key_ids=[arn], botocore_session=sdk_session)
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    message = os.urandom(4096)
    ciphertext, header = client.encrypt(
        source=message, key_provider=provider, encryption_context={"purpose": "tls"}
    )
    assert len(header.encrypted_data_keys) == 1
    plaintext, _ = client.decrypt(source=ciphertext, key_provider=provider)
    assert plaintext == message

