"""The HSM contract. ``pkcs11.py`` implements it over PKCS#11; ``memory.py`` in-process.

Every key version is its own object (or public/private pair) named by a
:class:`~hsmkeys.models.KeyVersionRef`: CKA_ID = ref.object_id, CKA_LABEL = ref.label.
Secret and private objects are created TOKEN, PRIVATE, SENSITIVE, non-EXTRACTABLE,
non-MODIFIABLE, with only the capabilities the key usage needs.

Errors: every method raises only :mod:`hsmkeys.errors` exceptions —
NotFoundException when the ref has no object, InvalidCiphertextException from the
decrypt methods on any authentication or padding failure (never a detail of which),
KMSInternalException for device faults.

Import (BYOK). A wrapping key is an RSA pair made in the HSM for one import token.
It shares the :class:`KeyVersionRef` type but not the key id space: its objects are
labelled ``hsmkeys-import/<uuid>/v<n>`` (:func:`wrapping_label`) with CKA_ID
``b"import" + ref.object_id`` (26 bytes, :func:`wrapping_object_id`), so
``list_key_refs`` (and ``doctor``) never report one as a key version. Its private
half can only UNWRAP (no DECRYPT), is sensitive and never extractable.

Fingerprints (:meth:`Hsm.key_fingerprint`) tell whether re-imported material is the
same as before without extracting it; both backends compute the same value for the
same material (see :func:`fingerprint`).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Protocol

from hsmkeys.errors import IncorrectKeyMaterialException, UnsupportedOperationException
from hsmkeys.models import (
    DataKeyPairSpec,
    EncryptionAlgorithm,
    KeySpec,
    KeyUsage,
    KeyVersionRef,
    MacAlgorithm,
    SigningAlgorithm,
)

#: Reserved key UUID for hsmkeys' own keys (the audit MAC key is version 1).
#: ``doctor`` never treats it as an orphan.
RESERVED_UUID = uuid.UUID(int=0)
AUDIT_KEY_REF = KeyVersionRef(RESERVED_UUID, 1)


#: Label prefix of import wrapping keys; not ``hsmkeys/``, so never a key version.
WRAPPING_LABEL_PREFIX: Final = "hsmkeys-import/"
_WRAPPING_ID_PREFIX: Final = b"import"

#: Wrapping key specs (GetParametersForImport WrappingKeySpec) and their modulus size.
WRAPPING_KEY_BITS: MappingProxyType[str, int] = MappingProxyType(
    {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
)
#: Wrapping algorithms (ImportKeyMaterial): RSA-OAEP of the material itself, or RSA-OAEP of
#: a fresh AES key followed by AES key wrap with padding (RFC 5649) of the material.
OAEP_ALGORITHMS: Final = frozenset({"RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"})
RSA_AES_ALGORITHMS: Final = frozenset({"RSA_AES_KEY_WRAP_SHA_1", "RSA_AES_KEY_WRAP_SHA_256"})
WRAPPING_ALGORITHMS: Final = OAEP_ALGORITHMS | RSA_AES_ALGORITHMS

#: Imported material lengths in bytes (AWS KMS "Requirements for imported key material").
SYMMETRIC_IMPORT_BYTES: Final = 32
HMAC_IMPORT_BYTES: MappingProxyType[KeySpec, tuple[int, int]] = MappingProxyType(
    {
        KeySpec.HMAC_224: (28, 64),
        KeySpec.HMAC_256: (32, 64),
        KeySpec.HMAC_384: (48, 128),
        KeySpec.HMAC_512: (64, 128),
    }
)

#: Fingerprint inputs. The AES one is an AES-GCM encryption under a reserved IV (random
#: IVs from the HSM meet it with probability 2^-96); only its SHA-256 leaves this module.
FINGERPRINT_IV: Final = b"\xff" * 12
FINGERPRINT_AAD: Final = b"hsmkeys key fingerprint v1"
FINGERPRINT_BLOCK: Final = bytes(32)
FINGERPRINT_MESSAGE: Final = b"hsmkeys key fingerprint v1"


def wrapping_label(ref: KeyVersionRef) -> str:
    return f"{WRAPPING_LABEL_PREFIX}{ref.key_uuid}/v{ref.version}"


def wrapping_object_id(ref: KeyVersionRef) -> bytes:
    return _WRAPPING_ID_PREFIX + ref.object_id


def fingerprint(kind: str, value: bytes) -> bytes:
    """SHA-256 over a domain tag and what the HSM computed with the key.

    ``kind`` is ``"aes"`` (value: AES-GCM of FINGERPRINT_BLOCK under FINGERPRINT_IV /
    FINGERPRINT_AAD, ciphertext || tag), ``"hmac"`` (value: HMAC-SHA-224 of
    FINGERPRINT_MESSAGE) or ``"spki"`` (value: the public key's DER SPKI). One-way: it
    reveals neither the key nor a keystream block.
    """
    return hashlib.sha256(f"hsmkeys-fingerprint/{kind}/v1:".encode() + value).digest()


def check_import_algorithm(spec: KeySpec, algorithm: str) -> None:
    """UnsupportedOperationException unless ``algorithm`` can carry ``spec`` material.

    RSA and ECC private keys (PKCS#8) are too long for RSA-OAEP alone: they need
    RSA_AES_KEY_WRAP_*, as in AWS KMS.
    """
    if algorithm not in WRAPPING_ALGORITHMS:
        raise UnsupportedOperationException(f"Wrapping algorithm {algorithm} is not supported.")
    asymmetric = spec is not KeySpec.SYMMETRIC_DEFAULT and spec not in HMAC_IMPORT_BYTES
    if asymmetric and algorithm in OAEP_ALGORITHMS:
        raise UnsupportedOperationException(
            f"{spec} key material must be wrapped with RSA_AES_KEY_WRAP_SHA_1 or _SHA_256, not {algorithm}."
        )


def check_secret_length(spec: KeySpec, low: int, high: int) -> None:
    """IncorrectKeyMaterialException unless some length in [low, high] is allowed for ``spec``.

    A backend that knows the exact length passes it twice; the PKCS#11 backend knows
    it only to 8 bytes (see pkcs11.py).
    """
    if spec is KeySpec.SYMMETRIC_DEFAULT:
        allowed = (SYMMETRIC_IMPORT_BYTES, SYMMETRIC_IMPORT_BYTES)
    else:
        allowed = HMAC_IMPORT_BYTES[spec]
    if high < allowed[0] or low > allowed[1]:
        raise IncorrectKeyMaterialException(
            f"{spec} key material must be {allowed[0]}"
            + ("" if allowed[0] == allowed[1] else f" to {allowed[1]}")
            + " bytes long."
        )


@dataclass(frozen=True, slots=True)
class HsmStatus:
    module: str
    token_label: str
    manufacturer: str
    model: str
    serial: str


class Hsm(Protocol):
    def status(self) -> HsmStatus: ...

    def close(self) -> None: ...

    # ---------------------------------------------------------- threads
    def use_own_session(self) -> bool:
        """Let the calling thread's later calls run concurrently with other threads'
        (a session of its own, for the thread's life); False if they stay serialised."""
        ...

    def start_indexing(self) -> bool:
        """Start finding every object in the background and return at once (a miss before
        it finishes costs one lookup); False if not started."""
        ...

    # ---------------------------------------------------------- objects
    def create_key(self, ref: KeyVersionRef, spec: KeySpec, usage: KeyUsage) -> None:
        """Generate the key (pair) for ``ref`` inside the HSM as token objects.

        AES-256 for SYMMETRIC_DEFAULT, generic secret of the HMAC size for HMAC_*,
        RSA / EC pairs for the asymmetric specs. Raises AlreadyExistsException if
        ``ref`` already has an object.
        """
        ...

    def has_key(self, ref: KeyVersionRef) -> bool: ...

    def destroy_key(self, ref: KeyVersionRef) -> None:
        """Destroy every object of ``ref``; a ref with no objects is not an error."""
        ...

    def list_key_refs(self) -> set[KeyVersionRef]:
        """Every ref that has at least one ``hsmkeys/`` object in the token."""
        ...

    def random(self, n: int) -> bytes:
        """``n`` bytes from the HSM's RNG."""
        ...

    # ---------------------------------------------------------- symmetric
    def encrypt_aes_gcm(self, ref: KeyVersionRef, iv: bytes, aad: bytes, plaintext: bytes) -> bytes:
        """AES-256-GCM with a 12-byte IV and 16-byte tag; returns ciphertext || tag."""
        ...

    def decrypt_aes_gcm(self, ref: KeyVersionRef, iv: bytes, aad: bytes, ciphertext: bytes) -> bytes:
        """Inverse of encrypt_aes_gcm. Any failure (tag, AAD, IV/tag length): InvalidCiphertextException."""
        ...

    # ---------------------------------------------------------- asymmetric / HMAC
    def public_key(self, ref: KeyVersionRef) -> bytes:
        """DER SubjectPublicKeyInfo of an RSA or EC key."""
        ...

    def sign_digest(self, ref: KeyVersionRef, algorithm: SigningAlgorithm, digest: bytes) -> bytes:
        """Sign a precomputed digest of the algorithm's hash.

        RSASSA_PSS_*: salt length = digest length, MGF1 with the same hash.
        RSASSA_PKCS1_V1_5_*: DigestInfo-wrapped. ECDSA_*: DER-encoded (r, s).
        """
        ...

    def decrypt_rsa_oaep(
        self, ref: KeyVersionRef, algorithm: EncryptionAlgorithm, ciphertext: bytes
    ) -> bytes:
        """RSAES_OAEP_SHA_1 / RSAES_OAEP_SHA_256 (MGF1 same hash, empty label); private op in the HSM.

        Every failure is one InvalidCiphertextException, whatever went wrong.
        """
        ...

    def mac(self, ref: KeyVersionRef, algorithm: MacAlgorithm, message: bytes) -> bytes:
        """HMAC computed in the HSM."""
        ...

    def derive_ecdh(self, ref: KeyVersionRef, peer_public_key_der: bytes) -> bytes:
        """ECDH (CKM_ECDH1_DERIVE, no KDF) with a peer's DER SPKI; returns the raw shared secret."""
        ...

    def generate_data_key_pair(self, spec: DataKeyPairSpec) -> tuple[bytes, bytes]:
        """A fresh pair generated by the HSM (as session objects): (PKCS#8 DER private, DER SPKI public)."""
        ...

    # ---------------------------------------------------------- import (BYOK)
    def wrapping_algorithms(self) -> frozenset[str]:
        """The wrapping algorithms :meth:`import_key` can unwrap on this HSM (a subset of
        WRAPPING_ALGORITHMS); GetParametersForImport should refuse the others up front."""
        ...

    def create_wrapping_key(self, ref: KeyVersionRef, spec: str) -> bytes:
        """Generate an RSA wrapping pair (``spec`` in WRAPPING_KEY_BITS) in the HSM; return its DER SPKI.

        Token objects labelled :func:`wrapping_label`; the private half can only UNWRAP.
        ValidationException for another spec; AlreadyExistsException if ``ref`` has one.
        """
        ...

    def destroy_wrapping_key(self, ref: KeyVersionRef) -> None:
        """Destroy the wrapping pair of ``ref``; none left is not an error."""
        ...

    def list_wrapping_refs(self) -> set[KeyVersionRef]:
        """Every ref with at least one wrapping object (``hsmkeys-import/`` label) in the
        token: pairs whose import finished destroy theirs, so these are unused or leftover."""
        ...

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
        """Unwrap ``wrapped`` with the wrapping key ``wrapping`` into ``ref``'s object(s), in the HSM.

        The result has exactly the attributes :meth:`create_key` gives ``spec``/``usage``.
        SYMMETRIC_DEFAULT: 32 bytes; HMAC_*: HMAC_IMPORT_BYTES; RSA/ECC: PKCS#8 of a key
        of that size/curve, wrapped with RSA_AES_KEY_WRAP_*. ``public_key_der`` (DER
        SPKI) is needed for ECC keys on HSMs that cannot derive the public half; it must
        match the private key. Raises NotFoundException (no wrapping key),
        InvalidCiphertextException (does not unwrap), IncorrectKeyMaterialException
        (wrong length, type, size, curve or public key), UnsupportedOperationException
        (algorithm not in :meth:`wrapping_algorithms` or not usable for ``spec``),
        AlreadyExistsException (``ref`` taken). Not retried after a session loss.
        """
        ...

    def key_fingerprint(self, ref: KeyVersionRef) -> bytes:
        """32 bytes that equal for the same material and differ otherwise (see :func:`fingerprint`)."""
        ...
