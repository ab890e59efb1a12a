"""Encrypt, Decrypt, ReEncrypt, GenerateDataKey(WithoutPlaintext), GenerateRandom.

Symmetric keys seal into the blob format of :mod:`hsmkeys.ciphertext` inside the HSM;
RSA ENCRYPT_DECRYPT keys go to :mod:`hsmkeys.ops.asymmetric`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from hsmkeys.errors import (
    UnsupportedOperationException,
    ValidationException,
)
from hsmkeys.models import (
    DataKeySpec,
    DecryptResult,
    DryRunModifier,
    EncryptionAlgorithm,
    EncryptResult,
    GenerateDataKeyResult,
    GenerateDataKeyWithoutPlaintextResult,
    GenerateRandomResult,
    KeySpec,
    KeyUsage,
    KeyVersionRef,
    ReEncryptResult,
)
from hsmkeys.ops import asymmetric
from hsmkeys.ops.common import (
    MAX_CIPHERTEXT,
    MAX_PLAINTEXT,
    data_key_master,
    dry_run_error,
    key_material_id,
    require_symmetric_algorithm,
)
from hsmkeys.validation import (
    check_bytes,
    check_context,
    check_enum,
    check_grant_tokens,
    check_int,
    check_present,
    check_str,
)

if TYPE_CHECKING:
    from hsmkeys.call import Call
    from hsmkeys.keystore import KeyStore


def encrypt(
    ks: KeyStore,
    call: Call,
    *,
    key_id: str,
    plaintext: bytes,
    encryption_context: Mapping[str, str] | None = None,
    grant_tokens: Sequence[str] | None = None,
    encryption_algorithm: str | EncryptionAlgorithm | None = None,
    dry_run: bool = False,
) -> EncryptResult:
    data = check_bytes("plaintext", plaintext, min_len=1, max_len=MAX_PLAINTEXT)
    check_grant_tokens(grant_tokens)
    return seal(ks, call, 0, key_id, data, encryption_context, encryption_algorithm, dry_run)[0]


def seal(
    ks: KeyStore,
    call: Call,
    role: int,
    key_id: str,
    data: bytes,
    encryption_context: Mapping[str, str] | None,
    encryption_algorithm: str | EncryptionAlgorithm | None,
    dry_run: bool,
) -> tuple[EncryptResult, KeyVersionRef | None]:
    """Encrypt ``data`` under the key named for the call's ``role`` (symmetric or RSA):
    the result and the key version used (None for RSA)."""
    context = check_context("encryptionContext", encryption_context)
    key = ks._key(call, key_id, role)
    ks._require_enabled(key)
    ks._require_usage(key, KeyUsage.ENCRYPT_DECRYPT)
    if key.spec is not KeySpec.SYMMETRIC_DEFAULT:
        rsa = asymmetric.encrypt_rsa(ks, call, key, data, encryption_algorithm, encryption_context, dry_run=dry_run)
        return rsa, None
    require_symmetric_algorithm(encryption_algorithm)
    if dry_run:
        raise dry_run_error(call.op.name)
    blob, ref = ks._seal(call, key, data, context)
    return EncryptResult(blob, ks._arn(key.key_uuid), EncryptionAlgorithm.SYMMETRIC_DEFAULT), ref


def decrypt(
    ks: KeyStore,
    call: Call,
    *,
    ciphertext_blob: bytes | None = None,  # None only for a dry run with IGNORE_CIPHERTEXT
    encryption_context: Mapping[str, str] | None = None,
    grant_tokens: Sequence[str] | None = None,
    key_id: str | None = None,
    encryption_algorithm: str | EncryptionAlgorithm | None = None,
    dry_run: bool = False,
    dry_run_modifiers: Sequence[str] | None = None,
) -> DecryptResult:
    """Decrypt a blob from encrypt/generate_data_key. Any tampering: InvalidCiphertextException.

    DryRun with DryRunModifiers IGNORE_CIPHERTEXT checks only what the caller may do with
    ``key_id`` (then required): no ciphertext is needed or read.
    """
    check_grant_tokens(grant_tokens)
    if _ignore_ciphertext(dry_run, dry_run_modifiers):
        _dry_run_key(ks, call, 0, key_id, "keyId")
        raise dry_run_error(call.op.name)
    return unseal(ks, call, 0, ciphertext_blob, encryption_context, key_id, encryption_algorithm, dry_run)


def unseal(
    ks: KeyStore,
    call: Call,
    role: int,
    ciphertext_blob: bytes | None,
    encryption_context: Mapping[str, str] | None,
    key_id: str | None,
    encryption_algorithm: str | EncryptionAlgorithm | None,
    dry_run: bool,
) -> DecryptResult:
    """Decrypt for the call's ``role`` (Decrypt, or ReEncrypt's source)."""
    data = check_bytes(
        "ciphertextBlob", check_present("ciphertextBlob", ciphertext_blob), min_len=1, max_len=MAX_CIPHERTEXT
    )
    context = check_context("encryptionContext", encryption_context)
    expected = None
    if key_id is not None:
        expected = ks._key(call, key_id, role)
        ks._require_enabled(expected)
        ks._require_usage(expected, KeyUsage.ENCRYPT_DECRYPT)
        if expected.spec is not KeySpec.SYMMETRIC_DEFAULT:
            return asymmetric.decrypt_rsa(
                ks, call, expected, data, encryption_algorithm, encryption_context, dry_run=dry_run
            )
    require_symmetric_algorithm(encryption_algorithm)
    key, version, plaintext = ks._open(call, data, context, expected, role, dry_run=dry_run)
    if dry_run:  # a named key passed every check; _open stopped before the HSM otherwise
        raise dry_run_error(call.op.name)
    return DecryptResult(
        ks._arn(key.key_uuid),
        plaintext,
        EncryptionAlgorithm.SYMMETRIC_DEFAULT,
        key_version=version,
        key_material_id=key_material_id(KeyVersionRef(key.key_uuid, version)),
    )


def re_encrypt(
    ks: KeyStore,
    call: Call,
    *,
    ciphertext_blob: bytes | None = None,  # None only for a dry run with IGNORE_CIPHERTEXT
    destination_key_id: str,
    source_encryption_context: Mapping[str, str] | None = None,
    source_key_id: str | None = None,
    destination_encryption_context: Mapping[str, str] | None = None,
    source_encryption_algorithm: str | EncryptionAlgorithm | None = None,
    destination_encryption_algorithm: str | EncryptionAlgorithm | None = None,
    grant_tokens: Sequence[str] | None = None,
    dry_run: bool = False,
    dry_run_modifiers: Sequence[str] | None = None,
) -> ReEncryptResult:
    """Decrypt and encrypt again in one call; the plaintext never leaves the KeyStore.

    DryRun with DryRunModifiers IGNORE_CIPHERTEXT checks the source key named by
    ``source_key_id`` (then required) and the destination key, reading no ciphertext.
    """
    check_str("destinationKeyId", destination_key_id, min_len=1, max_len=2048)
    check_grant_tokens(grant_tokens)
    if _ignore_ciphertext(dry_run, dry_run_modifiers):
        _dry_run_key(ks, call, 0, source_key_id, "sourceKeyId")
        # A dry run stops before the plaintext is used: one placeholder byte stands for it.
        seal(ks, call, 1, destination_key_id, b"\x00", destination_encryption_context,
             destination_encryption_algorithm, True)  # fmt: skip
        raise dry_run_error(call.op.name)  # not reached: seal raised it
    source = unseal(
        ks, call, 0, ciphertext_blob, source_encryption_context, source_key_id, source_encryption_algorithm, False
    )
    target, target_ref = seal(
        ks,
        call,
        1,
        destination_key_id,
        source.plaintext,
        destination_encryption_context,
        destination_encryption_algorithm,
        dry_run,
    )
    return ReEncryptResult(
        ciphertext_blob=target.ciphertext_blob,
        source_key_id=source.key_id,
        key_id=target.key_id,
        source_encryption_algorithm=source.encryption_algorithm,
        destination_encryption_algorithm=target.encryption_algorithm,
        source_key_material_id=source.key_material_id,
        destination_key_material_id=key_material_id(target_ref) if target_ref is not None else None,
    )


def _ignore_ciphertext(dry_run: bool, modifiers: Sequence[str] | None) -> bool:
    """Whether DryRunModifiers asks for a dry run without the ciphertext (it applies only
    with DryRun; an unknown modifier is a ValidationException)."""
    if modifiers is None:
        return False
    if isinstance(modifiers, str):
        raise ValidationException("DryRunModifiers must be a list.")
    for modifier in modifiers:
        check_enum(DryRunModifier, "dryRunModifiers", modifier)
    return dry_run and bool(modifiers)


def _dry_run_key(ks: KeyStore, call: Call, role: int, key_id: str | None, field: str) -> None:
    """The checks a call makes on the key it names, for a dry run that reads no ciphertext."""
    if key_id is None:
        raise ValidationException(f"{field} is required when DryRunModifiers is IGNORE_CIPHERTEXT.")
    key = ks._key(call, key_id, role)
    ks._require_enabled(key)
    ks._require_usage(key, KeyUsage.ENCRYPT_DECRYPT)


def _data_key(
    ks: KeyStore,
    call: Call,
    key_id: str,
    key_spec: str | DataKeySpec | None,
    number_of_bytes: int | None,
    encryption_context: Mapping[str, str] | None,
    grant_tokens: Sequence[str] | None,
    dry_run: bool,
) -> tuple[bytes, bytes, str, str]:
    """(plaintext data key, its blob, key ARN, id of the key material that sealed it)."""
    if (key_spec is None) == (number_of_bytes is None):
        raise ValidationException("Specify either KeySpec or NumberOfBytes, but not both.")
    if key_spec is not None:
        size = 16 if check_enum(DataKeySpec, "keySpec", key_spec) is DataKeySpec.AES_128 else 32
    else:
        size = check_int("numberOfBytes", number_of_bytes, low=1, high=1024)
    context = check_context("encryptionContext", encryption_context)
    check_grant_tokens(grant_tokens)
    key = data_key_master(ks, call, key_id, call.op.name)
    if dry_run:
        raise dry_run_error(call.op.name)
    data_key = ks._hsm.random(size)
    blob, ref = ks._seal(call, key, data_key, context)
    return data_key, blob, ks._arn(key.key_uuid), key_material_id(ref)


def generate_data_key(
    ks: KeyStore,
    call: Call,
    *,
    key_id: str,
    encryption_context: Mapping[str, str] | None = None,
    number_of_bytes: int | None = None,
    key_spec: str | DataKeySpec | None = None,
    grant_tokens: Sequence[str] | None = None,
    dry_run: bool = False,
) -> GenerateDataKeyResult:
    """A fresh data key from the HSM RNG, returned in plaintext once and encrypted under the key."""
    plain, blob, arn, material_id = _data_key(
        ks, call, key_id, key_spec, number_of_bytes, encryption_context, grant_tokens, dry_run
    )
    return GenerateDataKeyResult(blob, plain, arn, material_id)


def generate_data_key_without_plaintext(
    ks: KeyStore,
    call: Call,
    *,
    key_id: str,
    encryption_context: Mapping[str, str] | None = None,
    key_spec: str | DataKeySpec | None = None,
    number_of_bytes: int | None = None,
    grant_tokens: Sequence[str] | None = None,
    dry_run: bool = False,
) -> GenerateDataKeyWithoutPlaintextResult:
    _, blob, arn, material_id = _data_key(
        ks, call, key_id, key_spec, number_of_bytes, encryption_context, grant_tokens, dry_run
    )
    return GenerateDataKeyWithoutPlaintextResult(blob, arn, material_id)


def generate_random(
    ks: KeyStore,
    call: Call,
    *,
    number_of_bytes: int | None = None,
    custom_key_store_id: str | None = None,
) -> GenerateRandomResult:
    if number_of_bytes is None:
        raise ValidationException("NumberOfBytes is required.")
    size = check_int("numberOfBytes", number_of_bytes, low=1, high=1024)
    if custom_key_store_id is not None:
        raise UnsupportedOperationException("Custom key stores are not supported")
    return GenerateRandomResult(ks._hsm.random(size))
