"""MemoryHsm import: what only the in-process backend does (SHA-256 wrapping, exact HMAC lengths)."""

from __future__ import annotations

import hmac
import os
import uuid

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from cryptography.hazmat.primitives.serialization import load_der_public_key

from hsmkeys.errors import IncorrectKeyMaterialException
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.models import KeySpec, KeyUsage, KeyVersionRef, MacAlgorithm


def wrap(spki: bytes, algorithm: str, material: bytes) -> bytes:
    public = load_der_public_key(spki)
    assert isinstance(public, rsa.RSAPublicKey)
    h = hashes.SHA256 if algorithm.endswith("SHA_256") else hashes.SHA1
    oaep = padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None)
    if algorithm.startswith("RSAES_OAEP"):
        return public.encrypt(material, oaep)
    ephemeral = os.urandom(32)
    return public.encrypt(ephemeral, oaep) + aes_key_wrap_with_padding(ephemeral, material)


@pytest.fixture(scope="module")
def memory() -> tuple[MemoryHsm, KeyVersionRef, bytes]:
    hsm = MemoryHsm()
    wrapping = KeyVersionRef(uuid.uuid4(), 1)
    return hsm, wrapping, hsm.create_wrapping_key(wrapping, "RSA_2048")


@pytest.mark.parametrize("algorithm", ["RSAES_OAEP_SHA_256", "RSA_AES_KEY_WRAP_SHA_256"])
def test_sha256_wrapped_hmac_key_gives_pythons_tag(memory: tuple[MemoryHsm, KeyVersionRef, bytes], algorithm: str) -> None:
    hsm, wrapping, public = memory
    key, ref = os.urandom(48), KeyVersionRef(uuid.uuid4(), 1)
    hsm.import_key(ref, KeySpec.HMAC_384, KeyUsage.GENERATE_VERIFY_MAC, wrapping, algorithm, wrap(public, algorithm, key))
    assert hsm.mac(ref, MacAlgorithm.HMAC_SHA_384, b"m") == hmac.new(key, b"m", "sha384").digest()


@pytest.mark.parametrize(("spec", "length"), [(KeySpec.HMAC_224, 27), (KeySpec.HMAC_256, 31), (KeySpec.HMAC_512, 129)])
def test_hmac_length_outside_the_aws_range_is_incorrect_key_material(
    memory: tuple[MemoryHsm, KeyVersionRef, bytes], spec: KeySpec, length: int
) -> None:
    hsm, wrapping, public = memory
    ref = KeyVersionRef(uuid.uuid4(), 1)
    wrapped = wrap(public, "RSA_AES_KEY_WRAP_SHA_1", os.urandom(length))
    with pytest.raises(IncorrectKeyMaterialException):
        hsm.import_key(ref, spec, KeyUsage.GENERATE_VERIFY_MAC, wrapping, "RSA_AES_KEY_WRAP_SHA_1", wrapped)
    assert not hsm.has_key(ref)
