"""caching_materials_manager: data keys reused within their bounds, proven by counting
the KeyStore's GenerateDataKey / Decrypt calls."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from types import SimpleNamespace

import aws_encryption_sdk.caches
import pytest

from hsmkeys.envelope import (
    DEFAULT_CACHE_MAX_AGE,
    DEFAULT_CACHE_MAX_BYTES,
    DEFAULT_CACHE_MAX_MESSAGES,
    KeyStoreMasterKeyProvider,
    caching_materials_manager,
    decrypt_stream,
    encrypt_stream,
)

from .conftest import CountingKeyStore, Key

CONTEXT = {"app": "cache-test"}


class FakeTime:
    """Stands in for the ``time`` module the SDK's cache entries read their age from."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTime]:
    clock = FakeTime()
    monkeypatch.setattr(aws_encryption_sdk.caches, "time", SimpleNamespace(time=clock.time))
    yield clock


@pytest.fixture
def provider(counting: CountingKeyStore, key: Key) -> KeyStoreMasterKeyProvider:
    return KeyStoreMasterKeyProvider(counting, key_ids=[key.arn])  # type: ignore[arg-type]


def encrypt(keys: object, data: bytes, context: dict[str, str] = CONTEXT) -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out, keys, context, source_length=len(data))
    return out.getvalue()


def test_defaults_are_five_minutes_ten_thousand_messages_one_gib() -> None:
    assert (DEFAULT_CACHE_MAX_AGE, DEFAULT_CACHE_MAX_MESSAGES, DEFAULT_CACHE_MAX_BYTES) == (
        300.0,
        10_000,
        1 << 30,
    )


def test_cache_makes_one_data_key_for_many_messages(
    provider: KeyStoreMasterKeyProvider, counting: CountingKeyStore
) -> None:
    cmm = caching_materials_manager(provider)
    messages = [encrypt(cmm, b"m%d" % i) for i in range(50)]
    assert counting.calls["generate_data_key"] == 1
    headers = [decrypt_stream(io.BytesIO(m), io.BytesIO(), provider) for m in messages]
    edks = {edk.encrypted_data_key for h in headers for edk in h.encrypted_data_keys}
    assert len(edks) == 1  # every message carries the same encrypted data key
    assert len({h.message_id for h in headers}) == 50  # in messages of their own


def test_without_cache_every_message_makes_a_data_key(
    provider: KeyStoreMasterKeyProvider, counting: CountingKeyStore
) -> None:
    for i in range(20):
        encrypt(provider, b"m%d" % i)
    assert counting.calls["generate_data_key"] == 20


@pytest.mark.parametrize("max_messages", [1, 3, 4])
def test_a_data_key_encrypts_at_most_max_messages(
    provider: KeyStoreMasterKeyProvider, counting: CountingKeyStore, max_messages: int
) -> None:
    cmm = caching_materials_manager(provider, max_messages=max_messages)
    for i in range(10):
        encrypt(cmm, b"m%d" % i)
    assert counting.calls["generate_data_key"] == math.ceil(10 / max_messages)


def test_a_data_key_encrypts_at_most_max_bytes(
    provider: KeyStoreMasterKeyProvider, counting: CountingKeyStore
) -> None:
    cmm = caching_materials_manager(provider, max_bytes=1000)
    for _ in range(6):
        encrypt(cmm, b"b" * 400)  # two messages (800 bytes) fit, a third would not
    assert counting.calls["generate_data_key"] == 3


def test_a_message_as_large_as_max_bytes_gets_its_own_data_key(
    provider: KeyStoreMasterKeyProvider, counting: CountingKeyStore
) -> None:
    cmm = caching_materials_manager(provider, max_bytes=1000)
    for _ in range(3):
        encrypt(cmm, b"b" * 1000)
    assert counting.calls["generate_data_key"] == 3


def test_a_data_key_is_not_used_after_max_age(
    provider: KeyStoreMasterKeyProvider, counting: CountingKeyStore, fake_time: FakeTime
) -> None:
    cmm = caching_materials_manager(provider, max_age=300.0)
    encrypt(cmm, b"1")
    fake_time.now += 299.0
    encrypt(cmm, b"2")
    assert counting.calls["generate_data_key"] == 1
    fake_time.now += 2.0  # 301 s after the data key was made
    encrypt(cmm, b"3")
    assert counting.calls["generate_data_key"] == 2


def test_each_encryption_context_has_its_own_data_key(
    provider: KeyStoreMasterKeyProvider, counting: CountingKeyStore
) -> None:
    cmm = caching_materials_manager(provider)
    for tenant in ("a", "b", "a", "b"):
        encrypt(cmm, b"x", {"tenant": tenant})
    assert counting.calls["generate_data_key"] == 2


def test_stream_of_unknown_length_is_never_cached(
    provider: KeyStoreMasterKeyProvider, counting: CountingKeyStore
) -> None:
    class Pipe:  # no tell/seek: the SDK cannot count the message's bytes in advance
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)
            self.closed = False

        def read(self, size: int = -1) -> bytes:
            return self._data.read(size)

    cmm = caching_materials_manager(provider)
    for _ in range(3):
        encrypt_stream(Pipe(b"abc"), io.BytesIO(), cmm, CONTEXT)  # type: ignore[arg-type]
    assert counting.calls["generate_data_key"] == 3


def test_decryption_reuses_the_data_key_until_max_age(
    provider: KeyStoreMasterKeyProvider, counting: CountingKeyStore, fake_time: FakeTime
) -> None:
    cmm = caching_materials_manager(provider, max_age=60.0)
    messages = [encrypt(cmm, b"m%d" % i) for i in range(5)]
    for message in messages:
        assert decrypt_stream(io.BytesIO(message), io.BytesIO(), cmm) is not None
    assert counting.calls["decrypt"] == 1
    fake_time.now += 61.0
    decrypt_stream(io.BytesIO(messages[0]), io.BytesIO(), cmm)
    assert counting.calls["decrypt"] == 2


def test_bounds_the_sdk_refuses_are_value_errors(provider: KeyStoreMasterKeyProvider) -> None:
    for bad in (
        {"max_age": 0.0},
        {"max_messages": 0},
        {"max_messages": 2**32 + 1},
        {"capacity": 0},
    ):
        with pytest.raises(ValueError):
            caching_materials_manager(provider, **bad)
