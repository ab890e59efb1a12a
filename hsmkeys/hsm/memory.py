"""An in-process HSM with the :class:`~hsmkeys.hsm.base.Hsm` contract, for fast unit tests.

Keys are held by pyca/cryptography objects inside the instance and no method returns
them (only public keys and fresh data key pairs leave it), so code tested against
:class:`MemoryHsm` cannot come to depend on key material the real HSM never reveals.
Like the PKCS#11 objects, each key only has the capabilities its usage needs: a
SIGN_VERIFY RSA key cannot decrypt, an ENCRYPT_DECRYPT one cannot sign.

Errors, as in the contract: NotFoundException for a ref with no key,
AlreadyExistsException from create_key on a taken ref, InvalidCiphertextException
(one message) from the decrypt methods on any failure, InvalidKeyUsageException when
a key's type or usage does not allow the operation or algorithm (the HSM's
KeyFunctionNotPermitted), ValidationException for arguments outside the contract
(digest of the wrong length, a peer key that is not on the key's curve), and
KMSInternalException after :meth:`MemoryHsm.close`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding

from hsmkeys import keyspecs
from hsmkeys.algorithms import (
    CURVES,
    MAC_HASHES,
    OAEP_HASHES,
    SIGNING_HASHES,
    rsa_signature_padding,
)
from hsmkeys.ciphertext import INVALID_CIPHERTEXT
from hsmkeys.errors import (
    AlreadyExistsException,
    IncorrectKeyMaterialException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    KMSInternalException,
    NotFoundException,
    ValidationException,
)
from hsmkeys.hsm.base import (
    FINGERPRINT_AAD,
    FINGERPRINT_BLOCK,
    FINGERPRINT_IV,
    FINGERPRINT_MESSAGE,
    OAEP_ALGORITHMS,
    WRAPPING_ALGORITHMS,
    WRAPPING_KEY_BITS,
    HsmStatus,
    check_import_algorithm,
    check_secret_length,
    fingerprint,
    wrapping_label,
)
from hsmkeys.models import (
    DataKeyPairSpec,
    EncryptionAlgorithm,
    KeySpec,
    KeyUsage,
    KeyVersionRef,
    MacAlgorithm,
    SigningAlgorithm,
)

__all__ = ["MemoryHsm"]

IV_LEN = 12
TAG_LEN = 16
AES_KEY_BYTES = 32
RSA_PUBLIC_EXPONENT = 65537
_WRAPPING_HASH: dict[str, type[hashes.SHA1 | hashes.SHA256]] = {
    "RSAES_OAEP_SHA_1": hashes.SHA1,
    "RSAES_OAEP_SHA_256": hashes.SHA256,
    "RSA_AES_KEY_WRAP_SHA_1": hashes.SHA1,
    "RSA_AES_KEY_WRAP_SHA_256": hashes.SHA256,
}

_PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class _Key:
    """One key version: its spec, usage and material (bytes for AES/HMAC, a pyca private key otherwise)."""

    spec: KeySpec
    usage: KeyUsage
    material: bytes | _PrivateKey


class MemoryHsm:
    """The :class:`~hsmkeys.hsm.base.Hsm` contract in process memory; thread-safe."""

    def __init__(self) -> None:
        self._keys: dict[KeyVersionRef, _Key] = {}
        self._wrapping: dict[KeyVersionRef, rsa.RSAPrivateKey] = {}
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"MemoryHsm(keys={len(self._keys)})"

    def status(self) -> HsmStatus:
        self._check_open()
        return HsmStatus(
            module="memory",
            token_label="memory",
            manufacturer="hsmkeys",
            model="MemoryHsm",
            serial=f"{id(self):x}",
        )

    def close(self) -> None:
        """End the "session": later calls raise KMSInternalException, as a closed PKCS#11 session would."""
        self._closed = True

    def use_own_session(self) -> bool:
        return True  # thread-safe already: every call takes the instance lock briefly

    def start_indexing(self) -> bool:
        return False  # nothing to index

    # ---------------------------------------------------------- objects

    def create_key(self, ref: KeyVersionRef, spec: KeySpec, usage: KeyUsage) -> None:
        self._check_open()
        if usage not in keyspecs.ALLOWED_USAGES.get(spec, ()):
            raise ValidationException(f"Key usage {usage} is not valid for key spec {spec}.")
        with self._lock:
            if ref in self._keys:
                raise AlreadyExistsException(f"{ref.label} already exists in the HSM.")
        key = _Key(spec, usage, _generate(spec))
        with self._lock:
            # Checked again: generation ran unlocked (RSA takes time) and a racer may have won.
            if ref in self._keys:
                raise AlreadyExistsException(f"{ref.label} already exists in the HSM.")
            self._keys[ref] = key

    def has_key(self, ref: KeyVersionRef) -> bool:
        self._check_open()
        with self._lock:
            return ref in self._keys

    def destroy_key(self, ref: KeyVersionRef) -> None:
        self._check_open()
        with self._lock:
            self._keys.pop(ref, None)

    def list_key_refs(self) -> set[KeyVersionRef]:
        self._check_open()
        with self._lock:
            return set(self._keys)

    def random(self, n: int) -> bytes:
        self._check_open()
        if n < 0:
            raise ValidationException(f"Cannot generate {n} random bytes.")
        return os.urandom(n)

    # ---------------------------------------------------------- symmetric

    def encrypt_aes_gcm(self, ref: KeyVersionRef, iv: bytes, aad: bytes, plaintext: bytes) -> bytes:
        key = self._secret(ref, KeySpec.SYMMETRIC_DEFAULT, "encrypt")
        if len(iv) != IV_LEN:
            raise ValidationException(f"AES-GCM needs a {IV_LEN}-byte IV, got {len(iv)} bytes.")
        return AESGCM(key).encrypt(iv, plaintext, aad)

    def decrypt_aes_gcm(
        self, ref: KeyVersionRef, iv: bytes, aad: bytes, ciphertext: bytes
    ) -> bytes:
        key = self._secret(ref, KeySpec.SYMMETRIC_DEFAULT, "decrypt")
        # pyca accepts other IV lengths and would read a short body as a short tag.
        if len(iv) != IV_LEN or len(ciphertext) < TAG_LEN:
            raise InvalidCiphertextException(INVALID_CIPHERTEXT)
        try:
            return AESGCM(key).decrypt(iv, ciphertext, aad)
        except (InvalidTag, ValueError, OverflowError):
            raise InvalidCiphertextException(INVALID_CIPHERTEXT) from None

    # ---------------------------------------------------------- asymmetric / HMAC

    def public_key(self, ref: KeyVersionRef) -> bytes:
        material = self._get(ref).material
        if isinstance(material, bytes):
            raise InvalidKeyUsageException(f"{ref.label} is a secret key; it has no public key.")
        return _spki(material)

    def sign_digest(self, ref: KeyVersionRef, algorithm: SigningAlgorithm, digest: bytes) -> bytes:
        key = self._get(ref)
        if algorithm not in keyspecs.signing_algorithms(key.spec, key.usage):
            raise _not_permitted(ref, key, algorithm)
        hash_alg = SIGNING_HASHES[algorithm]
        if len(digest) != hash_alg.digest_size:
            raise ValidationException(f"Digest is invalid length for algorithm {algorithm}.")
        material = key.material
        if isinstance(material, rsa.RSAPrivateKey):
            return material.sign(digest, rsa_signature_padding(algorithm), Prehashed(hash_alg))
        if isinstance(material, ec.EllipticCurvePrivateKey):
            return material.sign(digest, ec.ECDSA(Prehashed(hash_alg)))
        raise _not_permitted(ref, key, algorithm)  # unreachable: the spec check above

    def decrypt_rsa_oaep(
        self, ref: KeyVersionRef, algorithm: EncryptionAlgorithm, ciphertext: bytes
    ) -> bytes:
        key = self._get(ref)
        material = key.material
        hash_alg = OAEP_HASHES.get(algorithm)
        if (
            hash_alg is None
            or not isinstance(material, rsa.RSAPrivateKey)
            or algorithm not in keyspecs.encryption_algorithms(key.spec, key.usage)
        ):
            raise _not_permitted(ref, key, algorithm)
        try:
            return material.decrypt(
                ciphertext,
                padding.OAEP(mgf=padding.MGF1(hash_alg), algorithm=hash_alg, label=None),
            )
        except (ValueError, TypeError):
            raise InvalidCiphertextException(INVALID_CIPHERTEXT) from None

    def mac(self, ref: KeyVersionRef, algorithm: MacAlgorithm, message: bytes) -> bytes:
        key = self._get(ref)
        material = key.material
        if not isinstance(material, bytes) or algorithm not in keyspecs.mac_algorithms(
            key.spec, key.usage
        ):
            raise _not_permitted(ref, key, algorithm)
        h = hmac.HMAC(material, MAC_HASHES[algorithm])
        h.update(message)
        return h.finalize()

    def derive_ecdh(self, ref: KeyVersionRef, peer_public_key_der: bytes) -> bytes:
        key = self._get(ref)
        material = key.material
        if not isinstance(material, ec.EllipticCurvePrivateKey) or key.usage is not (
            KeyUsage.KEY_AGREEMENT
        ):
            raise _not_permitted(ref, key, "ECDH")
        try:
            peer = serialization.load_der_public_key(peer_public_key_der)
        except (ValueError, UnsupportedAlgorithm):
            peer = None
        if (
            not isinstance(peer, ec.EllipticCurvePublicKey)
            or peer.curve.name != material.curve.name
        ):
            raise ValidationException(
                f"PublicKey must be a DER-encoded SubjectPublicKeyInfo on {material.curve.name}."
            )
        try:
            return material.exchange(ec.ECDH(), peer)
        except ValueError:
            raise ValidationException("PublicKey is not a valid point for ECDH.") from None

    def generate_data_key_pair(self, spec: DataKeyPairSpec) -> tuple[bytes, bytes]:
        self._check_open()
        private = _generate(KeySpec(spec.value))
        if isinstance(private, bytes):  # unreachable: every pair spec is RSA or EC
            raise KMSInternalException(f"{spec} is not a key pair spec.")
        der = private.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return der, _spki(private)

    # ---------------------------------------------------------- import (BYOK)

    def wrapping_algorithms(self) -> frozenset[str]:
        return WRAPPING_ALGORITHMS

    def create_wrapping_key(self, ref: KeyVersionRef, spec: str) -> bytes:
        self._check_open()
        bits = WRAPPING_KEY_BITS.get(spec)
        if bits is None:
            raise ValidationException(f"WrappingKeySpec {spec} is not supported.")
        private = rsa.generate_private_key(RSA_PUBLIC_EXPONENT, bits)
        with self._lock:
            if ref in self._wrapping:
                raise AlreadyExistsException(f"{wrapping_label(ref)} already exists in the HSM.")
            self._wrapping[ref] = private
        return _spki(private)

    def destroy_wrapping_key(self, ref: KeyVersionRef) -> None:
        self._check_open()
        with self._lock:
            self._wrapping.pop(ref, None)

    def list_wrapping_refs(self) -> set[KeyVersionRef]:
        self._check_open()
        with self._lock:
            return set(self._wrapping)

    def import_key(
        self,
        ref: KeyVersionRef,
        spec: KeySpec,
        usage: KeyUsage,
        wrapping: KeyVersionRef,
        algorithm: str,
        wrapped: bytes,
        public_key_der: bytes | None = None,
    ) -> None:
        self._check_open()
        if usage not in keyspecs.ALLOWED_USAGES.get(spec, ()):
            raise ValidationException(f"Key usage {usage} is not valid for key spec {spec}.")
        check_import_algorithm(spec, algorithm)
        with self._lock:
            unwrapping = self._wrapping.get(wrapping)
        if unwrapping is None:
            raise NotFoundException(f"{wrapping_label(wrapping)} has no object in the HSM.")
        material = _unwrap(unwrapping, algorithm, bytes(wrapped))
        key = _Key(spec, usage, _imported_material(spec, material, public_key_der))
        with self._lock:
            if ref in self._keys:
                raise AlreadyExistsException(f"{ref.label} already exists in the HSM.")
            self._keys[ref] = key

    def key_fingerprint(self, ref: KeyVersionRef) -> bytes:
        key = self._get(ref)
        material = key.material
        if not isinstance(material, bytes):
            return fingerprint("spki", _spki(material))
        if key.spec is KeySpec.SYMMETRIC_DEFAULT:
            return fingerprint(
                "aes", AESGCM(material).encrypt(FINGERPRINT_IV, FINGERPRINT_BLOCK, FINGERPRINT_AAD)
            )
        h = hmac.HMAC(material, hashes.SHA224())
        h.update(FINGERPRINT_MESSAGE)
        return fingerprint("hmac", h.finalize())

    # ---------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise KMSInternalException("The HSM session is closed.")

    def _get(self, ref: KeyVersionRef) -> _Key:
        self._check_open()
        with self._lock:
            key = self._keys.get(ref)
        if key is None:
            raise NotFoundException(f"{ref.label} has no object in the HSM.")
        return key

    def _secret(self, ref: KeyVersionRef, spec: KeySpec, operation: str) -> bytes:
        key = self._get(ref)
        if key.spec is not spec or not isinstance(key.material, bytes):
            raise _not_permitted(ref, key, operation)
        return key.material


def _generate(spec: KeySpec) -> bytes | _PrivateKey:
    if spec is KeySpec.SYMMETRIC_DEFAULT:
        return os.urandom(AES_KEY_BYTES)
    if spec in keyspecs.HMAC_KEY_BYTES:
        return os.urandom(keyspecs.HMAC_KEY_BYTES[spec])
    if spec in keyspecs.RSA_BITS:
        return rsa.generate_private_key(RSA_PUBLIC_EXPONENT, keyspecs.RSA_BITS[spec])
    if spec in CURVES:
        return ec.generate_private_key(CURVES[spec])
    raise ValidationException(f"Key spec {spec} is not supported.")


def _unwrap(unwrapping: rsa.RSAPrivateKey, algorithm: str, wrapped: bytes) -> bytes:
    """The material inside ``wrapped``; any failure is one InvalidCiphertextException."""
    hash_type = _WRAPPING_HASH[algorithm]
    oaep = padding.OAEP(mgf=padding.MGF1(hash_type()), algorithm=hash_type(), label=None)
    k = unwrapping.key_size // 8
    try:
        if algorithm in OAEP_ALGORITHMS:
            return unwrapping.decrypt(wrapped, oaep)
        if len(wrapped) <= k:
            raise ValueError("no AES-wrapped part")
        aes_key = unwrapping.decrypt(wrapped[:k], oaep)
        if len(aes_key) not in (16, 24, 32):
            raise ValueError("the ephemeral key is not an AES key")
        return aes_key_unwrap_with_padding(aes_key, wrapped[k:])
    except (ValueError, InvalidUnwrap):
        raise InvalidCiphertextException(INVALID_CIPHERTEXT) from None


def _imported_material(spec: KeySpec, material: bytes, public_key_der: bytes | None) -> bytes | _PrivateKey:
    """Checked key material of ``spec``: IncorrectKeyMaterialException for anything else."""
    if spec is KeySpec.SYMMETRIC_DEFAULT or spec in keyspecs.HMAC_KEY_BYTES:
        check_secret_length(spec, len(material), len(material))
        return material
    try:
        private = serialization.load_der_private_key(material, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise IncorrectKeyMaterialException(f"The key material is not a PKCS#8 {spec} private key.") from None
    if spec in keyspecs.RSA_BITS:
        fits = isinstance(private, rsa.RSAPrivateKey) and private.key_size == keyspecs.RSA_BITS[spec]
    else:
        fits = isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == CURVES[spec].name
    if not fits or not isinstance(private, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise IncorrectKeyMaterialException(f"The key material is not a {spec} private key.")
    if public_key_der is not None and bytes(public_key_der) != _spki(private):
        raise IncorrectKeyMaterialException("The public key does not match the imported private key.")
    return private


def _spki(private: _PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _not_permitted(ref: KeyVersionRef, key: _Key, operation: str) -> InvalidKeyUsageException:
    return InvalidKeyUsageException(
        f"{operation} is not permitted for {ref.label} ({key.spec}, {key.usage})."
    )
