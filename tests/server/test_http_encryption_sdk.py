"""The AWS Encryption SDK against the server, as a KMS master key provider."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import aws_encryption_sdk
import botocore.session
import pytest
from aws_encryption_sdk import CommitmentPolicy
from aws_encryption_sdk.exceptions import DecryptKeyError
from aws_encryption_sdk.key_providers.kms import StrictAwsKmsMasterKeyProvider
from server_harness import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, ServerProcess

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def botocore_session(kms_server: ServerProcess) -> Iterator[Any]:
    """A botocore session with the test credentials; its KMS clients use the test server
    through AWS_ENDPOINT_URL_KMS, set for this module only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL_KMS", kms_server.url)
        patch.delenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", raising=False)
        session = botocore.session.Session()
        session.set_credentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY)
        session.set_config_variable("region", REGION)
        yield session


@pytest.fixture(scope="module")
def provider(kms: Any, botocore_session: Any) -> StrictAwsKmsMasterKeyProvider:
    arn = kms.create_key(Description="encryption sdk")["KeyMetadata"]["Arn"]
    return StrictAwsKmsMasterKeyProvider(key_ids=[arn], botocore_session=botocore_session)


def test_encrypt_and_decrypt_one_mib(provider: StrictAwsKmsMasterKeyProvider) -> None:
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    message = os.urandom(1 << 20)
    context = {"purpose": "sdk-test", "tenant": "7"}
    ciphertext, header = client.encrypt(
        source=message, key_provider=provider, encryption_context=context
    )
    assert ciphertext != message
    assert len(header.encrypted_data_keys) == 1
    plaintext, decrypted_header = client.decrypt(source=ciphertext, key_provider=provider)
    assert plaintext == message
    assert decrypted_header.encryption_context["purpose"] == "sdk-test"


def test_decrypt_with_a_different_encryption_context_fails(
    provider: StrictAwsKmsMasterKeyProvider, caplog: pytest.LogCaptureFixture
) -> None:
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    ciphertext, _ = client.encrypt(
        source=b"x" * 1024, key_provider=provider, encryption_context={"a": "1"}
    )
    # Rewrite the stored context value in the message header (same length, so the
    # framing stays valid): KMS must refuse to decrypt the data key.
    tampered = ciphertext.replace(b"\x00\x01a\x00\x011", b"\x00\x01a\x00\x012", 1)
    assert tampered != ciphertext
    # DecryptKeyError: KMS refused the data key (InvalidCiphertextException), before
    # the SDK would even check its own header authentication tag.
    with pytest.raises(DecryptKeyError):
        client.decrypt(source=tampered, key_provider=provider)
    assert "InvalidCiphertextException" in caplog.text
