"""What each key spec allows, as AWS KMS defines it: usages, algorithms, sizes."""

from __future__ import annotations

from types import MappingProxyType

from hsmkeys.models import (
    EncryptionAlgorithm,
    KeyAgreementAlgorithm,
    KeySpec,
    KeyUsage,
    MacAlgorithm,
    SigningAlgorithm,
)

_RSA_SIGNING = (
    SigningAlgorithm.RSASSA_PSS_SHA_256,
    SigningAlgorithm.RSASSA_PSS_SHA_384,
    SigningAlgorithm.RSASSA_PSS_SHA_512,
    SigningAlgorithm.RSASSA_PKCS1_V1_5_SHA_256,
    SigningAlgorithm.RSASSA_PKCS1_V1_5_SHA_384,
    SigningAlgorithm.RSASSA_PKCS1_V1_5_SHA_512,
)
_RSA_ENCRYPTION = (EncryptionAlgorithm.RSAES_OAEP_SHA_1, EncryptionAlgorithm.RSAES_OAEP_SHA_256)

#: Usages KMS allows for each spec; the first is the default only for SYMMETRIC_DEFAULT.
ALLOWED_USAGES: MappingProxyType[KeySpec, tuple[KeyUsage, ...]] = MappingProxyType(
    {
        KeySpec.SYMMETRIC_DEFAULT: (KeyUsage.ENCRYPT_DECRYPT,),
        KeySpec.RSA_2048: (KeyUsage.ENCRYPT_DECRYPT, KeyUsage.SIGN_VERIFY),
        KeySpec.RSA_3072: (KeyUsage.ENCRYPT_DECRYPT, KeyUsage.SIGN_VERIFY),
        KeySpec.RSA_4096: (KeyUsage.ENCRYPT_DECRYPT, KeyUsage.SIGN_VERIFY),
        KeySpec.ECC_NIST_P256: (KeyUsage.SIGN_VERIFY, KeyUsage.KEY_AGREEMENT),
        KeySpec.ECC_NIST_P384: (KeyUsage.SIGN_VERIFY, KeyUsage.KEY_AGREEMENT),
        KeySpec.ECC_NIST_P521: (KeyUsage.SIGN_VERIFY, KeyUsage.KEY_AGREEMENT),
        KeySpec.ECC_SECG_P256K1: (KeyUsage.SIGN_VERIFY,),
        KeySpec.HMAC_224: (KeyUsage.GENERATE_VERIFY_MAC,),
        KeySpec.HMAC_256: (KeyUsage.GENERATE_VERIFY_MAC,),
        KeySpec.HMAC_384: (KeyUsage.GENERATE_VERIFY_MAC,),
        KeySpec.HMAC_512: (KeyUsage.GENERATE_VERIFY_MAC,),
    }
)

_ECDSA = {
    KeySpec.ECC_NIST_P256: SigningAlgorithm.ECDSA_SHA_256,
    KeySpec.ECC_NIST_P384: SigningAlgorithm.ECDSA_SHA_384,
    KeySpec.ECC_NIST_P521: SigningAlgorithm.ECDSA_SHA_512,
    KeySpec.ECC_SECG_P256K1: SigningAlgorithm.ECDSA_SHA_256,
}
_HMAC = {
    KeySpec.HMAC_224: MacAlgorithm.HMAC_SHA_224,
    KeySpec.HMAC_256: MacAlgorithm.HMAC_SHA_256,
    KeySpec.HMAC_384: MacAlgorithm.HMAC_SHA_384,
    KeySpec.HMAC_512: MacAlgorithm.HMAC_SHA_512,
}
RSA_BITS = MappingProxyType({KeySpec.RSA_2048: 2048, KeySpec.RSA_3072: 3072, KeySpec.RSA_4096: 4096})
HMAC_KEY_BYTES = MappingProxyType(
    {KeySpec.HMAC_224: 28, KeySpec.HMAC_256: 32, KeySpec.HMAC_384: 48, KeySpec.HMAC_512: 64}
)


def encryption_algorithms(spec: KeySpec, usage: KeyUsage) -> tuple[EncryptionAlgorithm, ...]:
    if usage is not KeyUsage.ENCRYPT_DECRYPT:
        return ()
    if spec is KeySpec.SYMMETRIC_DEFAULT:
        return (EncryptionAlgorithm.SYMMETRIC_DEFAULT,)
    return _RSA_ENCRYPTION if spec in RSA_BITS else ()


def signing_algorithms(spec: KeySpec, usage: KeyUsage) -> tuple[SigningAlgorithm, ...]:
    if usage is not KeyUsage.SIGN_VERIFY:
        return ()
    if spec in RSA_BITS:
        return _RSA_SIGNING
    return (_ECDSA[spec],) if spec in _ECDSA else ()


def mac_algorithms(spec: KeySpec, usage: KeyUsage) -> tuple[MacAlgorithm, ...]:
    return (_HMAC[spec],) if usage is KeyUsage.GENERATE_VERIFY_MAC and spec in _HMAC else ()


def key_agreement_algorithms(spec: KeySpec, usage: KeyUsage) -> tuple[KeyAgreementAlgorithm, ...]:
    return (KeyAgreementAlgorithm.ECDH,) if usage is KeyUsage.KEY_AGREEMENT else ()


def rsa_oaep_max_plaintext(spec: KeySpec, algorithm: EncryptionAlgorithm) -> int:
    """KMS's plaintext limit: modulus bytes - 2 * hash bytes - 2 (214/190 for RSA_2048)."""
    hash_len = 20 if algorithm is EncryptionAlgorithm.RSAES_OAEP_SHA_1 else 32
    return RSA_BITS[spec] // 8 - 2 * hash_len - 2


def is_rotatable(spec: KeySpec) -> bool:
    """As in AWS KMS, only symmetric encryption keys rotate."""
    return spec is KeySpec.SYMMETRIC_DEFAULT


_GRANT_ANY_KEY = frozenset({"CreateGrant", "RetireGrant", "DescribeKey"})
_GRANT_ENCRYPTION = frozenset({"Encrypt", "Decrypt", "ReEncryptFrom", "ReEncryptTo"})
_GRANT_BY_USAGE: MappingProxyType[KeyUsage, frozenset[str]] = MappingProxyType(
    {
        KeyUsage.ENCRYPT_DECRYPT: _GRANT_ANY_KEY | _GRANT_ENCRYPTION | {"GetPublicKey"},
        KeyUsage.SIGN_VERIFY: _GRANT_ANY_KEY | {"Sign", "Verify", "GetPublicKey"},
        KeyUsage.GENERATE_VERIFY_MAC: _GRANT_ANY_KEY | {"GenerateMac", "VerifyMac"},
        KeyUsage.KEY_AGREEMENT: _GRANT_ANY_KEY | {"DeriveSharedSecret", "GetPublicKey"},
    }
)
_GRANT_SYMMETRIC = _GRANT_ANY_KEY | _GRANT_ENCRYPTION | {
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
}


def grant_operations(spec: KeySpec, usage: KeyUsage) -> frozenset[str]:
    """The grant operations a key supports (KMS's key type table): CreateGrant refuses others."""
    if spec is KeySpec.SYMMETRIC_DEFAULT:
        return _GRANT_SYMMETRIC
    return _GRANT_BY_USAGE[usage]
