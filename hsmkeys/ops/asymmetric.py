"""Asymmetric and HMAC operations of the KeyStore: sign/verify, public keys, RSA-OAEP,
MACs, data key pairs and ECDH.

Plain functions ``op(store, call, **members)`` reached through :mod:`hsmkeys.operations`.
Private and secret keys never leave the HSM:
signing, RSA decryption, HMAC and ECDH run there; only public-key work (verification,
RSA encryption) runs here with pyca/cryptography on the key's cached public half.

Checks run in AWS KMS's order: parameter limits and enum values (ValidationException),
then the key (NotFoundException, DisabledException, KMSInvalidStateException), then its
usage and the algorithm for its spec (InvalidKeyUsageException), then limits that depend
on the key (ValidationException), then ``dry_run`` (DryRunOperationException).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from hsmkeys import keyspecs
from hsmkeys.algorithms import CURVES, OAEP_HASHES, SIGNING_HASHES, rsa_signature_padding
from hsmkeys.catalog.base import KeyRecord
from hsmkeys.ciphertext import INVALID_CIPHERTEXT
from hsmkeys.errors import (
    InvalidCiphertextException,
    InvalidKeyUsageException,
    KMSInternalException,
    KMSInvalidMacException,
    KMSInvalidSignatureException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkeys.models import (
    NOT_SERVED,
    DataKeyPairSpec,
    DecryptResult,
    DeriveSharedSecretResult,
    EncryptionAlgorithm,
    EncryptResult,
    GenerateDataKeyPairResult,
    GenerateDataKeyPairWithoutPlaintextResult,
    GenerateMacResult,
    GetPublicKeyResult,
    KeyAgreementAlgorithm,
    KeySpec,
    KeyUsage,
    KeyVersionRef,
    MacAlgorithm,
    MessageType,
    SigningAlgorithm,
    SignResult,
    VerifyMacResult,
    VerifyResult,
)
from hsmkeys.ops.common import data_key_master, dry_run_error, key_material_id
from hsmkeys.validation import check_bytes, check_context, check_enum, check_grant_tokens

if TYPE_CHECKING:
    from hsmkeys.call import Call
    from hsmkeys.keystore import KeyStore


MAX_MESSAGE = 4096  # Sign/Verify/GenerateMac/VerifyMac Message (PlaintextType)
MAX_SIGNATURE = 6144  # Verify Signature and VerifyMac Mac (CiphertextType)
MAX_PEER_PUBLIC_KEY = 8192  # DeriveSharedSecret PublicKey (PublicKeyType)


_PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True)
class CachedPublicKey:
    der: bytes  # DER SubjectPublicKeyInfo as the HSM returned it
    key: _PublicKey


# ------------------------------------------------ Sign / Verify


def sign(
    ks: KeyStore,
    call: Call,
    *,
    key_id: str,
    message: bytes,
    signing_algorithm: str,
    message_type: str = MessageType.RAW,
    grant_tokens: Sequence[str] | None = None,
    dry_run: bool = False,
) -> SignResult:
    """Sign ``message`` (RAW, 1-4096 bytes, hashed here) or its digest (DIGEST) in the HSM.

    RSASSA-PSS uses a salt as long as the digest; ECDSA signatures are DER. Raises
    ValidationException (limits, unknown enum value, DIGEST of the wrong length),
    InvalidKeyUsageException (not a SIGN_VERIFY key, or an algorithm its spec does
    not allow), the key-state errors of ``_usable``, DryRunOperationException.
    """
    algorithm, digest, key = _signing_input(
        ks, call, key_id, message, message_type, signing_algorithm, grant_tokens
    )
    if dry_run:
        raise dry_run_error("Sign")
    ref = KeyVersionRef(key.key_uuid, key.current_version)
    signature = ks._hsm.sign_digest(ref, algorithm, digest)
    call.used(ks._arn(key.key_uuid), key.current_version)
    return SignResult(
        key_id=ks._arn(key.key_uuid), signature=signature, signing_algorithm=algorithm
    )


def verify(
    ks: KeyStore,
    call: Call,
    *,
    key_id: str,
    message: bytes,
    signature: bytes,
    signing_algorithm: str,
    message_type: str = MessageType.RAW,
    grant_tokens: Sequence[str] | None = None,
    dry_run: bool = False,
) -> VerifyResult:
    """Verify ``signature`` with the key's public half; signature_valid is always True.

    A signature that does not verify (or is not well formed) raises
    KMSInvalidSignatureException; otherwise the errors of :meth:`sign`.
    """
    signature = check_bytes("signature", signature, min_len=1, max_len=MAX_SIGNATURE)
    algorithm, digest, key = _signing_input(
        ks, call, key_id, message, message_type, signing_algorithm, grant_tokens
    )
    if dry_run:
        raise dry_run_error("Verify")
    public = public_key(ks, key).key
    hash_alg = SIGNING_HASHES[algorithm]
    try:
        if isinstance(public, rsa.RSAPublicKey):
            pad = rsa_signature_padding(algorithm)
            public.verify(signature, digest, pad, Prehashed(hash_alg))
        else:
            public.verify(signature, digest, ec.ECDSA(Prehashed(hash_alg)))
        valid = True
    except (InvalidSignature, ValueError):
        valid = False
    # The key did its work either way; an invalid signature is the call's result.
    call.used(ks._arn(key.key_uuid), key.current_version)
    if not valid:
        raise KMSInvalidSignatureException()
    return VerifyResult(
        key_id=ks._arn(key.key_uuid), signature_valid=True, signing_algorithm=algorithm
    )


def _signing_input(
    ks: KeyStore,
    call: Call,
    key_id: str,
    message: bytes,
    message_type: str,
    signing_algorithm: str,
    grant_tokens: Sequence[str] | None,
) -> tuple[SigningAlgorithm, bytes, KeyRecord]:
    """Checks shared by sign and verify; returns the algorithm, the digest to sign and the key."""
    message = check_bytes("message", message, min_len=1, max_len=MAX_MESSAGE)
    kind = check_enum(MessageType, "messageType", message_type)
    algorithm = _signing_algorithm(signing_algorithm)
    check_grant_tokens(grant_tokens)
    key = ks._key(call, key_id)
    ks._require_enabled(key)
    ks._require_usage(key, KeyUsage.SIGN_VERIFY)
    if algorithm is None or algorithm not in keyspecs.signing_algorithms(key.spec, key.usage):
        raise _incompatible(signing_algorithm, key.spec)
    hash_alg = SIGNING_HASHES[algorithm]
    if kind is MessageType.DIGEST:
        if len(message) != hash_alg.digest_size:
            raise ValidationException(f"Digest is invalid length for algorithm {algorithm}.")
        return algorithm, message, key
    return algorithm, hashlib.new(hash_alg.name, message).digest(), key


# ------------------------------------------------ GetPublicKey


def get_public_key(
    ks: KeyStore, call: Call, *, key_id: str, grant_tokens: Sequence[str] | None = None
) -> GetPublicKeyResult:
    """The DER SubjectPublicKeyInfo of an RSA or ECC key with its spec, usage and algorithms.

    Raises UnsupportedOperationException for symmetric and HMAC keys, and the
    key-state errors of ``_usable``.
    """
    check_grant_tokens(grant_tokens)
    key = ks._key(call, key_id)
    ks._require_enabled(key)
    if key.spec not in keyspecs.RSA_BITS and key.spec not in CURVES:
        raise UnsupportedOperationException(
            f"{ks._arn(key.key_uuid)} key spec {key.spec} has no public key; "
            "GetPublicKey needs an asymmetric KMS key."
        )
    der = public_key(ks, key).der
    call.used(ks._arn(key.key_uuid), key.current_version)
    return GetPublicKeyResult(
        key_id=ks._arn(key.key_uuid),
        public_key=der,
        customer_master_key_spec=key.spec,
        key_spec=key.spec,
        key_usage=key.usage,
        encryption_algorithms=keyspecs.encryption_algorithms(key.spec, key.usage),
        signing_algorithms=keyspecs.signing_algorithms(key.spec, key.usage),
        key_agreement_algorithms=keyspecs.key_agreement_algorithms(key.spec, key.usage),
    )


def public_key(ks: KeyStore, key: KeyRecord) -> CachedPublicKey:
    """The key's public half, read from the HSM once per process (a version never changes)."""
    ref = KeyVersionRef(key.key_uuid, key.current_version)
    cache = ks._public_keys
    cached = cache.get(ref)
    if cached is None:
        der = ks._hsm.public_key(ref)
        try:
            loaded = serialization.load_der_public_key(der)
        except (ValueError, UnsupportedAlgorithm):
            raise KMSInternalException("The HSM returned a malformed public key.") from None
        if not isinstance(loaded, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise KMSInternalException("The HSM returned an unexpected public key type.")
        cached = cache[ref] = CachedPublicKey(der, loaded)
    return cached


# ------------------------------------------------ RSA Encrypt / Decrypt


def encrypt_rsa(
    ks: KeyStore,
    call: Call,
    key: KeyRecord,
    plaintext: bytes,
    algorithm: str | None,
    encryption_context: Mapping[str, str] | None,
    *,
    dry_run: bool = False,
) -> EncryptResult:
    """RSAES-OAEP encryption with the public half of an RSA ENCRYPT_DECRYPT key.

    ``algorithm`` None means SYMMETRIC_DEFAULT, as in KMS. Raises
    ValidationException (unknown algorithm, an encryption context, plaintext empty
    or over the OAEP limit for the key size), InvalidKeyUsageException (wrong usage,
    SYMMETRIC_DEFAULT or another algorithm the spec does not allow),
    DryRunOperationException.
    """
    oaep = _rsa_algorithm(ks, key, algorithm)
    _refuse_context(encryption_context)
    plaintext = check_bytes("plaintext", plaintext, min_len=1, max_len=MAX_MESSAGE)
    limit = keyspecs.rsa_oaep_max_plaintext(key.spec, oaep)
    if len(plaintext) > limit:
        raise ValidationException(
            f"Algorithm {oaep} and key spec {key.spec} cannot encrypt data larger than {limit} bytes."
        )
    if dry_run:
        raise dry_run_error("Encrypt")
    public = public_key(ks, key).key
    if not isinstance(public, rsa.RSAPublicKey):
        raise KMSInternalException("The HSM returned a non-RSA public key for an RSA key.")
    hash_alg = OAEP_HASHES[oaep]
    ciphertext = public.encrypt(
        plaintext, padding.OAEP(mgf=padding.MGF1(hash_alg), algorithm=hash_alg, label=None)
    )
    call.used(ks._arn(key.key_uuid), key.current_version)
    return EncryptResult(
        ciphertext_blob=ciphertext, key_id=ks._arn(key.key_uuid), encryption_algorithm=oaep
    )


def decrypt_rsa(
    ks: KeyStore,
    call: Call,
    key: KeyRecord,
    ciphertext: bytes,
    algorithm: str | None,
    encryption_context: Mapping[str, str] | None,
    *,
    dry_run: bool = False,
) -> DecryptResult:
    """RSAES-OAEP decryption in the HSM with the private half of an RSA ENCRYPT_DECRYPT key.

    Every ciphertext failure (length, padding, wrong key, wrong OAEP hash) is one
    InvalidCiphertextException with one message, so nothing serves as a padding
    oracle. ``algorithm`` None or SYMMETRIC_DEFAULT is InvalidCiphertextException
    too: KMS reads such a ciphertext as a symmetric blob, which it is not. Also
    raises ValidationException (unknown algorithm, an encryption context),
    InvalidKeyUsageException (wrong usage, algorithm not for the spec),
    DryRunOperationException.
    """
    if algorithm is None or algorithm == EncryptionAlgorithm.SYMMETRIC_DEFAULT:
        ks._require_usage(key, KeyUsage.ENCRYPT_DECRYPT)
        raise InvalidCiphertextException(INVALID_CIPHERTEXT)
    oaep = _rsa_algorithm(ks, key, algorithm)
    _refuse_context(encryption_context)
    if dry_run:
        raise dry_run_error("Decrypt")
    if len(ciphertext) != keyspecs.RSA_BITS[key.spec] // 8:
        raise InvalidCiphertextException(INVALID_CIPHERTEXT)
    ref = KeyVersionRef(key.key_uuid, key.current_version)
    try:
        plaintext = ks._hsm.decrypt_rsa_oaep(ref, oaep, bytes(ciphertext))
    except InvalidCiphertextException:
        # Re-raised with our fixed message whatever detail the backend gave.
        raise InvalidCiphertextException(INVALID_CIPHERTEXT) from None
    call.used(ks._arn(key.key_uuid), key.current_version)
    return DecryptResult(
        key_id=ks._arn(key.key_uuid),
        plaintext=plaintext,
        encryption_algorithm=oaep,
        key_version=key.current_version,
    )


def _rsa_algorithm(ks: KeyStore, key: KeyRecord, algorithm: str | None) -> EncryptionAlgorithm:
    """The OAEP algorithm for an RSA ENCRYPT_DECRYPT key, or the KMS error for ``algorithm``."""
    if algorithm is not None and algorithm not in NOT_SERVED[EncryptionAlgorithm]:
        check_enum(EncryptionAlgorithm, "encryptionAlgorithm", algorithm)
    ks._require_usage(key, KeyUsage.ENCRYPT_DECRYPT)
    name = EncryptionAlgorithm.SYMMETRIC_DEFAULT if algorithm is None else algorithm
    if name not in OAEP_HASHES or name not in keyspecs.encryption_algorithms(key.spec, key.usage):
        raise _incompatible(name, key.spec)
    return EncryptionAlgorithm(name)


# ------------------------------------------------ GenerateMac / VerifyMac


def generate_mac(
    ks: KeyStore,
    call: Call,
    *,
    message: bytes,
    key_id: str,
    mac_algorithm: str,
    grant_tokens: Sequence[str] | None = None,
    dry_run: bool = False,
) -> GenerateMacResult:
    """HMAC of ``message`` (1-4096 bytes) computed in the HSM.

    Raises ValidationException (limits, unknown algorithm), InvalidKeyUsageException
    (not a GENERATE_VERIFY_MAC key, or an algorithm other than the key spec's),
    the key-state errors of ``_usable``, DryRunOperationException.
    """
    key, algorithm, message = _mac_input(ks, call, message, key_id, mac_algorithm, grant_tokens)
    if dry_run:
        raise dry_run_error("GenerateMac")
    mac = ks._hsm.mac(KeyVersionRef(key.key_uuid, key.current_version), algorithm, message)
    call.used(ks._arn(key.key_uuid), key.current_version)
    return GenerateMacResult(mac=mac, mac_algorithm=algorithm, key_id=ks._arn(key.key_uuid))


def verify_mac(
    ks: KeyStore,
    call: Call,
    *,
    message: bytes,
    key_id: str,
    mac_algorithm: str,
    mac: bytes,
    grant_tokens: Sequence[str] | None = None,
    dry_run: bool = False,
) -> VerifyMacResult:
    """Recompute the HMAC in the HSM and compare in constant time; mac_valid is always True.

    A MAC that does not match raises KMSInvalidMacException; otherwise the errors of
    :meth:`generate_mac`.
    """
    mac = check_bytes("mac", mac, min_len=1, max_len=MAX_SIGNATURE)
    key, algorithm, message = _mac_input(ks, call, message, key_id, mac_algorithm, grant_tokens)
    if dry_run:
        raise dry_run_error("VerifyMac")
    expected = ks._hsm.mac(KeyVersionRef(key.key_uuid, key.current_version), algorithm, message)
    # The key did its work either way; a wrong MAC is the call's result.
    call.used(ks._arn(key.key_uuid), key.current_version)
    if not hmac.compare_digest(expected, mac):
        raise KMSInvalidMacException()
    return VerifyMacResult(key_id=ks._arn(key.key_uuid), mac_valid=True, mac_algorithm=algorithm)


def _mac_input(
    ks: KeyStore,
    call: Call,
    message: bytes,
    key_id: str,
    mac_algorithm: str,
    grant_tokens: Sequence[str] | None,
) -> tuple[KeyRecord, MacAlgorithm, bytes]:
    message = check_bytes("message", message, min_len=1, max_len=MAX_MESSAGE)
    algorithm = check_enum(MacAlgorithm, "macAlgorithm", mac_algorithm)
    check_grant_tokens(grant_tokens)
    key = ks._key(call, key_id)
    ks._require_enabled(key)
    ks._require_usage(key, KeyUsage.GENERATE_VERIFY_MAC)
    if algorithm not in keyspecs.mac_algorithms(key.spec, key.usage):
        raise _incompatible(algorithm, key.spec)
    return key, algorithm, message


# ------------------------------------------------ data key pairs


def generate_data_key_pair(
    ks: KeyStore,
    call: Call,
    *,
    key_id: str,
    key_pair_spec: str,
    encryption_context: Mapping[str, str] | None = None,
    grant_tokens: Sequence[str] | None = None,
    dry_run: bool = False,
) -> GenerateDataKeyPairResult:
    """A fresh HSM-generated pair: PKCS#8 DER private key (plain and encrypted under
    ``key_id`` exactly as :meth:`encrypt` does, so ``decrypt`` opens it) and DER SPKI
    public key.

    ``key_id`` must be a SYMMETRIC_DEFAULT ENCRYPT_DECRYPT key (InvalidKeyUsageException
    otherwise). Raises ValidationException (unknown spec, bad context),
    UnsupportedOperationException (a KMS pair spec hsmkeys does not offer), the
    key-state errors of ``_usable``, DryRunOperationException.
    """
    spec, private_der, public_der, sealed, material_id = _data_key_pair(
        ks,
        call,
        "GenerateDataKeyPair",
        key_id,
        key_pair_spec,
        encryption_context,
        grant_tokens,
        dry_run,
    )
    return GenerateDataKeyPairResult(
        private_key_ciphertext_blob=sealed.ciphertext_blob,
        private_key_plaintext=private_der,
        public_key=public_der,
        key_id=sealed.key_id,
        key_pair_spec=spec,
        key_material_id=material_id,
    )


def generate_data_key_pair_without_plaintext(
    ks: KeyStore,
    call: Call,
    *,
    key_id: str,
    key_pair_spec: str,
    encryption_context: Mapping[str, str] | None = None,
    grant_tokens: Sequence[str] | None = None,
    dry_run: bool = False,
) -> GenerateDataKeyPairWithoutPlaintextResult:
    """:meth:`generate_data_key_pair` without returning the plaintext private key."""
    spec, _, public_der, sealed, material_id = _data_key_pair(
        ks,
        call,
        "GenerateDataKeyPairWithoutPlaintext",
        key_id,
        key_pair_spec,
        encryption_context,
        grant_tokens,
        dry_run,
    )
    return GenerateDataKeyPairWithoutPlaintextResult(
        private_key_ciphertext_blob=sealed.ciphertext_blob,
        public_key=public_der,
        key_id=sealed.key_id,
        key_pair_spec=spec,
        key_material_id=material_id,
    )


def _data_key_pair(
    ks: KeyStore,
    call: Call,
    operation: str,
    key_id: str,
    key_pair_spec: str,
    encryption_context: Mapping[str, str] | None,
    grant_tokens: Sequence[str] | None,
    dry_run: bool,
) -> tuple[DataKeyPairSpec, bytes, bytes, EncryptResult, str]:
    """(spec, PKCS#8 private key, SPKI public key, the private key sealed under ``key_id``,
    the id of the key material that sealed it)."""
    check_context("encryptionContext", encryption_context)
    spec = check_enum(DataKeyPairSpec, "keyPairSpec", key_pair_spec)
    check_grant_tokens(grant_tokens)
    # Checked before generating so a wrong key costs no key generation (RSA-4096: seconds).
    key = data_key_master(ks, call, key_id, operation)
    if dry_run:
        raise dry_run_error(operation)
    private_der, public_der = ks._hsm.generate_data_key_pair(spec)
    # Sealed exactly as Encrypt seals, so Decrypt opens it; the key checked above is the key used.
    blob, ref = ks._seal(call, key, private_der, check_context("encryptionContext", encryption_context))
    sealed = EncryptResult(blob, ks._arn(key.key_uuid), EncryptionAlgorithm.SYMMETRIC_DEFAULT)
    return spec, private_der, public_der, sealed, key_material_id(ref)


# ------------------------------------------------ DeriveSharedSecret


def derive_shared_secret(
    ks: KeyStore,
    call: Call,
    *,
    key_id: str,
    key_agreement_algorithm: str,
    public_key: bytes,
    grant_tokens: Sequence[str] | None = None,
    dry_run: bool = False,
) -> DeriveSharedSecretResult:
    """Raw ECDH shared secret of the key's private half (in the HSM) and a peer public key.

    ``public_key`` is the peer's DER SubjectPublicKeyInfo on the key's curve
    (ValidationException otherwise, as for an unknown algorithm or a length outside
    1-8192). Raises InvalidKeyUsageException for a key that is not KEY_AGREEMENT,
    the key-state errors of ``_usable``, DryRunOperationException.
    """
    public_key = check_bytes("publicKey", public_key, min_len=1, max_len=MAX_PEER_PUBLIC_KEY)
    algorithm = check_enum(KeyAgreementAlgorithm, "keyAgreementAlgorithm", key_agreement_algorithm)
    check_grant_tokens(grant_tokens)
    key = ks._key(call, key_id)
    ks._require_enabled(key)
    ks._require_usage(key, KeyUsage.KEY_AGREEMENT)
    if algorithm not in keyspecs.key_agreement_algorithms(key.spec, key.usage):
        raise _incompatible(algorithm, key.spec)
    peer_der = _peer_public_key(public_key, key.spec)
    if dry_run:
        raise dry_run_error("DeriveSharedSecret")
    secret = ks._hsm.derive_ecdh(KeyVersionRef(key.key_uuid, key.current_version), peer_der)
    call.used(ks._arn(key.key_uuid), key.current_version)
    return DeriveSharedSecretResult(
        key_id=ks._arn(key.key_uuid),
        shared_secret=secret,
        key_agreement_algorithm=algorithm,
        key_origin=key.origin,
    )


# ---------------------------------------------------------------- helpers


def _signing_algorithm(value: str) -> SigningAlgorithm | None:
    """The algorithm, None for one KMS knows but hsmkeys lacks, ValidationException otherwise."""
    if value in NOT_SERVED[SigningAlgorithm]:
        return None
    return check_enum(SigningAlgorithm, "signingAlgorithm", value)


def _incompatible(algorithm: str, spec: KeySpec) -> InvalidKeyUsageException:
    return InvalidKeyUsageException(f"Algorithm {algorithm} is incompatible with key spec {spec}.")


def _refuse_context(encryption_context: Mapping[str, str] | None) -> None:
    # KMS: an encryption context is valid only with symmetric encryption keys.
    if encryption_context:
        raise ValidationException("EncryptionContext is not supported with asymmetric KMS keys.")


def _peer_public_key(der: bytes, spec: KeySpec) -> bytes:
    """The peer key re-encoded as canonical DER SPKI (uncompressed point) after checking its curve."""
    curve = CURVES[spec]
    try:
        peer = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        peer = None
    if not isinstance(peer, ec.EllipticCurvePublicKey) or peer.curve.name != curve.name:
        raise ValidationException(
            f"PublicKey must be a DER-encoded X.509 SubjectPublicKeyInfo of an elliptic curve "
            f"key on {curve.name}, the curve of key spec {spec}."
        )
    return peer.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
