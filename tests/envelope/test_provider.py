"""KeyStoreMasterKeyProvider in process (in-memory HSM): messages, data keys, strictness."""

from __future__ import annotations

import io
from typing import Any

import aws_encryption_sdk
import pytest
from aws_encryption_sdk import CommitmentPolicy
from aws_encryption_sdk.exceptions import MasterKeyProviderError

from hsmkeys.envelope import (
    PROVIDER_ID,
    EncryptionContextMismatchError,
    KeyStoreDiscoveryMasterKeyProvider,
    KeyStoreMasterKeyProvider,
    decrypt_stream,
    encrypt_stream,
)
from hsmkeys.errors import InvalidCiphertextException, NotFoundException, ValidationException
from hsmkeys.keystore import KeyStore

from .conftest import CountingKeyStore, Key

CONTEXT = {"tenant": "7", "purpose": "envelope-test"}


def seal(keys: Any, data: bytes, context: dict[str, str] | None = None, **options: Any) -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out, keys, CONTEXT if context is None else context, **options)
    return out.getvalue()


def open_message(keys: Any, message: bytes, **options: Any) -> bytes:
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(message), out, keys, **options)
    return out.getvalue()


def header_of(keys: Any, message: bytes) -> Any:
    return decrypt_stream(io.BytesIO(message), io.BytesIO(), keys)


def test_message_round_trips_through_the_provider(store: KeyStore, key: Key) -> None:
    provider = KeyStoreMasterKeyProvider(store, key_ids=[key.arn])
    data = bytes(range(256)) * 1000
    message = seal(provider, data)
    assert data not in message
    assert open_message(provider, message, expected_context=CONTEXT) == data


def test_data_key_is_the_kms_blob_under_the_key_arn_bound_to_the_context(
    store: KeyStore, key: Key
) -> None:
    provider = KeyStoreMasterKeyProvider(store, key_ids=[key.alias])
    header = header_of(provider, seal(provider, b"payload"))
    [edk] = header.encrypted_data_keys
    assert edk.key_provider.provider_id == PROVIDER_ID == "aws-kms"
    assert edk.key_provider.key_info == key.arn.encode()  # the ARN, although an alias was given
    # The blob is a KMS ciphertext: KMS Decrypt opens it with the message's encryption
    # context (which includes the SDK's public key pair), and refuses it without.
    opened = store.decrypt(
        ciphertext_blob=edk.encrypted_data_key, encryption_context=header.encryption_context
    )
    assert opened.key_id == key.arn and len(opened.plaintext) == 32
    assert CONTEXT.items() <= header.encryption_context.items()
    with pytest.raises(InvalidCiphertextException):
        store.decrypt(ciphertext_blob=edk.encrypted_data_key, encryption_context=CONTEXT)


def test_aliases_and_key_ids_of_one_key_write_one_data_key(store: KeyStore, key: Key) -> None:
    provider = KeyStoreMasterKeyProvider(store, key_ids=[key.alias, key.key_id, key.arn])
    assert provider.key_arns == (key.arn,)
    assert len(header_of(provider, seal(provider, b"x")).encrypted_data_keys) == 1


def test_each_configured_key_can_open_the_message_alone(store: KeyStore, key: Key) -> None:
    other = store.create_key().key_metadata.arn
    both = KeyStoreMasterKeyProvider(store, key_ids=[key.arn, other])
    message = seal(both, b"for two keys")
    infos = [edk.key_provider.key_info for edk in header_of(both, message).encrypted_data_keys]
    assert sorted(infos) == sorted([key.arn.encode(), other.encode()])  # the SDK orders them its way
    for arn in (key.arn, other):
        assert (
            open_message(KeyStoreMasterKeyProvider(store, key_ids=[arn]), message)
            == b"for two keys"
        )


def test_strict_provider_never_tries_a_key_it_was_not_given(
    store: KeyStore, key: Key, counting: CountingKeyStore
) -> None:
    message = seal(KeyStoreMasterKeyProvider(store, key_ids=[key.arn]), b"secret")
    other = store.create_key().key_metadata.arn
    strict = KeyStoreMasterKeyProvider(counting, key_ids=[other])  # type: ignore[arg-type]
    with pytest.raises(InvalidCiphertextException, match="not a key of this provider"):
        open_message(strict, message)
    assert counting.calls["decrypt"] == 0  # the key is in the same store, yet never asked


def test_discovery_provider_opens_any_key_of_the_store_but_cannot_encrypt(
    store: KeyStore, key: Key
) -> None:
    message = seal(KeyStoreMasterKeyProvider(store, key_ids=[key.arn]), b"found")
    discovery = KeyStoreDiscoveryMasterKeyProvider(store)
    assert open_message(discovery, message) == b"found"
    with pytest.raises(MasterKeyProviderError):
        aws_encryption_sdk.EncryptionSDKClient(
            commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
        ).encrypt(source=b"x", key_provider=discovery)


def test_discovery_provider_ignores_key_arns_of_another_account(store: KeyStore, key: Key) -> None:
    message = seal(KeyStoreMasterKeyProvider(store, key_ids=[key.arn]), b"x")
    foreign_arn = key.arn.replace(":111122223333:", ":444455556666:")
    forged = message.replace(key.arn.encode(), foreign_arn.encode())
    with pytest.raises(InvalidCiphertextException, match="not a key of this provider"):
        open_message(KeyStoreDiscoveryMasterKeyProvider(store), forged)


def test_provider_needs_at_least_one_existing_key(store: KeyStore) -> None:
    with pytest.raises(ValidationException, match="at least one"):
        KeyStoreMasterKeyProvider(store, key_ids=[])
    with pytest.raises(NotFoundException):
        KeyStoreMasterKeyProvider(store, key_ids=["alias/missing"])


def test_tampered_body_is_invalid_ciphertext(store: KeyStore, key: Key) -> None:
    provider = KeyStoreMasterKeyProvider(store, key_ids=[key.arn])
    message = bytearray(seal(provider, b"a" * 5000))
    message[-200] ^= 0x01  # inside the frame / signature footer
    with pytest.raises(InvalidCiphertextException):
        open_message(provider, bytes(message))


def test_tampered_encryption_context_is_refused_by_the_key_store(store: KeyStore, key: Key) -> None:
    provider = KeyStoreMasterKeyProvider(store, key_ids=[key.arn])
    message = seal(provider, b"x", {"a": "1"})
    tampered = message.replace(b"\x00\x01a\x00\x011", b"\x00\x01a\x00\x012", 1)
    assert tampered != message
    with pytest.raises(InvalidCiphertextException, match="InvalidCiphertextException"):
        open_message(provider, tampered)


def test_truncated_message_is_invalid_ciphertext(store: KeyStore, key: Key) -> None:
    provider = KeyStoreMasterKeyProvider(store, key_ids=[key.arn])
    message = seal(provider, b"z" * 200_000)
    with pytest.raises(InvalidCiphertextException):
        open_message(provider, message[: len(message) // 2])


def test_disabled_key_is_named_in_the_decrypt_error(store: KeyStore, key: Key) -> None:
    provider = KeyStoreMasterKeyProvider(store, key_ids=[key.arn])
    message = seal(provider, b"x")
    store.disable_key(key_id=key.arn)
    with pytest.raises(InvalidCiphertextException, match="DisabledException"):
        open_message(provider, message)


def test_missing_expected_context_pair_is_refused_before_any_plaintext(
    store: KeyStore, key: Key
) -> None:
    provider = KeyStoreMasterKeyProvider(store, key_ids=[key.arn])
    message = seal(provider, b"plaintext")
    out = io.BytesIO()
    with pytest.raises(EncryptionContextMismatchError, match="does not contain tenant=8") as caught:
        decrypt_stream(io.BytesIO(message), out, provider, expected_context={"tenant": "8"})
    assert caught.value.missing == {"tenant": "8"}
    assert out.getvalue() == b""


def test_empty_message_round_trips(store: KeyStore, key: Key) -> None:
    provider = KeyStoreMasterKeyProvider(store, key_ids=[key.arn])
    assert open_message(provider, seal(provider, b"", source_length=0)) == b""
