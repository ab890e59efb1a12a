"""Key material for imported (origin EXTERNAL) keys: read and check it, wrap it for import.

Symmetric and HMAC keys are raw bytes, wrapped with RSAES_OAEP_SHA_256 (SHA-1 where the HSM lacks it). RSA and ECC
private keys are PKCS#8 (PEM or DER), wrapped with RSA_AES_KEY_WRAP_SHA_256: a fresh
AES-256 key wrapped by RSA-OAEP-SHA-256, followed by the PKCS#8 DER wrapped under it
with AES key wrap with padding (RFC 5649), as AWS KMS documents.

The material never appears in a repr, a message or a log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

__all__ = ["KeyMaterial", "load_key_material", "wrap_key_material"]

#: Raw key sizes AWS KMS accepts for imported symmetric and HMAC keys (bytes, inclusive).
_RAW_SIZES = {
    "SYMMETRIC_DEFAULT": (32, 32),
    "HMAC_224": (28, 64),
    "HMAC_256": (32, 64),
    "HMAC_384": (48, 128),
    "HMAC_512": (64, 128),
}
_RSA_BITS = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
_CURVES = {
    "ECC_NIST_P256": "secp256r1",
    "ECC_NIST_P384": "secp384r1",
    "ECC_NIST_P521": "secp521r1",
    "ECC_SECG_P256K1": "secp256k1",
}


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """Checked key material: raw bytes (symmetric/HMAC) or PKCS#8 DER (private keys)."""

    data: bytes = field(repr=False)
    is_private_key: bool

    @property
    def wrapping_algorithms(self) -> tuple[str, ...]:
        """Preferred first: SHA-256 (AWS's advice); SHA-1 for HSMs whose C_UnwrapKey lacks
        SHA-256 OAEP (SoftHSM2), which the server refuses up front."""
        if self.is_private_key:
            return ("RSA_AES_KEY_WRAP_SHA_256", "RSA_AES_KEY_WRAP_SHA_1")
        return ("RSAES_OAEP_SHA_256", "RSA_AES_KEY_WRAP_SHA_256", "RSAES_OAEP_SHA_1", "RSA_AES_KEY_WRAP_SHA_1")


def load_key_material(path: Path, spec: str) -> KeyMaterial:
    """The material in ``path`` for a key of ``spec``. Raises ValueError naming what is wrong
    (never showing the material)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if spec in _RAW_SIZES:
        low, high = _RAW_SIZES[spec]
        if not low <= len(data) <= high:
            size = f"{low}" if low == high else f"{low}-{high}"
            raise ValueError(f"{path}: {spec} key material must be {size} raw bytes, the file has {len(data)}")
        return KeyMaterial(data, is_private_key=False)
    if spec not in _RSA_BITS and spec not in _CURVES:
        raise ValueError(f"importing key material for {spec} is not supported")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"{path}: not an unencrypted PKCS#8 private key (PEM or DER)") from None
    if spec in _RSA_BITS:
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != _RSA_BITS[spec]:
            raise ValueError(f"{path}: {spec} needs an RSA {_RSA_BITS[spec]}-bit private key")
    elif not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != _CURVES[spec]:
        raise ValueError(f"{path}: {spec} needs an EC private key on {_CURVES[spec]}")
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return KeyMaterial(der, is_private_key=True)


def wrap_key_material(material: KeyMaterial, wrapping_public_key_der: bytes, algorithm: str) -> bytes:
    """``material`` encrypted for ImportKeyMaterial by ``algorithm`` under the public key
    GetParametersForImport returned (DER SubjectPublicKeyInfo)."""
    public_key = serialization.load_der_public_key(wrapping_public_key_der)
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError("the wrapping key from GetParametersForImport is not an RSA public key")
    digest = hashes.SHA256() if algorithm.endswith("SHA_256") else hashes.SHA1()
    oaep = padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=None)
    if algorithm.startswith("RSAES_OAEP"):
        return public_key.encrypt(material.data, oaep)
    aes_key = os.urandom(32)
    return public_key.encrypt(aes_key, oaep) + aes_key_wrap_with_padding(aes_key, material.data)
