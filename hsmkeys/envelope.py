"""Envelope encryption in process: AWS Encryption SDK messages whose data keys a KeyStore wraps.

:class:`KeyStoreMasterKeyProvider` is an Encryption SDK master key provider over a
:class:`~hsmkeys.keystore.KeyStore`, with no HTTP in between. Its encrypted data keys
are exactly those the SDK's ``StrictAwsKmsMasterKeyProvider`` writes through KMS:
provider id ``aws-kms``, the key ARN as key info, the KMS ciphertext blob of
GenerateDataKey/Encrypt as the encrypted data key, the message's encryption context
passed to GenerateDataKey, Encrypt and Decrypt. So a message made here decrypts
through ``hsmkeys serve`` with the SDK's KMS provider, and the other way round::

    provider = KeyStoreMasterKeyProvider(store, key_ids=["alias/app"])
    with open("in", "rb") as src, open("out", "wb") as dst:
        encrypt_stream(src, dst, caching_materials_manager(provider), {"app": "billing"})

Strict, as the SDK's strict KMS provider: decryption uses only the keys the provider was
made with. Aliases and key ids are resolved to key ARNs once, when the provider is made
(make a new provider to follow an alias that was re-pointed).
:class:`KeyStoreDiscoveryMasterKeyProvider` decrypts with any key of the store (for
callers that already hold the PIN, such as the CLI); it cannot encrypt.

Errors: making a provider raises the KeyStore's KMS errors (NotFoundException for an
unknown key). Inside the SDK, a KeyStore's KMS error becomes the SDK's
GenerateKeyError / EncryptKeyError / DecryptKeyError (chained), which the SDK's control
flow needs; :func:`encrypt_stream` and :func:`decrypt_stream` turn SDK errors back into
KMS-named ones (InvalidCiphertextException for a message that does not open,
:class:`EncryptionContextMismatchError` for a missing expected context pair).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING, Any

import attr
from aws_encryption_sdk import CommitmentPolicy, EncryptionSDKClient
from aws_encryption_sdk.caches.local import LocalCryptoMaterialsCache
from aws_encryption_sdk.exceptions import (
    AWSEncryptionSDKClientError,
    DecryptKeyError,
    EncryptKeyError,
    GenerateKeyError,
    IncorrectMasterKeyError,
    InvalidDataKeyError,
    InvalidKeyIdError,
)
from aws_encryption_sdk.internal.str_ops import to_str
from aws_encryption_sdk.key_providers.base import (
    MasterKey,
    MasterKeyConfig,
    MasterKeyProvider,
    MasterKeyProviderConfig,
)
from aws_encryption_sdk.materials_managers.caching import CachingCryptoMaterialsManager
from aws_encryption_sdk.materials_managers.default import DefaultCryptoMaterialsManager
from aws_encryption_sdk.structures import DataKey, EncryptedDataKey, MasterKeyInfo
from cryptography.exceptions import InvalidSignature, InvalidTag

from hsmkeys.errors import InvalidCiphertextException, KMSError, ValidationException

if TYPE_CHECKING:
    from hsmkeys.keystore import KeyStore

__all__ = [
    "DEFAULT_CACHE_CAPACITY",
    "DEFAULT_CACHE_MAX_AGE",
    "DEFAULT_CACHE_MAX_BYTES",
    "DEFAULT_CACHE_MAX_MESSAGES",
    "FRAME_LENGTH",
    "PROVIDER_ID",
    "EncryptionContextMismatchError",
    "KeyStoreDiscoveryMasterKeyProvider",
    "KeyStoreMasterKey",
    "KeyStoreMasterKeyProvider",
    "caching_materials_manager",
    "decrypt_stream",
    "encrypt_stream",
]

#: What the SDK's KMS providers write as provider id; the SDK's KMS providers only try
#: encrypted data keys with exactly this id.
PROVIDER_ID = "aws-kms"

# Cache defaults. Each bounds what one plaintext data key, held in this process's memory,
# can expose, and how long a change made in the key service goes unnoticed here.
#: 5 minutes: a key disabled, revoked or scheduled for deletion stops being used for
#: new messages within 5 minutes, and a data key leaves memory after 5 minutes.
DEFAULT_CACHE_MAX_AGE = 300.0
#: 10,000 messages per data key: 1,000 messages cost 1 GenerateDataKey instead of 1,000,
#: while one leaked data key opens at most 10,000 messages.
DEFAULT_CACHE_MAX_MESSAGES = 10_000
#: 1 GiB per data key: the same blast radius by volume (a message larger than this is
#: never cached: it gets a data key of its own).
DEFAULT_CACHE_MAX_BYTES = 1 << 30
#: 100 entries (LRU): one per (encryption context, algorithm suite) in use, plus the
#: decryption materials of recently read messages.
DEFAULT_CACHE_CAPACITY = 100

#: Plaintext bytes per frame. The SDK's default is 4 KiB; 64 KiB frames cost less per
#: byte (one GCM call and 28 bytes of framing each) and any SDK reads any frame length.
FRAME_LENGTH = 64 * 1024
# The SDK joins a read's frames with bytes concatenation: read a few frames at a time.
_READ_FRAMES = 4

_COMMITMENT = CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT


class EncryptionContextMismatchError(InvalidCiphertextException):
    """The message's encryption context lacks a pair the caller expected (``missing``)."""

    def __init__(self, message: str, missing: Mapping[str, str]) -> None:
        super().__init__(message)
        self.missing = dict(missing)


# ==================================================================== master key


def _context(encryption_context: Mapping[str, str] | None) -> dict[str, str] | None:
    # KMS treats an empty context as none; the SDK's KMS master key sends none then.
    return dict(encryption_context) if encryption_context else None


@attr.s(hash=True)
class KeyStoreMasterKeyConfig(MasterKeyConfig):  # type: ignore[misc]  # the SDK is untyped
    """``key_id`` (the key ARN) and the ``keystore`` that holds the key."""

    provider_id = PROVIDER_ID
    keystore: KeyStore = attr.ib(hash=False, eq=False, repr=False)


class KeyStoreMasterKey(MasterKey):  # type: ignore[misc]
    """One KeyStore key as an SDK master key; its data keys are KMS ciphertext blobs.

    ``KeyStoreMasterKey(key_id=ARN, keystore=store)``. Use the key ARN: the key info
    written is the ARN the KeyStore answers with, and decryption accepts only encrypted
    data keys whose key info equals ``key_id``.
    """

    provider_id = PROVIDER_ID
    _config_class = KeyStoreMasterKeyConfig

    def __init__(self, **kwargs: Any) -> None:  # config is set up by MasterKey.__new__
        self._arn: str = to_str(self.key_id)
        self._keystore: KeyStore = self.config.keystore

    def _generate_data_key(self, algorithm: Any, encryption_context: Mapping[str, str]) -> Any:
        try:
            result = self._keystore.generate_data_key(
                key_id=self._arn,
                number_of_bytes=algorithm.kdf_input_len,
                encryption_context=_context(encryption_context),
            )
        except KMSError as exc:
            raise GenerateKeyError(f"{self._arn}: GenerateDataKey failed: {exc}") from exc
        return DataKey(
            key_provider=MasterKeyInfo(provider_id=self.provider_id, key_info=result.key_id),
            data_key=result.plaintext,
            encrypted_data_key=result.ciphertext_blob,
        )

    def _encrypt_data_key(
        self, data_key: Any, algorithm: Any, encryption_context: Mapping[str, str]
    ) -> Any:
        try:
            result = self._keystore.encrypt(
                key_id=self._arn,
                plaintext=data_key.data_key,
                encryption_context=_context(encryption_context),
            )
        except KMSError as exc:
            raise EncryptKeyError(f"{self._arn}: Encrypt failed: {exc}") from exc
        return EncryptedDataKey(
            key_provider=MasterKeyInfo(provider_id=self.provider_id, key_info=result.key_id),
            encrypted_data_key=result.ciphertext_blob,
        )

    def _decrypt_data_key(
        self, encrypted_data_key: Any, algorithm: Any, encryption_context: Mapping[str, str]
    ) -> Any:
        try:
            result = self._keystore.decrypt(
                ciphertext_blob=encrypted_data_key.encrypted_data_key,
                key_id=self._arn,
                encryption_context=_context(encryption_context),
            )
        except KMSError as exc:
            raise DecryptKeyError(f"{self._arn}: Decrypt failed: {exc}") from exc
        # As the SDK's KMS master key: the answer must come from this key, at the right length.
        if result.key_id != self._arn or len(result.plaintext) != algorithm.data_key_len:
            raise DecryptKeyError(f"{self._arn}: Decrypt answered for another key or length")
        return DataKey(
            key_provider=self.key_provider,
            data_key=result.plaintext,
            encrypted_data_key=encrypted_data_key.encrypted_data_key,
        )


# ==================================================================== providers


class _KeyStoreProvider(MasterKeyProvider):  # type: ignore[misc]
    """Decryption shared by the strict and discovery providers: each encrypted data key
    goes to the one master key that may open it, and a failure names every reason."""

    provider_id = PROVIDER_ID
    vend_masterkey_on_decrypt = False

    def _master_key_for(self, edk: Any) -> KeyStoreMasterKey | None:
        raise NotImplementedError

    def decrypt_data_key(
        self, encrypted_data_key: Any, algorithm: Any, encryption_context: Any
    ) -> Any:
        return self.decrypt_data_key_from_list([encrypted_data_key], algorithm, encryption_context)

    def decrypt_data_key_from_list(
        self, encrypted_data_keys: Any, algorithm: Any, encryption_context: Any
    ) -> Any:
        reasons: list[str] = []
        for edk in encrypted_data_keys:
            info = edk.key_provider
            key = self._master_key_for(edk) if info.provider_id == PROVIDER_ID else None
            if key is None:
                reasons.append(
                    f"{info.provider_id} {to_str(info.key_info)}: not a key of this provider"
                )
                continue
            try:
                return key.decrypt_data_key(edk, algorithm, encryption_context)
            except (DecryptKeyError, IncorrectMasterKeyError, InvalidDataKeyError) as exc:
                reasons.append(str(exc))
        raise DecryptKeyError("no encrypted data key in the message opens: " + "; ".join(reasons))


@attr.s(hash=True)
class KeyStoreMasterKeyProviderConfig(MasterKeyProviderConfig):  # type: ignore[misc]
    keystore: KeyStore = attr.ib(hash=False, eq=False, repr=False)
    key_ids: tuple[str, ...] = attr.ib(default=(), converter=tuple)


class KeyStoreMasterKeyProvider(_KeyStoreProvider):
    """Strict master key provider: encrypts under every key of ``key_ids`` (the first
    generates the data key, the others encrypt it) and decrypts only with those keys.

    ``key_ids`` may be key ids, key ARNs, alias names or alias ARNs; each is resolved to
    its key ARN now (DescribeKey), so a missing key fails here (NotFoundException), and
    an empty list is a ValidationException.
    """

    _config_class = KeyStoreMasterKeyProviderConfig

    def __new__(cls, keystore: KeyStore | None = None, **kwargs: Any) -> KeyStoreMasterKeyProvider:
        if keystore is not None:  # the SDK's base __new__ takes keywords only
            kwargs["keystore"] = keystore
        provider: KeyStoreMasterKeyProvider = super().__new__(cls, **kwargs)
        return provider

    def __init__(self, keystore: KeyStore | None = None, **kwargs: Any) -> None:
        store: KeyStore = self.config.keystore
        if not self.config.key_ids:
            raise ValidationException("key_ids: give at least one key id, key ARN or alias")
        self.key_arns: tuple[str, ...] = tuple(
            dict.fromkeys(
                store.describe_key(key_id=key_id).key_metadata.arn for key_id in self.config.key_ids
            )
        )
        self.add_master_keys_from_list(self.key_arns)

    def _new_master_key(self, key_id: bytes) -> KeyStoreMasterKey:
        arn = to_str(key_id)
        if arn not in self.key_arns:  # strict: no key beyond those configured
            raise InvalidKeyIdError(f"{arn} is not one of this provider's keys")
        return KeyStoreMasterKey(key_id=key_id, keystore=self.config.keystore)

    def _master_key_for(self, edk: Any) -> KeyStoreMasterKey | None:
        key: KeyStoreMasterKey | None = self._encrypt_key_index.get(
            bytes(edk.key_provider.key_info)
        )
        return key


@attr.s(hash=True)
class KeyStoreDiscoveryMasterKeyProviderConfig(MasterKeyProviderConfig):  # type: ignore[misc]
    keystore: KeyStore = attr.ib(hash=False, eq=False, repr=False)


class KeyStoreDiscoveryMasterKeyProvider(_KeyStoreProvider):
    """Decrypt-only provider: opens encrypted data keys written for any key ARN of the
    store's region and account (the SDK's discovery provider with the store's account
    as discovery filter). Encrypting with it raises MasterKeyProviderError."""

    _config_class = KeyStoreDiscoveryMasterKeyProviderConfig

    def __new__(
        cls, keystore: KeyStore | None = None, **kwargs: Any
    ) -> KeyStoreDiscoveryMasterKeyProvider:
        if keystore is not None:
            kwargs["keystore"] = keystore
        provider: KeyStoreDiscoveryMasterKeyProvider = super().__new__(cls, **kwargs)
        return provider

    def __init__(self, keystore: KeyStore | None = None, **kwargs: Any) -> None:
        store: KeyStore = self.config.keystore
        self._prefix = f"arn:aws:kms:{store.region}:{store.account_id}:key/"

    def _new_master_key(self, key_id: bytes) -> KeyStoreMasterKey:
        arn = to_str(key_id)
        tail = arn.removeprefix(self._prefix)
        try:
            canonical = tail != arn and str(uuid.UUID(tail)) == tail
        except ValueError:
            canonical = False
        if not canonical:
            raise InvalidKeyIdError(f"{arn} is not a key ARN of this store ({self._prefix}...)")
        return KeyStoreMasterKey(key_id=key_id, keystore=self.config.keystore)

    def _master_key_for(self, edk: Any) -> KeyStoreMasterKey | None:
        try:
            key: KeyStoreMasterKey = self.master_key_for_decrypt(edk.key_provider.key_info)
        except InvalidKeyIdError:
            return None
        return key


# ==================================================================== caching


def caching_materials_manager(
    provider: MasterKeyProvider,
    *,
    max_age: float = DEFAULT_CACHE_MAX_AGE,
    max_messages: int = DEFAULT_CACHE_MAX_MESSAGES,
    max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
    capacity: int = DEFAULT_CACHE_CAPACITY,
) -> CachingCryptoMaterialsManager:
    """A materials manager that reuses a data key for up to ``max_age`` seconds,
    ``max_messages`` messages and ``max_bytes`` plaintext bytes (the defaults above say
    why), in an LRU cache of ``capacity`` entries; decryption materials are reused for
    ``max_age``. Only messages of known length are cached (the SDK must count bytes):
    pass ``source_length`` for a stream that cannot seek. ValueError for a bound the SDK
    refuses (below 1, or ``max_messages`` above 2**32).
    """
    if capacity < 1:
        raise ValueError("capacity must be at least 1")
    return CachingCryptoMaterialsManager(
        master_key_provider=provider,
        cache=LocalCryptoMaterialsCache(capacity=capacity),
        max_age=float(max_age),
        max_messages_encrypted=max_messages,
        max_bytes_encrypted=max_bytes,
    )


# ==================================================================== streams

#: Called with the number of plaintext bytes processed so far.
Progress = Callable[[int], None]


def _client() -> EncryptionSDKClient:
    return EncryptionSDKClient(commitment_policy=_COMMITMENT)


def _materials(keys: MasterKeyProvider | Any) -> dict[str, Any]:
    if isinstance(keys, MasterKeyProvider):
        return {"materials_manager": DefaultCryptoMaterialsManager(master_key_provider=keys)}
    return {"materials_manager": keys}


class _CountingReader:
    """A read-only view of ``source`` that reports how many bytes were read."""

    def __init__(self, source: IO[bytes], progress: Progress) -> None:
        self._source = source
        self._progress = progress
        self.count = 0
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.count += len(data)
        self._progress(self.count)
        return data


def encrypt_stream(
    source: IO[bytes],
    destination: IO[bytes],
    keys: MasterKeyProvider | CachingCryptoMaterialsManager | Any,
    encryption_context: Mapping[str, str] | None = None,
    *,
    source_length: int | None = None,
    frame_length: int = FRAME_LENGTH,
    progress: Progress | None = None,
) -> Any:
    """Encrypt ``source`` into one SDK message on ``destination``, in constant memory.

    ``keys`` is a master key provider or a materials manager (e.g. from
    :func:`caching_materials_manager`). ``source_length`` (the plaintext size, when
    known) lets the cache account for the message and the SDK refuse a source that
    turns out longer. Returns the message header. Raises the KeyStore's KMS error when
    the data key cannot be made; ValidationException for an encryption context the SDK
    refuses.
    """
    reader: IO[bytes] | _CountingReader = (
        source if progress is None else _CountingReader(source, progress)
    )
    options: dict[str, Any] = {"source_length": source_length} if source_length is not None else {}
    try:
        with _client().stream(
            mode="e",
            source=reader,
            encryption_context=dict(encryption_context or {}),
            frame_length=frame_length,
            **_materials(keys),
            **options,
        ) as encryptor:
            while chunk := encryptor.read(frame_length * _READ_FRAMES):
                destination.write(chunk)
            return encryptor.header
    except (GenerateKeyError, EncryptKeyError) as exc:
        if isinstance(exc.__cause__, KMSError):
            raise exc.__cause__ from None
        raise ValidationException(str(exc)) from None
    except AWSEncryptionSDKClientError as exc:
        raise ValidationException(f"cannot encrypt: {exc}") from None


def _context_text(context: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(context.items())) or "(none)"


def decrypt_stream(
    source: IO[bytes],
    destination: IO[bytes],
    keys: MasterKeyProvider | CachingCryptoMaterialsManager | Any,
    *,
    expected_context: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> Any:
    """Decrypt one SDK message from ``source`` onto ``destination``, in constant memory.

    The header (and its data key) is opened first; if its encryption context lacks a
    pair of ``expected_context``, EncryptionContextMismatchError is raised before any
    plaintext is written. Returns the message header.

    Frames are written as they authenticate; a signed message's signature and a
    truncated message are only detected at its end. Callers must discard what was
    written when this raises (InvalidCiphertextException: tampered, truncated, not a
    message, or no data key opens with ``keys``).
    """
    reader: IO[bytes] | _CountingReader = (
        source if progress is None else _CountingReader(source, progress)
    )
    try:
        # No ``with``: closing a half-read decryptor logs a traceback; it holds nothing to free.
        decryptor = _client().stream(mode="d", source=reader, **_materials(keys))
        header = decryptor.header
        stored = header.encryption_context
        missing = {k: v for k, v in (expected_context or {}).items() if stored.get(k) != v}
        if missing:
            shown = {k: v for k, v in stored.items() if not k.startswith("aws-crypto-")}
            raise EncryptionContextMismatchError(
                f"the message's encryption context is {_context_text(shown)}; "
                f"it does not contain {_context_text(missing)}",
                missing,
            )
        read_size = max(header.frame_length, 1) * _READ_FRAMES
        while chunk := decryptor.read(read_size):
            destination.write(chunk)
        decryptor.close()  # raises if the footer (signature) was never read
        return header
    except (AWSEncryptionSDKClientError, InvalidTag, InvalidSignature) as exc:
        detail = str(exc) or type(exc).__name__
        raise InvalidCiphertextException(f"not a valid message for these keys: {detail}") from None
