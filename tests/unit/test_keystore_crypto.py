"""Symmetric encryption, envelope operations and ciphertext integrity."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsmkeys import ciphertext
from hsmkeys.errors import (
    DisabledException,
    IncorrectKeyException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    NotFoundException,
    ValidationException,
)
from hsmkeys.keystore import KeyStore

ARN_PREFIX = "arn:aws:kms:us-east-1:111122223333:key/"


def test_encrypt_decrypt_round_trip_returns_plaintext_and_key_arn(store: KeyStore, key_id: str) -> None:
    enc = store.encrypt(key_id=key_id, plaintext=b"attack at dawn")
    assert enc.key_id == ARN_PREFIX + key_id
    assert enc.encryption_algorithm == "SYMMETRIC_DEFAULT"
    dec = store.decrypt(ciphertext_blob=enc.ciphertext_blob)
    assert dec.plaintext == b"attack at dawn"
    assert dec.key_id == ARN_PREFIX + key_id


def test_blob_header_names_key_and_version(store: KeyStore, key_id: str) -> None:
    blob = store.encrypt(key_id=key_id, plaintext=b"x").ciphertext_blob
    parsed = ciphertext.unpack(blob)
    assert str(parsed.key_uuid) == key_id
    assert parsed.version == 1
    assert len(blob) == ciphertext.HEADER_LEN + 1 + ciphertext.TAG_LEN


def test_two_encryptions_of_the_same_plaintext_differ(store: KeyStore, key_id: str) -> None:
    a = store.encrypt(key_id=key_id, plaintext=b"same").ciphertext_blob
    b = store.encrypt(key_id=key_id, plaintext=b"same").ciphertext_blob
    assert a != b


def test_encrypt_accepts_key_arn_alias_and_alias_arn(store: KeyStore, key_id: str) -> None:
    store.create_alias(alias_name="alias/app", target_key_id=key_id)
    for ident in (ARN_PREFIX + key_id, "alias/app", "arn:aws:kms:us-east-1:111122223333:alias/app"):
        blob = store.encrypt(key_id=ident, plaintext=b"p").ciphertext_blob
        assert store.decrypt(ciphertext_blob=blob).plaintext == b"p"


@pytest.mark.parametrize(
    "enc_ctx, dec_ctx",
    [
        ({"purpose": "test"}, None),
        ({"purpose": "test"}, {"purpose": "other"}),
        ({"purpose": "test"}, {"purpose": "test", "extra": "1"}),
        (None, {"purpose": "test"}),
        ({"a": "bc"}, {"ab": "c"}),
        ({"ab": "c"}, {"a": "bc"}),
    ],
)
def test_decrypt_with_other_context_is_invalid_ciphertext(
    store: KeyStore, key_id: str, enc_ctx: dict[str, str] | None, dec_ctx: dict[str, str] | None
) -> None:
    blob = store.encrypt(key_id=key_id, plaintext=b"secret", encryption_context=enc_ctx).ciphertext_blob
    with pytest.raises(InvalidCiphertextException):
        store.decrypt(ciphertext_blob=blob, encryption_context=dec_ctx)


def test_context_order_does_not_matter(store: KeyStore, key_id: str) -> None:
    blob = store.encrypt(key_id=key_id, plaintext=b"s", encryption_context={"a": "1", "b": "2"}).ciphertext_blob
    assert store.decrypt(ciphertext_blob=blob, encryption_context={"b": "2", "a": "1"}).plaintext == b"s"


@pytest.mark.parametrize("offset", [0, 1, 16, 17, 20, 21, 32, 33, -1, -16])
def test_any_altered_byte_is_invalid_ciphertext(store: KeyStore, key_id: str, offset: int) -> None:
    blob = bytearray(store.encrypt(key_id=key_id, plaintext=b"payload").ciphertext_blob)
    blob[offset] ^= 0x01
    with pytest.raises(InvalidCiphertextException):
        store.decrypt(ciphertext_blob=bytes(blob))


@pytest.mark.parametrize("keep", [1, 20, 33, 48, -1])
def test_truncated_blob_is_invalid_ciphertext(store: KeyStore, key_id: str, keep: int) -> None:
    blob = store.encrypt(key_id=key_id, plaintext=b"payload").ciphertext_blob
    with pytest.raises(InvalidCiphertextException):
        store.decrypt(ciphertext_blob=blob[:keep])


def test_decrypt_with_other_key_id_is_incorrect_key(store: KeyStore, key_id: str) -> None:
    other = store.create_key().key_metadata.key_id
    blob = store.encrypt(key_id=key_id, plaintext=b"p").ciphertext_blob
    with pytest.raises(IncorrectKeyException):
        store.decrypt(ciphertext_blob=blob, key_id=other)
    assert store.decrypt(ciphertext_blob=blob, key_id=key_id).plaintext == b"p"


def test_disabled_key_refuses_encrypt_and_decrypt(store: KeyStore, key_id: str) -> None:
    blob = store.encrypt(key_id=key_id, plaintext=b"p").ciphertext_blob
    store.disable_key(key_id=key_id)
    with pytest.raises(DisabledException):
        store.encrypt(key_id=key_id, plaintext=b"p")
    with pytest.raises(DisabledException):
        store.decrypt(ciphertext_blob=blob)
    store.enable_key(key_id=key_id)
    assert store.decrypt(ciphertext_blob=blob).plaintext == b"p"


@pytest.mark.parametrize("plaintext", [b"", b"x" * 4097])
def test_plaintext_outside_1_to_4096_bytes_is_validation_error(
    store: KeyStore, key_id: str, plaintext: bytes
) -> None:
    with pytest.raises(ValidationException):
        store.encrypt(key_id=key_id, plaintext=plaintext)


def test_plaintext_of_4096_bytes_round_trips(store: KeyStore, key_id: str) -> None:
    blob = store.encrypt(key_id=key_id, plaintext=b"x" * 4096).ciphertext_blob
    assert store.decrypt(ciphertext_blob=blob).plaintext == b"x" * 4096


def test_ciphertext_over_6144_bytes_is_validation_error(store: KeyStore) -> None:
    with pytest.raises(ValidationException):
        store.decrypt(ciphertext_blob=b"\x01" * 6145)


def test_rsa_algorithm_on_symmetric_key_is_invalid_key_usage(store: KeyStore, key_id: str) -> None:
    with pytest.raises(InvalidKeyUsageException):
        store.encrypt(key_id=key_id, plaintext=b"p", encryption_algorithm="RSAES_OAEP_SHA_256")


def test_unknown_encryption_algorithm_is_validation_error(store: KeyStore, key_id: str) -> None:
    with pytest.raises(ValidationException):
        store.encrypt(key_id=key_id, plaintext=b"p", encryption_algorithm="ROT13")


@pytest.mark.parametrize(
    "ident", ["", "not-a-key", "alias/missing", "arn:aws:kms:eu-west-1:111122223333:key/" + "0" * 8]
)
def test_unknown_key_ids_are_not_found_or_validation(store: KeyStore, ident: str) -> None:
    with pytest.raises((NotFoundException, ValidationException)):
        store.encrypt(key_id=ident, plaintext=b"p")


def test_missing_well_formed_key_is_not_found(store: KeyStore) -> None:
    with pytest.raises(NotFoundException):
        store.encrypt(key_id="11111111-2222-3333-4444-555555555555", plaintext=b"p")


# ------------------------------------------------------------------ data keys


@pytest.mark.parametrize("spec, size", [("AES_128", 16), ("AES_256", 32)])
def test_generate_data_key_by_spec_decrypts_to_the_plaintext(
    store: KeyStore, key_id: str, spec: str, size: int
) -> None:
    dk = store.generate_data_key(key_id=key_id, key_spec=spec, encryption_context={"k": "v"})
    assert len(dk.plaintext) == size
    back = store.decrypt(ciphertext_blob=dk.ciphertext_blob, encryption_context={"k": "v"})
    assert back.plaintext == dk.plaintext


@pytest.mark.parametrize("n", [1, 1024])
def test_generate_data_key_number_of_bytes_limits_accepted(store: KeyStore, key_id: str, n: int) -> None:
    assert len(store.generate_data_key(key_id=key_id, number_of_bytes=n).plaintext) == n


@pytest.mark.parametrize("n", [0, 1025, -1])
def test_generate_data_key_number_of_bytes_out_of_range_is_validation_error(
    store: KeyStore, key_id: str, n: int
) -> None:
    with pytest.raises(ValidationException):
        store.generate_data_key(key_id=key_id, number_of_bytes=n)


def test_generate_data_key_needs_exactly_one_of_spec_and_size(store: KeyStore, key_id: str) -> None:
    with pytest.raises(ValidationException):
        store.generate_data_key(key_id=key_id)
    with pytest.raises(ValidationException):
        store.generate_data_key(key_id=key_id, key_spec="AES_256", number_of_bytes=32)
    with pytest.raises(ValidationException):
        store.generate_data_key(key_id=key_id, key_spec="AES_512")


def test_generate_data_key_without_plaintext_decrypts(store: KeyStore, key_id: str) -> None:
    dk = store.generate_data_key_without_plaintext(key_id=key_id, key_spec="AES_256")
    assert not hasattr(dk, "plaintext")
    assert len(store.decrypt(ciphertext_blob=dk.ciphertext_blob).plaintext) == 32


def test_generate_random_lengths(store: KeyStore) -> None:
    assert len(store.generate_random(number_of_bytes=1).plaintext) == 1
    assert len(store.generate_random(number_of_bytes=1024).plaintext) == 1024
    for bad in (0, 1025, None):
        with pytest.raises(ValidationException):
            store.generate_random(number_of_bytes=bad)


def test_re_encrypt_moves_ciphertext_to_another_key_and_context(store: KeyStore, key_id: str) -> None:
    dest = store.create_key().key_metadata.key_id
    blob = store.encrypt(key_id=key_id, plaintext=b"move me", encryption_context={"a": "1"}).ciphertext_blob
    res = store.re_encrypt(
        ciphertext_blob=blob,
        source_encryption_context={"a": "1"},
        destination_key_id=dest,
        destination_encryption_context={"b": "2"},
    )
    assert res.source_key_id == ARN_PREFIX + key_id
    assert res.key_id == ARN_PREFIX + dest
    with pytest.raises(InvalidCiphertextException):
        store.decrypt(ciphertext_blob=res.ciphertext_blob, encryption_context={"a": "1"})
    assert store.decrypt(ciphertext_blob=res.ciphertext_blob, encryption_context={"b": "2"}).plaintext == b"move me"


def test_re_encrypt_with_wrong_source_context_is_invalid_ciphertext(store: KeyStore, key_id: str) -> None:
    blob = store.encrypt(key_id=key_id, plaintext=b"p", encryption_context={"a": "1"}).ciphertext_blob
    with pytest.raises(InvalidCiphertextException):
        store.re_encrypt(ciphertext_blob=blob, destination_key_id=key_id)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=200))
def test_random_bytes_to_decrypt_only_ever_raise_invalid_ciphertext(
    store: KeyStore, key_id: str, data: bytes
) -> None:
    with pytest.raises(InvalidCiphertextException):
        store.decrypt(ciphertext_blob=data)


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(min_size=1, max_size=4096),
    context=st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=20), max_size=5),
)
def test_encrypt_decrypt_round_trip_property(
    store: KeyStore, key_id: str, data: bytes, context: dict[str, str]
) -> None:
    blob = store.encrypt(key_id=key_id, plaintext=data, encryption_context=context).ciphertext_blob
    assert store.decrypt(ciphertext_blob=blob, encryption_context=context).plaintext == data


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=ciphertext.MIN_BLOB_LEN, max_size=200))
def test_random_blobs_naming_a_real_key_are_invalid_ciphertext(
    store: KeyStore, key_id: str, data: bytes
) -> None:
    real = ciphertext.unpack(store.encrypt(key_id=key_id, plaintext=b"p").ciphertext_blob)
    forged = real.header[:21] + data[21:]
    with pytest.raises(InvalidCiphertextException):
        store.decrypt(ciphertext_blob=forged)
