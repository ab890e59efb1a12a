"""The :class:`~hsmkeys.hsm.base.Hsm` contract over PKCS#11 (python-pkcs11): the only
module of hsmkeys that imports :mod:`pkcs11`.

Objects. Every key version is one token object (AES, generic secret) or one
public/private pair, CKA_ID = ``ref.object_id``, CKA_LABEL = ``ref.label``. Secret
and private objects are TOKEN, PRIVATE, SENSITIVE, non-EXTRACTABLE, non-MODIFIABLE
with only the capabilities the key usage needs; public objects are TOKEN and
non-MODIFIABLE.

Handles. Looked up once per process and kept, keyed by ref (a version's object
never changes). The first miss builds an index of every ``hsmkeys/`` object in one
pass over the token; a later miss (a key another process created) costs one search
by CKA_ID. A stale handle (ObjectHandleInvalid / KeyHandleInvalid, for example an
object another process destroyed) is dropped and looked up again, once. Session
copies of AES keys are not used: SoftHSM2 refuses C_CopyObject on a non-MODIFIABLE
object (CKR_ATTRIBUTE_READ_ONLY), and MODIFIABLE=false is worth more than ~1.4x.

Threads. python-pkcs11 initialises the module without CKF_OS_LOCKING_OK, so SoftHSM2
runs without locks: one process-wide lock serialises every PKCS#11 call of every
instance. Scale with processes. After ``fork`` open a new instance in the child.

Errors. PKCS#11 exceptions become :mod:`hsmkeys.errors` in one table,
:data:`_ERROR_TABLE`, with one override for the decrypt operations, where any
failure is InvalidCiphertextException (never a hint of which part failed).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, TypeVar

import pkcs11
import pkcs11.exceptions as ckr
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import KDF, MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.mechanisms import GCMParams
from pkcs11.types import (
    DecryptMixin,
    DeriveMixin,
    EncryptMixin,
    Object,
    Session,
    SignMixin,
    Token,
)

from hsmkeys import keyspecs
from hsmkeys.ciphertext import INVALID_CIPHERTEXT
from hsmkeys.errors import (
    AlreadyExistsException,
    ConfigError,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    KMSError,
    KMSInternalException,
    NotFoundException,
    ValidationException,
)
from hsmkeys.hsm.base import HsmStatus
from hsmkeys.models import (
    DataKeyPairSpec,
    EncryptionAlgorithm,
    KeySpec,
    KeyUsage,
    KeyVersionRef,
    MacAlgorithm,
    SigningAlgorithm,
)

__all__ = ["Pkcs11Hsm", "module_loaded"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: One lock for every PKCS#11 call in the process (SoftHSM2 runs without OS locking).
_LOCK: Final = threading.RLock()

LABEL_PREFIX = "hsmkeys/"
GCM_IV_LEN = 12
GCM_TAG_LEN = 16
_OBJECT_ID_LEN = 20

# --------------------------------------------------------------- key material tables

# DER-encoded named-curve OIDs (CKA_EC_PARAMS) and the matching pyca curve.
_CURVES: MappingProxyType[str, tuple[bytes, ec.EllipticCurve]] = MappingProxyType(
    {
        "ECC_NIST_P256": (bytes.fromhex("06082a8648ce3d030107"), ec.SECP256R1()),
        "ECC_NIST_P384": (bytes.fromhex("06052b81040022"), ec.SECP384R1()),
        "ECC_NIST_P521": (bytes.fromhex("06052b81040023"), ec.SECP521R1()),
        "ECC_SECG_P256K1": (bytes.fromhex("06052b8104000a"), ec.SECP256K1()),
    }
)
_CURVE_BY_PARAMS: MappingProxyType[bytes, ec.EllipticCurve] = MappingProxyType(
    dict(_CURVES.values())
)
_RSA_BITS: MappingProxyType[str, int] = MappingProxyType(
    {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
)

_SECRET_TEMPLATE: Final = MappingProxyType(
    {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.MODIFIABLE: False,
    }
)
_PUBLIC_TEMPLATE: Final = MappingProxyType(
    {Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.MODIFIABLE: False}
)
# Data key pairs: session objects whose private half must be read to build PKCS#8.
_EXPORTABLE_TEMPLATE: Final = MappingProxyType(
    {
        Attribute.TOKEN: False,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: False,
        Attribute.EXTRACTABLE: True,
    }
)

_KEY_CAPABILITIES: MappingProxyType[KeyUsage, MechanismFlag] = MappingProxyType(
    {
        KeyUsage.ENCRYPT_DECRYPT: MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
        KeyUsage.SIGN_VERIFY: MechanismFlag.SIGN | MechanismFlag.VERIFY,
        KeyUsage.GENERATE_VERIFY_MAC: MechanismFlag.SIGN | MechanismFlag.VERIFY,
        KeyUsage.KEY_AGREEMENT: MechanismFlag.DERIVE,
    }
)

_HMAC_MECHANISMS: MappingProxyType[MacAlgorithm, Mechanism] = MappingProxyType(
    {
        MacAlgorithm.HMAC_SHA_224: Mechanism.SHA224_HMAC,
        MacAlgorithm.HMAC_SHA_256: Mechanism.SHA256_HMAC,
        MacAlgorithm.HMAC_SHA_384: Mechanism.SHA384_HMAC,
        MacAlgorithm.HMAC_SHA_512: Mechanism.SHA512_HMAC,
    }
)


@dataclass(frozen=True, slots=True)
class _HashInfo:
    name: str  # hashlib name
    size: int
    mechanism: Mechanism
    mgf: MGF
    digest_info: bytes  # DER DigestInfo prefix for RSASSA-PKCS1-v1_5


_SHA256 = _HashInfo(
    "sha256", 32, Mechanism.SHA256, MGF.SHA256, bytes.fromhex("3031300d060960864801650304020105000420")
)
_SHA384 = _HashInfo(
    "sha384", 48, Mechanism.SHA384, MGF.SHA384, bytes.fromhex("3041300d060960864801650304020205000430")
)
_SHA512 = _HashInfo(
    "sha512", 64, Mechanism.SHA512, MGF.SHA512, bytes.fromhex("3051300d060960864801650304020305000440")
)
_SHA1 = _HashInfo("sha1", 20, Mechanism.SHA_1, MGF.SHA1, bytes.fromhex("3021300906052b0e03021a05000414"))

_SIGNING_HASH: MappingProxyType[SigningAlgorithm, _HashInfo] = MappingProxyType(
    {
        SigningAlgorithm.RSASSA_PSS_SHA_256: _SHA256,
        SigningAlgorithm.RSASSA_PSS_SHA_384: _SHA384,
        SigningAlgorithm.RSASSA_PSS_SHA_512: _SHA512,
        SigningAlgorithm.RSASSA_PKCS1_V1_5_SHA_256: _SHA256,
        SigningAlgorithm.RSASSA_PKCS1_V1_5_SHA_384: _SHA384,
        SigningAlgorithm.RSASSA_PKCS1_V1_5_SHA_512: _SHA512,
        SigningAlgorithm.ECDSA_SHA_256: _SHA256,
        SigningAlgorithm.ECDSA_SHA_384: _SHA384,
        SigningAlgorithm.ECDSA_SHA_512: _SHA512,
    }
)
_OAEP_HASH: MappingProxyType[EncryptionAlgorithm, _HashInfo] = MappingProxyType(
    {EncryptionAlgorithm.RSAES_OAEP_SHA_1: _SHA1, EncryptionAlgorithm.RSAES_OAEP_SHA_256: _SHA256}
)

# --------------------------------------------------------------- the error table

#: PKCS#11 exception → KMS error, first match wins. Anything not listed is an HSM
#: fault (KMSInternalException). Messages name the CKR class only, never data.
_ERROR_TABLE: tuple[tuple[type[ckr.PKCS11Error], type[KMSError]], ...] = (
    (ckr.NoSuchKey, NotFoundException),
    (ckr.ObjectHandleInvalid, NotFoundException),
    (ckr.KeyHandleInvalid, NotFoundException),
    (ckr.KeyTypeInconsistent, InvalidKeyUsageException),
    (ckr.DataLenRange, ValidationException),
)
#: Decrypt operations: these mean "this ciphertext does not open", whatever the detail.
_DECRYPT_FAILURES: tuple[type[ckr.PKCS11Error], ...] = (
    ckr.GeneralError,
    ckr.EncryptedDataInvalid,
    ckr.EncryptedDataLenRange,
    ckr.DataInvalid,
    ckr.DataLenRange,
    ckr.ArgumentsBad,
    ckr.MechanismParamInvalid,
    ckr.FunctionFailed,
)
_STALE_HANDLE: tuple[type[ckr.PKCS11Error], ...] = (ckr.ObjectHandleInvalid, ckr.KeyHandleInvalid)


def _kms_error(exc: ckr.PKCS11Error, *, what: str, decrypt: bool = False) -> KMSError:
    """The one mapping from a PKCS#11 exception to a KMS error."""
    if decrypt and isinstance(exc, _DECRYPT_FAILURES):
        return InvalidCiphertextException(INVALID_CIPHERTEXT)
    for ck_type, kms_type in _ERROR_TABLE:
        if isinstance(exc, ck_type):
            return kms_type(f"HSM refused {what}: {type(exc).__name__}")
    log.error("hsm_error operation=%s ckr=%s", what, type(exc).__name__)
    return KMSInternalException(f"HSM error during {what}: {type(exc).__name__}")


def module_loaded(module: str) -> bool:
    """True if this process has already loaded (and so initialised) the PKCS#11 ``module``.

    SoftHSM2 reads SOFTHSM2_CONF and its token directory only then, so a caller that
    wants a new config must check this first.
    """
    loaded: dict[str, Any] = pkcs11._loaded  # python-pkcs11's per-path cache
    return module in loaded


# --------------------------------------------------------------- the HSM


@dataclass(slots=True)
class _KeyObjects:
    """The object(s) of one key version in this process's session."""

    secret: Object | None = None
    private: Object | None = None
    public: Object | None = None

    def add(self, obj: Object) -> None:
        cls = obj.object_class
        if cls is ObjectClass.SECRET_KEY:
            self.secret = obj
        elif cls is ObjectClass.PRIVATE_KEY:
            self.private = obj
        elif cls is ObjectClass.PUBLIC_KEY:
            self.public = obj


@dataclass(slots=True)
class _Cache:
    objects: dict[KeyVersionRef, _KeyObjects] = field(default_factory=dict)
    public_der: dict[KeyVersionRef, bytes] = field(default_factory=dict)
    hmac_keys: dict[KeyVersionRef, SignMixin] = field(default_factory=dict)  # checked HMAC keys
    indexed: bool = False

    def drop(self, ref: KeyVersionRef) -> None:
        self.objects.pop(ref, None)
        self.public_der.pop(ref, None)
        self.hmac_keys.pop(ref, None)


class Pkcs11Hsm:
    """A token opened through a PKCS#11 module; see the module docstring. Use :meth:`open`."""

    def __init__(self, *, module: str, token: Token, session: Session) -> None:
        self._module = module
        self._token = token
        self._session: Session | None = session
        self._cache = _Cache()

    @classmethod
    def open(cls, *, module: str, token_label: str, pin: str) -> Pkcs11Hsm:
        """Load ``module``, find the token labelled ``token_label`` and log in as user.

        Raises ConfigError when the module cannot be loaded, no token has that label
        or the PIN is refused (the PIN never appears in the message).
        """
        with _LOCK:
            try:
                lib = pkcs11.lib(module)
            except ckr.PKCS11Error as exc:
                raise ConfigError(f"cannot load PKCS#11 module {module}: {exc}") from None
            try:
                token = lib.get_token(token_label=token_label)
            except ckr.NoSuchToken:
                raise ConfigError(
                    f"no token labelled {token_label!r} in {module} "
                    "(for SoftHSM2: check SOFTHSM2_CONF and that the token was initialised "
                    "before the module was loaded)"
                ) from None
            except ckr.MultipleTokensReturned:
                raise ConfigError(f"several tokens are labelled {token_label!r}") from None
            session = _login(token, pin)
        return cls(module=module, token=token, session=session)

    # ---------------------------------------------------------- plumbing

    def _live_session(self) -> Session:
        if self._session is None:
            raise KMSInternalException("the HSM session is closed")
        return self._session

    @contextmanager
    def _mapped(self, what: str, *, decrypt: bool = False) -> Iterator[None]:
        try:
            yield
        except ckr.PKCS11Error as exc:
            raise _kms_error(exc, what=what, decrypt=decrypt) from None

    def _with_objects(
        self,
        ref: KeyVersionRef,
        what: str,
        use: Callable[[_KeyObjects], T],
        *,
        decrypt: bool = False,
    ) -> T:
        """Run ``use`` on the ref's cached objects under the lock; re-look-up once on a stale handle."""
        with _LOCK:
            for attempt in (1, 2):
                objects = self._objects(ref)
                try:
                    return use(objects)
                except _STALE_HANDLE:
                    self._cache.drop(ref)
                    if attempt == 2:
                        raise NotFoundException(f"no HSM object for {ref.label}") from None
                except ckr.PKCS11Error as exc:
                    raise _kms_error(exc, what=what, decrypt=decrypt) from None
        raise AssertionError("unreachable")

    def _objects(self, ref: KeyVersionRef) -> _KeyObjects:
        """Cached objects of ``ref``; builds the index on the first miss, searches on later ones."""
        found = self._cache.objects.get(ref)
        if found is not None:
            return found
        with self._mapped("lookup"):
            if not self._cache.indexed:
                self._cache.objects.update(self._scan())
                self._cache.indexed = True
                found = self._cache.objects.get(ref)
            else:
                found = self._search(ref)
                if found is not None:
                    self._cache.objects[ref] = found
        if found is None:
            raise NotFoundException(f"no HSM object for {ref.label}")
        return found

    def _search(self, ref: KeyVersionRef) -> _KeyObjects | None:
        """One C_FindObjects by CKA_ID (cost grows with the token's object count)."""
        objects = _KeyObjects()
        any_found = False
        for obj in self._live_session().get_objects({Attribute.ID: ref.object_id}):
            if obj[Attribute.LABEL] == ref.label:
                objects.add(obj)
                any_found = True
        return objects if any_found else None

    def _scan(self) -> dict[KeyVersionRef, _KeyObjects]:
        """Every hsmkeys object in the token, in one pass."""
        index: dict[KeyVersionRef, _KeyObjects] = {}
        for obj in self._live_session().get_objects():
            if obj.object_class not in (
                ObjectClass.SECRET_KEY,
                ObjectClass.PRIVATE_KEY,
                ObjectClass.PUBLIC_KEY,
            ):
                continue
            attrs = obj.get_attributes([Attribute.ID, Attribute.LABEL])
            ref = _ref_of(attrs.get(Attribute.ID), attrs.get(Attribute.LABEL))
            if ref is not None:
                index.setdefault(ref, _KeyObjects()).add(obj)
        return index

    # ---------------------------------------------------------- status

    def status(self) -> HsmStatus:
        token = self._token
        serial = token.serial.decode("ascii", "replace").strip()
        return HsmStatus(
            module=self._module,
            token_label=token.label,
            manufacturer=token.manufacturer_id,
            model=token.model,
            serial=serial,
        )

    def close(self) -> None:
        """Close the session (idempotent); the instance cannot be used afterwards."""
        with _LOCK:
            session, self._session = self._session, None
            self._cache = _Cache()
            if session is not None:
                try:
                    session.close()
                except ckr.PKCS11Error as exc:
                    log.warning("hsm_close_failed ckr=%s", type(exc).__name__)

    # ---------------------------------------------------------- objects

    def create_key(self, ref: KeyVersionRef, spec: KeySpec, usage: KeyUsage) -> None:
        if usage not in keyspecs.ALLOWED_USAGES[spec]:
            raise ValidationException(f"KeyUsage {usage} is not compatible with KeySpec {spec}")
        capabilities = _KEY_CAPABILITIES[usage]
        with _LOCK, self._mapped(f"create {ref.label}"):
            session = self._live_session()
            if self._search(ref) is not None:
                raise AlreadyExistsException(f"the HSM already holds {ref.label}")
            objects = _KeyObjects()
            common: dict[str, Any] = {"id": ref.object_id, "label": ref.label, "store": True}
            if spec is KeySpec.SYMMETRIC_DEFAULT:
                objects.add(
                    session.generate_key(
                        KeyType.AES,
                        256,
                        capabilities=capabilities,
                        template=dict(_SECRET_TEMPLATE),
                        **common,
                    )
                )
            elif spec in keyspecs.HMAC_KEY_BYTES:
                # HMAC_224 is 28 bytes: SoftHSM2 accepts it and SHA224_HMAC matches RFC 2104.
                objects.add(
                    session.generate_key(
                        KeyType.GENERIC_SECRET,
                        keyspecs.HMAC_KEY_BYTES[spec] * 8,
                        capabilities=capabilities,
                        template=dict(_SECRET_TEMPLATE),
                        **common,
                    )
                )
            else:
                public, private = _generate_pair(
                    session,
                    spec.value,
                    capabilities=capabilities,
                    public_template={**_PUBLIC_TEMPLATE, Attribute.VERIFY_RECOVER: False},
                    # SoftHSM2 defaults SIGN_RECOVER to true on RSA private keys: off.
                    private_template={**_SECRET_TEMPLATE, Attribute.SIGN_RECOVER: False},
                    **common,
                )
                objects.add(public)
                objects.add(private)
            self._cache.objects[ref] = objects
        log.info("hsm_key_created label=%s spec=%s usage=%s", ref.label, spec, usage)

    def has_key(self, ref: KeyVersionRef) -> bool:
        with _LOCK, self._mapped("lookup"):
            return self._search(ref) is not None

    def destroy_key(self, ref: KeyVersionRef) -> None:
        with _LOCK, self._mapped(f"destroy {ref.label}"):
            self._cache.drop(ref)
            destroyed = 0
            for obj in list(self._live_session().get_objects({Attribute.ID: ref.object_id})):
                if obj[Attribute.LABEL] != ref.label:
                    continue
                try:
                    obj.destroy()
                    destroyed += 1
                except _STALE_HANDLE:
                    pass  # another process destroyed it first
        if destroyed:
            log.info("hsm_key_destroyed label=%s objects=%d", ref.label, destroyed)

    def list_key_refs(self) -> set[KeyVersionRef]:
        with _LOCK, self._mapped("list"):
            index = self._scan()
            # The pass is the index: keep it (drops entries of objects destroyed elsewhere).
            self._cache.objects = index
            self._cache.public_der = {
                r: d for r, d in self._cache.public_der.items() if r in index
            }
            self._cache.hmac_keys = {}  # re-checked on next use against the fresh objects
            self._cache.indexed = True
            return set(index)

    def random(self, n: int) -> bytes:
        if n < 0:
            raise ValidationException("the number of random bytes must not be negative")
        if n == 0:
            return b""
        with _LOCK:
            try:
                # python-pkcs11 counts in bits.
                return _as_bytes(self._live_session().generate_random(n * 8))
            except ckr.PKCS11Error as exc:
                raise _kms_error(exc, what="random") from None

    # ---------------------------------------------------------- symmetric

    def encrypt_aes_gcm(self, ref: KeyVersionRef, iv: bytes, aad: bytes, plaintext: bytes) -> bytes:
        if len(iv) != GCM_IV_LEN:
            raise ValidationException(f"AES-GCM needs a {GCM_IV_LEN}-byte IV")
        params = GCMParams(iv, aad, GCM_TAG_LEN * 8)
        with _LOCK:  # fast path: the cached key (one dict lookup, no closures)
            objects = self._cache.objects.get(ref)
            key = None if objects is None else objects.secret
            if isinstance(key, EncryptMixin):
                try:
                    return _as_bytes(
                        key.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params)
                    )
                except _STALE_HANDLE:
                    self._cache.drop(ref)  # then the slow path looks it up again
                except ckr.PKCS11Error as exc:
                    raise _kms_error(exc, what="encrypt") from None

        def run(objects: _KeyObjects) -> bytes:
            key = objects.secret
            if not isinstance(key, EncryptMixin):
                raise InvalidKeyUsageException(f"{ref.label} is not an encryption key")
            return _as_bytes(key.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params))

        return self._with_objects(ref, "encrypt", run)

    def decrypt_aes_gcm(self, ref: KeyVersionRef, iv: bytes, aad: bytes, ciphertext: bytes) -> bytes:
        # SoftHSM2 accepts short IVs and tags: enforce both here.
        if len(iv) != GCM_IV_LEN or len(ciphertext) < GCM_TAG_LEN:
            raise InvalidCiphertextException(INVALID_CIPHERTEXT)
        params = GCMParams(bytes(iv), bytes(aad), GCM_TAG_LEN * 8)

        def run(objects: _KeyObjects) -> bytes:
            key = objects.secret
            if not isinstance(key, DecryptMixin):
                raise InvalidCiphertextException(INVALID_CIPHERTEXT)
            return _as_bytes(key.decrypt(bytes(ciphertext), mechanism=Mechanism.AES_GCM, mechanism_param=params))

        return self._with_objects(ref, "decrypt", run, decrypt=True)

    # ---------------------------------------------------------- asymmetric / HMAC

    def public_key(self, ref: KeyVersionRef) -> bytes:
        cached = self._cache.public_der.get(ref)
        if cached is not None:
            return cached

        def run(objects: _KeyObjects) -> bytes:
            if objects.public is None:
                raise NotFoundException(f"{ref.label} has no public key")
            return _spki(objects.public)

        der = self._with_objects(ref, "read public key", run)
        self._cache.public_der[ref] = der
        return der

    def sign_digest(self, ref: KeyVersionRef, algorithm: SigningAlgorithm, digest: bytes) -> bytes:
        info = _SIGNING_HASH[algorithm]
        if len(digest) != info.size:
            raise ValidationException(f"Digest is invalid length for algorithm {algorithm}.")
        digest = bytes(digest)

        def run(objects: _KeyObjects) -> bytes:
            key = objects.private
            if not isinstance(key, SignMixin):
                raise InvalidKeyUsageException(f"{ref.label} is not a signing key")
            if algorithm.startswith("ECDSA_"):
                if key.key_type is not KeyType.EC:
                    raise InvalidKeyUsageException(f"{algorithm} needs an EC key")
                raw = key.sign(digest, mechanism=Mechanism.ECDSA)
                half = len(raw) // 2
                return encode_dss_signature(
                    int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
                )
            if key.key_type is not KeyType.RSA:
                raise InvalidKeyUsageException(f"{algorithm} needs an RSA key")
            if algorithm.startswith("RSASSA_PSS_"):
                return key.sign(
                    digest,
                    mechanism=Mechanism.RSA_PKCS_PSS,
                    mechanism_param=(info.mechanism, info.mgf, info.size),
                )
            return key.sign(info.digest_info + digest, mechanism=Mechanism.RSA_PKCS)

        return self._with_objects(ref, f"sign {algorithm}", run)

    def decrypt_rsa_oaep(
        self, ref: KeyVersionRef, algorithm: EncryptionAlgorithm, ciphertext: bytes
    ) -> bytes:
        """SHA-1 through CKM_RSA_PKCS_OAEP. SHA-256: SoftHSM2 2.6 answers CKR_ARGUMENTS_BAD to
        OAEP with SHA-256, so the raw RSA private operation (CKM_RSA_X_509) runs in the HSM
        and EME-OAEP is decoded here by :func:`_oaep_decode`.
        """
        info = _OAEP_HASH.get(algorithm)
        if info is None:
            raise InvalidKeyUsageException(f"{algorithm} is not an RSA OAEP algorithm")
        ciphertext = bytes(ciphertext)

        def run(objects: _KeyObjects) -> bytes:
            key = objects.private
            if not isinstance(key, DecryptMixin) or key.key_type is not KeyType.RSA:
                raise InvalidCiphertextException(INVALID_CIPHERTEXT)
            k = len(key[Attribute.MODULUS])
            if len(ciphertext) != k:
                raise InvalidCiphertextException(INVALID_CIPHERTEXT)
            if info is _SHA1:
                return _as_bytes(
                    key.decrypt(
                        ciphertext,
                        mechanism=Mechanism.RSA_PKCS_OAEP,
                        mechanism_param=(Mechanism.SHA_1, MGF.SHA1, None),
                    )
                )
            em = _as_bytes(key.decrypt(ciphertext, mechanism=Mechanism.RSA_X_509))
            return _oaep_decode(em.rjust(k, b"\x00"), info.name, k)

        return self._with_objects(ref, "decrypt", run, decrypt=True)

    def mac(self, ref: KeyVersionRef, algorithm: MacAlgorithm, message: bytes) -> bytes:
        mechanism = _HMAC_MECHANISMS[algorithm]
        message = bytes(message)
        with _LOCK:  # fast path (every audit line takes one): a key already checked
            checked = self._cache.hmac_keys.get(ref)
            if checked is not None:
                try:
                    return _as_bytes(checked.sign(message, mechanism=mechanism))
                except _STALE_HANDLE:
                    self._cache.drop(ref)
                except ckr.PKCS11Error as exc:
                    raise _kms_error(exc, what=f"mac {algorithm}") from None

        def run(objects: _KeyObjects) -> bytes:
            key = objects.secret
            if not isinstance(key, SignMixin) or key.key_type is not KeyType.GENERIC_SECRET:
                raise InvalidKeyUsageException(f"{ref.label} is not an HMAC key")
            self._cache.hmac_keys[ref] = key
            return _as_bytes(key.sign(message, mechanism=mechanism))

        return self._with_objects(ref, f"mac {algorithm}", run)

    def derive_ecdh(self, ref: KeyVersionRef, peer_public_key_der: bytes) -> bytes:
        try:
            peer = serialization.load_der_public_key(bytes(peer_public_key_der))
        except (ValueError, UnsupportedAlgorithm):
            peer = None
        if not isinstance(peer, ec.EllipticCurvePublicKey):
            raise ValidationException("PublicKey must be a DER SubjectPublicKeyInfo of an EC key.")
        # SoftHSM2 takes the raw uncompressed point or its DER OCTET STRING; raw is the standard form.
        point = peer.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        size = (peer.curve.key_size + 7) // 8

        def run(objects: _KeyObjects) -> bytes:
            key = objects.private
            if not isinstance(key, DeriveMixin) or key.key_type is not KeyType.EC:
                raise InvalidKeyUsageException(f"{ref.label} is not a key agreement key")
            curve = _CURVE_BY_PARAMS.get(bytes(key[Attribute.EC_PARAMS]))
            if curve is None or curve.name != peer.curve.name:
                raise ValidationException("PublicKey is not on the curve of the KMS key.")
            secret = key.derive_key(
                KeyType.GENERIC_SECRET,
                size * 8,
                store=False,
                capabilities=MechanismFlag(0),
                mechanism=Mechanism.ECDH1_DERIVE,
                mechanism_param=(KDF.NULL, None, point),
                template={
                    Attribute.TOKEN: False,
                    Attribute.SENSITIVE: False,
                    Attribute.EXTRACTABLE: True,
                },
            )
            try:
                return bytes(secret[Attribute.VALUE])
            finally:
                secret.destroy()

        return self._with_objects(ref, "derive", run)

    def generate_data_key_pair(self, spec: DataKeyPairSpec) -> tuple[bytes, bytes]:
        """Generated by the HSM as exportable session objects, read once, then destroyed."""
        with _LOCK, self._mapped(f"generate data key pair {spec}"):
            public, private = _generate_pair(
                self._live_session(),
                spec.value,
                store=False,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template={Attribute.TOKEN: False},
                private_template=dict(_EXPORTABLE_TEMPLATE),
            )
            try:
                public_der = _spki(public)
                private_key = _private_key(private, spec.value)
            finally:
                for obj in (private, public):
                    try:
                        obj.destroy()
                    except ckr.PKCS11Error as exc:
                        log.warning("hsm_session_object_not_destroyed ckr=%s", type(exc).__name__)
        private_der = private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return private_der, public_der


# --------------------------------------------------------------- helpers


def _login(token: Token, pin: str) -> Session:
    try:
        return token.open(rw=True, user_pin=pin)
    except ckr.UserAlreadyLoggedIn:
        # Another instance in this process logged in: the login is per application.
        return token.open(rw=True)
    except (ckr.PinIncorrect, ckr.PinInvalid, ckr.PinLenRange, ckr.PinLocked) as exc:
        raise ConfigError(f"the token refused the PIN ({type(exc).__name__})") from None
    except ckr.PKCS11Error as exc:
        raise KMSInternalException(f"cannot open an HSM session: {type(exc).__name__}") from None


def _generate_pair(
    session: Session,
    spec: str,
    *,
    capabilities: MechanismFlag,
    public_template: dict[Attribute, Any],
    private_template: dict[Attribute, Any],
    **kwargs: Any,
) -> tuple[Object, Object]:
    if spec in _RSA_BITS:
        # python-pkcs11 sets CKA_PUBLIC_EXPONENT = 65537 for RSA.
        return session.generate_keypair(
            KeyType.RSA,
            _RSA_BITS[spec],
            capabilities=capabilities,
            public_template=public_template,
            private_template=private_template,
            **kwargs,
        )
    if spec in _CURVES:
        params, _ = _CURVES[spec]
        return session.generate_keypair(
            KeyType.EC,
            capabilities=capabilities,
            public_template={**public_template, Attribute.EC_PARAMS: params},
            private_template=private_template,
            **kwargs,
        )
    raise ValidationException(f"KeySpec {spec} is not an asymmetric key spec")


def _ref_of(object_id: object, label: object) -> KeyVersionRef | None:
    """The ref an object belongs to, or None for objects that are not hsmkeys'."""
    if not isinstance(object_id, bytes) or not isinstance(label, str):
        return None
    if len(object_id) != _OBJECT_ID_LEN or not label.startswith(LABEL_PREFIX):
        return None
    ref = KeyVersionRef(uuid.UUID(bytes=object_id[:16]), int.from_bytes(object_id[16:], "big"))
    return ref if ref.label == label else None


def _as_bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise KMSInternalException("the HSM returned no data")
    return value


def _der_octet_string(der: bytes) -> bytes:
    """The content of a DER OCTET STRING (CKA_EC_POINT); the input itself if it is not one."""
    if len(der) < 2 or der[0] != 0x04:
        return der
    length, offset = der[1], 2
    if length & 0x80:
        n = length & 0x7F
        length, offset = int.from_bytes(der[2 : 2 + n], "big"), 2 + n
    body = der[offset:]
    return body if len(body) == length else der


def _spki(public: Object) -> bytes:
    """DER SubjectPublicKeyInfo built from a public key object's attributes."""
    key_type = public[Attribute.KEY_TYPE]
    loaded: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    if key_type is KeyType.RSA:
        attrs = public.get_attributes([Attribute.MODULUS, Attribute.PUBLIC_EXPONENT])
        loaded = rsa.RSAPublicNumbers(
            int.from_bytes(attrs[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(attrs[Attribute.MODULUS], "big"),
        ).public_key()
    elif key_type is KeyType.EC:
        attrs = public.get_attributes([Attribute.EC_PARAMS, Attribute.EC_POINT])
        curve = _CURVE_BY_PARAMS.get(bytes(attrs[Attribute.EC_PARAMS]))
        if curve is None:
            raise KMSInternalException("the HSM key is on an unsupported curve")
        point = _der_octet_string(bytes(attrs[Attribute.EC_POINT]))
        try:
            loaded = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        except ValueError:
            raise KMSInternalException("the HSM returned a malformed EC point") from None
    else:
        raise KMSInternalException(f"the HSM key has no public key form ({key_type!r})")
    return loaded.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_key(private: Object, spec: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """A pyca private key from an exportable (non-sensitive) session object."""
    if spec in _RSA_BITS:
        a = private.get_attributes(
            [
                Attribute.MODULUS,
                Attribute.PUBLIC_EXPONENT,
                Attribute.PRIVATE_EXPONENT,
                Attribute.PRIME_1,
                Attribute.PRIME_2,
                Attribute.EXPONENT_1,
                Attribute.EXPONENT_2,
                Attribute.COEFFICIENT,
            ]
        )

        def n(attr: Attribute) -> int:
            return int.from_bytes(a[attr], "big")

        public = rsa.RSAPublicNumbers(n(Attribute.PUBLIC_EXPONENT), n(Attribute.MODULUS))
        return rsa.RSAPrivateNumbers(
            p=n(Attribute.PRIME_1),
            q=n(Attribute.PRIME_2),
            d=n(Attribute.PRIVATE_EXPONENT),
            dmp1=n(Attribute.EXPONENT_1),
            dmq1=n(Attribute.EXPONENT_2),
            iqmp=n(Attribute.COEFFICIENT),
            public_numbers=public,
        ).private_key()
    _, curve = _CURVES[spec]
    return ec.derive_private_key(int.from_bytes(private[Attribute.VALUE], "big"), curve)


def _mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def _oaep_decode(em: bytes, hash_name: str, k: int) -> bytes:
    """EME-OAEP decoding (RFC 8017 7.1.2 step 3) with an empty label.

    Every check runs on every input and the outcome is one flag, so nothing reveals
    which check failed or where (Python cannot promise constant time; there is no
    early exit on secret data). Any failure: InvalidCiphertextException.
    """
    h_len = hashlib.new(hash_name).digest_size
    if k < 2 * h_len + 2 or len(em) != k:
        raise InvalidCiphertextException(INVALID_CIPHERTEXT)
    l_hash = hashlib.new(hash_name, b"").digest()
    y = em[0]
    masked_seed, masked_db = em[1 : 1 + h_len], em[1 + h_len :]
    seed = bytes(a ^ b for a, b in zip(masked_seed, _mgf1(masked_db, h_len, hash_name), strict=True))
    db = bytes(a ^ b for a, b in zip(masked_db, _mgf1(seed, k - h_len - 1, hash_name), strict=True))
    good = int(hmac.compare_digest(db[:h_len], l_hash)) & int(y == 0)
    looking = 1  # still in the zero padding, before the 0x01 separator
    separator = 0
    bad_padding = 0
    for i, byte in enumerate(db[h_len:]):
        is_zero = int(byte == 0)
        is_one = int(byte == 1)
        found_here = looking & is_one
        separator = found_here * i + (1 - found_here) * separator
        bad_padding |= looking & (1 - is_zero) & (1 - is_one)
        looking &= 1 - is_one
    if not (good & (1 - looking) & (1 - bad_padding)):
        raise InvalidCiphertextException(INVALID_CIPHERTEXT)
    return db[h_len + separator + 1 :]
