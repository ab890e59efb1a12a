"""Hypothesis properties of decryption and the canonical encryption context.

Complements tests/unit/test_ciphertext.py (random-dict injectivity, blob round trips)
and tests/unit/test_keystore_crypto.py (random blobs without a key id, forged bodies):
here the inputs are adversarial — contexts whose keys and values concatenate to the
same text, bit flips anywhere in a real blob, random bytes with a key id, and random
bytes under an RSA key.
"""

from __future__ import annotations

import itertools
import struct
import uuid

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hsmkeys import ciphertext
from hsmkeys.errors import IncorrectKeyException, InvalidCiphertextException
from hsmkeys.keystore import KeyStore

FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
MAX_CIPHERTEXT = 6144  # Decrypt CiphertextBlob limit; longer is a ValidationException

# Keys and values stress the UTF-8 length prefixes: ASCII, 2-, 3- and 4-byte characters.
texts = st.text(alphabet=st.sampled_from("ab\x00é€😀"), max_size=6)
contexts = st.dictionaries(texts.filter(bool), texts, max_size=4)


def decode_canonical(data: bytes) -> dict[str, str]:
    """Parse canonical_context's output back into the map; raises on any malformed input.

    Its existence (a left inverse over every input) is what makes the encoding injective.
    """
    if not data:
        return {}
    (count,) = struct.unpack_from(">I", data, 0)
    pos, out = 4, {}
    for _ in range(count):
        parts = []
        for _ in range(2):
            (n,) = struct.unpack_from(">I", data, pos)
            parts.append(data[pos + 4 : pos + 4 + n])
            assert len(parts[-1]) == n, "length prefix runs past the end"
            pos += 4 + n
        out[parts[0].decode()] = parts[1].decode()
    assert pos == len(data), "trailing bytes"
    return out


def splits(text: str, cuts: list[int]) -> list[str]:
    """``text`` cut at the sorted positions ``cuts``."""
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def same_text_two_ways(draw: st.DrawFn) -> tuple[dict[str, str], dict[str, str]]:
    """Two different contexts whose keys and values, concatenated in order, are the same text."""
    text = draw(st.text(alphabet=st.sampled_from("abé😀"), min_size=3, max_size=12))
    pairs = draw(st.integers(min_value=1, max_value=min(3, len(text) // 2)))
    # Distinct inner cut points make every part non-empty by construction (KMS context
    # keys must be), so little is filtered out below.
    positions = st.integers(min_value=1, max_value=len(text) - 1)
    result = []
    for _ in range(2):
        cuts = draw(
            st.lists(positions, min_size=2 * pairs - 1, max_size=2 * pairs - 1, unique=True)
        )
        parts = splits(text, cuts)
        keys, values = parts[0::2], parts[1::2]
        assume(all(keys) and len(set(keys)) == len(keys))  # KMS keys are non-empty and unique
        result.append(dict(zip(keys, values, strict=True)))
    assume(result[0] != result[1])
    return result[0], result[1]


# ------------------------------------------------------------------ canonical context


@given(context=contexts)
def test_canonical_context_decodes_back_to_the_same_map(context: dict[str, str]) -> None:
    assert decode_canonical(ciphertext.canonical_context(context)) == context


@given(pair=same_text_two_ways())
def test_contexts_with_the_same_concatenated_text_encode_differently(
    pair: tuple[dict[str, str], dict[str, str]],
) -> None:
    a, b = pair
    assert ciphertext.canonical_context(a) != ciphertext.canonical_context(b)


# ------------------------------------------------------------------ through the KeyStore


@FIXTURE_OK
@given(pair=same_text_two_ways(), plaintext=st.binary(min_size=1, max_size=64))
def test_data_under_one_split_of_a_text_never_decrypts_under_another(
    store: KeyStore, key_id: str, pair: tuple[dict[str, str], dict[str, str]], plaintext: bytes
) -> None:
    a, b = pair
    blob_a = store.encrypt(key_id=key_id, plaintext=plaintext, encryption_context=a).ciphertext_blob
    blob_b = store.encrypt(key_id=key_id, plaintext=plaintext, encryption_context=b).ciphertext_blob
    with pytest.raises(InvalidCiphertextException):
        store.decrypt(ciphertext_blob=blob_a, encryption_context=b)
    with pytest.raises(InvalidCiphertextException):
        store.decrypt(ciphertext_blob=blob_b, encryption_context=a)
    assert store.decrypt(ciphertext_blob=blob_a, encryption_context=a).plaintext == plaintext


@FIXTURE_OK
@given(
    plaintext=st.binary(min_size=1, max_size=64),
    context=contexts,
    position=st.integers(min_value=0),
    bit=st.integers(min_value=0, max_value=7),
)
def test_any_single_bit_flip_in_a_blob_is_invalid_ciphertext(
    store: KeyStore, key_id: str, plaintext: bytes, context: dict[str, str], position: int, bit: int
) -> None:
    blob = bytearray(
        store.encrypt(
            key_id=key_id, plaintext=plaintext, encryption_context=context
        ).ciphertext_blob
    )
    blob[position % len(blob)] ^= 1 << bit
    with pytest.raises(InvalidCiphertextException):
        store.decrypt(ciphertext_blob=bytes(blob), encryption_context=context)


@FIXTURE_OK
@given(data=st.binary(min_size=1, max_size=200), context=contexts)
def test_random_bytes_with_a_key_id_are_invalid_ciphertext_unless_they_name_another_key(
    store: KeyStore, key_id: str, data: bytes, context: dict[str, str]
) -> None:
    # KMS answers IncorrectKeyException for a well-formed blob of another key; for anything
    # else, including random bytes naming this key, only InvalidCiphertextException.
    try:
        names_other_key = uuid.UUID(bytes=ciphertext.unpack(data).key_uuid.bytes) != uuid.UUID(
            key_id
        )
    except InvalidCiphertextException:
        names_other_key = False
    expected = IncorrectKeyException if names_other_key else InvalidCiphertextException
    with pytest.raises(expected):
        store.decrypt(ciphertext_blob=data, key_id=key_id, encryption_context=context)


@pytest.fixture
def rsa_key_id(store: KeyStore) -> str:
    return store.create_key(key_spec="RSA_2048", key_usage="ENCRYPT_DECRYPT").key_metadata.key_id


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(min_size=1, max_size=MAX_CIPHERTEXT), st.binary(min_size=256, max_size=256)
    ),
    algorithm=st.sampled_from(["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]),
)
def test_random_bytes_under_an_rsa_key_are_one_invalid_ciphertext(
    store: KeyStore, rsa_key_id: str, data: bytes, algorithm: str
) -> None:
    with pytest.raises(InvalidCiphertextException) as caught:
        store.decrypt(ciphertext_blob=data, key_id=rsa_key_id, encryption_algorithm=algorithm)
    assert caught.value.message == "The ciphertext is invalid."
