"""The blob format and canonical encryption context: known answers and properties."""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hsmkeys import ciphertext
from hsmkeys.errors import InvalidCiphertextException

VECTORS = Path(__file__).resolve().parent.parent / "vectors"


def load_vectors(name: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((VECTORS / name).read_text(encoding="utf-8"))["vectors"]
    return data


@pytest.mark.parametrize("vector", load_vectors("canonical_context.json"))
def test_canonical_context_known_answers(vector: dict[str, Any]) -> None:
    assert ciphertext.canonical_context(vector["context"]).hex() == vector["hex"]


@pytest.mark.parametrize("vector", load_vectors("blob_header.json"))
def test_blob_header_known_answers(vector: dict[str, Any]) -> None:
    header = ciphertext.header(uuid.UUID(vector["key_uuid"]), vector["version"], bytes.fromhex(vector["iv"]))
    assert header.hex() == vector["hex"]
    blob = ciphertext.unpack(header + b"\x00" * ciphertext.TAG_LEN)
    assert str(blob.key_uuid) == vector["key_uuid"]
    assert blob.version == vector["version"]


contexts = st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4)


@given(a=contexts, b=contexts)
def test_canonical_context_is_injective(a: dict[str, str], b: dict[str, str]) -> None:
    if a != b:
        assert ciphertext.canonical_context(a) != ciphertext.canonical_context(b)
    else:
        assert ciphertext.canonical_context(a) == ciphertext.canonical_context(b)


@given(
    key_uuid=st.uuids(),
    version=st.integers(min_value=1, max_value=2**32 - 1),
    iv=st.binary(min_size=12, max_size=12),
    body=st.binary(min_size=16, max_size=64),
)
def test_pack_unpack_round_trip(key_uuid: uuid.UUID, version: int, iv: bytes, body: bytes) -> None:
    blob = ciphertext.unpack(ciphertext.header(key_uuid, version, iv) + body)
    assert (blob.key_uuid, blob.version, blob.iv, blob.body) == (key_uuid, version, iv, body)


@given(data=st.binary(max_size=80))
def test_unpack_rejects_only_with_invalid_ciphertext(data: bytes) -> None:
    with contextlib.suppress(InvalidCiphertextException):
        ciphertext.unpack(data)


def test_unpack_rejects_wrong_format_version_and_version_zero() -> None:
    good = ciphertext.header(uuid.uuid4(), 1, b"\x00" * 12) + b"\x00" * 16
    with pytest.raises(InvalidCiphertextException):
        ciphertext.unpack(b"\x02" + good[1:])
    with pytest.raises(InvalidCiphertextException):
        ciphertext.unpack(good[:17] + b"\x00\x00\x00\x00" + good[21:])
