"""Client side of BYOK for the import tests: wrap material as an AWS KMS user would."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding


def wrap(wrapping_spki: bytes, algorithm: str, material: bytes) -> bytes:
    public = serialization.load_der_public_key(wrapping_spki)
    assert isinstance(public, rsa.RSAPublicKey)
    hash_type = hashes.SHA256 if algorithm.endswith("SHA_256") else hashes.SHA1
    oaep = padding.OAEP(mgf=padding.MGF1(hash_type()), algorithm=hash_type(), label=None)
    if algorithm.startswith("RSAES_OAEP"):
        return public.encrypt(material, oaep)
    ephemeral = os.urandom(32)
    return public.encrypt(ephemeral, oaep) + aes_key_wrap_with_padding(ephemeral, material)


def pkcs8(private: object) -> bytes:
    assert hasattr(private, "private_bytes")
    der: bytes = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return der


def spki(public: object) -> bytes:
    assert hasattr(public, "public_bytes")
    der: bytes = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der
