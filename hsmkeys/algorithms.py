"""pyca/cryptography objects for each KMS algorithm and curve, shared by the KeyStore and the backends.

Hash and curve objects are stateless descriptions, safe to share.
"""

from __future__ import annotations

from types import MappingProxyType

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding

from hsmkeys.models import EncryptionAlgorithm, KeySpec, MacAlgorithm, SigningAlgorithm

SIGNING_HASHES: MappingProxyType[SigningAlgorithm, hashes.HashAlgorithm] = MappingProxyType(
    {
        SigningAlgorithm.RSASSA_PSS_SHA_256: hashes.SHA256(),
        SigningAlgorithm.RSASSA_PSS_SHA_384: hashes.SHA384(),
        SigningAlgorithm.RSASSA_PSS_SHA_512: hashes.SHA512(),
        SigningAlgorithm.RSASSA_PKCS1_V1_5_SHA_256: hashes.SHA256(),
        SigningAlgorithm.RSASSA_PKCS1_V1_5_SHA_384: hashes.SHA384(),
        SigningAlgorithm.RSASSA_PKCS1_V1_5_SHA_512: hashes.SHA512(),
        SigningAlgorithm.ECDSA_SHA_256: hashes.SHA256(),
        SigningAlgorithm.ECDSA_SHA_384: hashes.SHA384(),
        SigningAlgorithm.ECDSA_SHA_512: hashes.SHA512(),
    }
)
PSS = frozenset(
    {
        SigningAlgorithm.RSASSA_PSS_SHA_256,
        SigningAlgorithm.RSASSA_PSS_SHA_384,
        SigningAlgorithm.RSASSA_PSS_SHA_512,
    }
)
OAEP_HASHES: MappingProxyType[EncryptionAlgorithm, hashes.HashAlgorithm] = MappingProxyType(
    {
        EncryptionAlgorithm.RSAES_OAEP_SHA_1: hashes.SHA1(),
        EncryptionAlgorithm.RSAES_OAEP_SHA_256: hashes.SHA256(),
    }
)
MAC_HASHES: MappingProxyType[MacAlgorithm, hashes.HashAlgorithm] = MappingProxyType(
    {
        MacAlgorithm.HMAC_SHA_224: hashes.SHA224(),
        MacAlgorithm.HMAC_SHA_256: hashes.SHA256(),
        MacAlgorithm.HMAC_SHA_384: hashes.SHA384(),
        MacAlgorithm.HMAC_SHA_512: hashes.SHA512(),
    }
)
#: Keyed by KeySpec; a DataKeyPairSpec of the same name finds the same curve (both are StrEnums).
CURVES: MappingProxyType[str, ec.EllipticCurve] = MappingProxyType(
    {
        KeySpec.ECC_NIST_P256: ec.SECP256R1(),
        KeySpec.ECC_NIST_P384: ec.SECP384R1(),
        KeySpec.ECC_NIST_P521: ec.SECP521R1(),
        KeySpec.ECC_SECG_P256K1: ec.SECP256K1(),
    }
)


def rsa_signature_padding(algorithm: SigningAlgorithm) -> padding.AsymmetricPadding:
    """PSS with MGF1 of the same hash and a salt as long as the digest (as AWS KMS), else PKCS#1 v1.5."""
    if algorithm in PSS:
        hash_alg = SIGNING_HASHES[algorithm]
        return padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size)
    return padding.PKCS1v15()
