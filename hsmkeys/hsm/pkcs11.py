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

Threads. python-pkcs11 initialises a module without CKF_OS_LOCKING_OK (SoftHSM2 then
runs without locks), so the first :meth:`Pkcs11Hsm.open` of a module in a process
initialises it itself with CKF_OS_LOCKING_OK (:class:`_LockingLib`). Calls then
serialise per *lane*: a session, its handle cache and a lock. Every thread shares one
lane unless it called :meth:`Pkcs11Hsm.use_own_session`, which gives it a lane of its
own, so a slow call there (an RSA-4096 generation, ~1.7 s) runs while other threads
keep encrypting. An object is only ever used through the lane that found or made it
(python-pkcs11 binds objects to their session), so a key another lane created costs
this lane one search by CKA_ID on first use. When the module was already initialised
without locking (loaded by other code first), every lane is the shared one and one
process-wide lock serialises every call, as before. A device error re-initialises the
module: calls in flight on other lanes then fail once (KMSInternalException) and the
next opens a new session. After ``fork`` open a new instance in the child.

Index. :meth:`Pkcs11Hsm.start_indexing` scans the token in a background thread on a
session of its own and hands the index (and that session) to the shared lane; until
then a miss costs one search by CKA_ID instead of the whole scan.

Errors. PKCS#11 exceptions become :mod:`hsmkeys.errors` in one table,
:data:`_ERROR_TABLE`, with one override for the decrypt operations, where any
failure is InvalidCiphertextException (never a hint of which part failed).
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, TypeVar

import pkcs11
import pkcs11.exceptions as ckr
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import KDF, MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass, _pkcs11
from pkcs11.constants import DEFAULT
from pkcs11.mechanisms import GCMParams
from pkcs11.types import (
    DecryptMixin,
    DeriveMixin,
    EncryptMixin,
    Object,
    Session,
    SignMixin,
    Token,
    UnwrapMixin,
    WrapMixin,
)

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Lib

from hsmkeys import keyspecs
from hsmkeys.ciphertext import INVALID_CIPHERTEXT
from hsmkeys.errors import (
    AlreadyExistsException,
    ConfigError,
    DependencyTimeoutException,
    IncorrectKeyMaterialException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    KMSError,
    KMSInternalException,
    NotFoundException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkeys.hsm import ecpoint
from hsmkeys.hsm.base import (
    FINGERPRINT_AAD,
    FINGERPRINT_BLOCK,
    FINGERPRINT_IV,
    FINGERPRINT_MESSAGE,
    HMAC_IMPORT_BYTES,
    OAEP_ALGORITHMS,
    SYMMETRIC_IMPORT_BYTES,
    WRAPPING_ALGORITHMS,
    WRAPPING_KEY_BITS,
    WRAPPING_LABEL_PREFIX,
    HsmStatus,
    check_import_algorithm,
    check_secret_length,
    fingerprint,
    wrapping_label,
    wrapping_object_id,
)
from hsmkeys.hsm.finder import ObjectFinder, function_list
from hsmkeys.models import (
    DataKeyPairSpec,
    EncryptionAlgorithm,
    KeySpec,
    KeyUsage,
    KeyVersionRef,
    MacAlgorithm,
    SigningAlgorithm,
)

__all__ = ["Pkcs11Hsm", "module_loaded", "preload_module"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: One lock for every PKCS#11 call in the process when the module runs without OS locking;
#: also held while a module is loaded.
_LOCK: Final = threading.RLock()
#: How long the background index waits before its pass over the token (see _index_in_background).
_INDEX_START_DELAY_S: Final = 1.0
#: How long a request waits for that lock (an HSM call that hangs holds it) before
#: DependencyTimeoutException; RSA-4096 generation takes ~2 s, a 10,000-key index ~1 s.
DEFAULT_LOCK_TIMEOUT_S: Final = 30.0
#: Per module: bumped on every C_Finalize/C_Initialize, after which every session and
#: handle of the process is void (instances compare it before each call).
_GENERATION: dict[str, int] = {}
#: Modules this process initialised with CKF_OS_LOCKING_OK (threads may use separate sessions).
_OS_LOCKING: set[str] = set()
#: Token object creation and destruction, one at a time per process even across lanes:
#: SoftHSM2 answered concurrent ones from two threads with CKR_GENERAL_ERROR now and then.
#: Taken inside a lane's lock, never the other way round.
_TOKEN_WRITES: Final = threading.RLock()

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
# Transient objects of an import: session-only, sensitive, never extractable by default.
_SESSION_SECRET: Final = MappingProxyType(
    {Attribute.TOKEN: False, Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}
)
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
_SPEC_MAC: MappingProxyType[KeySpec, MacAlgorithm] = MappingProxyType(
    {
        KeySpec.HMAC_224: MacAlgorithm.HMAC_SHA_224,
        KeySpec.HMAC_256: MacAlgorithm.HMAC_SHA_256,
        KeySpec.HMAC_384: MacAlgorithm.HMAC_SHA_384,
        KeySpec.HMAC_512: MacAlgorithm.HMAC_SHA_512,
    }
)
#: CK_RSA_PKCS_OAEP_PARAMS for import unwrapping (empty label).
_OAEP_PARAMS: MappingProxyType[str, Any] = MappingProxyType(
    {"SHA_1": (Mechanism.SHA_1, MGF.SHA1, None), "SHA_256": (Mechanism.SHA256, MGF.SHA256, None)}
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
#: The session is gone (or logged out): open a new one and log in again.
_SESSION_LOST: tuple[type[ckr.PKCS11Error], ...] = (
    ckr.SessionHandleInvalid,
    ckr.SessionClosed,
    ckr.UserNotLoggedIn,
)
#: The device is gone: also finalize and re-initialise the module (every handle is void).
_DEVICE_LOST: tuple[type[ckr.PKCS11Error], ...] = (ckr.DeviceError, ckr.DeviceRemoved, ckr.TokenNotPresent)
_LOST: tuple[type[ckr.PKCS11Error], ...] = _SESSION_LOST + _DEVICE_LOST
# What SoftHSM2 answers a key generation that lost a race on its object files.
_GENERATE_GLITCH: tuple[type[ckr.PKCS11Error], ...] = (ckr.FunctionFailed, ckr.GeneralError)
#: Import: the wrapped material does not open (tampered, wrong wrapping key).
_WRAPPED_INVALID: tuple[type[ckr.PKCS11Error], ...] = (
    ckr.GeneralError,
    ckr.EncryptedDataInvalid,
    ckr.EncryptedDataLenRange,
    ckr.WrappedKeyInvalid,
    ckr.WrappedKeyLenRange,
)


def _kms_error(exc: ckr.PKCS11Error, *, what: str, decrypt: bool = False) -> KMSError:
    """The one mapping from a PKCS#11 exception to a KMS error."""
    if decrypt and isinstance(exc, _DECRYPT_FAILURES):
        return InvalidCiphertextException(INVALID_CIPHERTEXT)
    for ck_type, kms_type in _ERROR_TABLE:
        if isinstance(exc, ck_type):
            return kms_type(f"HSM refused {what}: {type(exc).__name__}")
    log.error("hsm_error operation=%s ckr=%s", what, type(exc).__name__)
    return KMSInternalException(f"HSM error during {what}: {type(exc).__name__}")


_CKF_OS_LOCKING_OK: Final = 0x2
_CKR_OK: Final = 0x0
_CKR_CANT_LOCK: Final = 0xA
_CKR_CRYPTOKI_NOT_INITIALIZED: Final = 0x190
_CKR_CRYPTOKI_ALREADY_INITIALIZED: Final = 0x191
_CK_RV_FN = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)


class _CkInitializeArgs(ctypes.Structure):
    _fields_ = (
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    )


class _LockingLib(_pkcs11.lib):  # a cdef class whose cpdef initialize a subclass may override
    """python-pkcs11's ``lib``, but C_Initialize asks for the OS's locking (CKF_OS_LOCKING_OK).

    The module is the same shared object python-pkcs11 loaded (dlopen returns the loaded
    one); only C_Initialize/C_Finalize go through ctypes. ``initialized`` (read-only in
    python-pkcs11) stays False, so python-pkcs11 never finalizes on its own.
    ``locking`` is False when the module refused OS locking (CKR_CANT_LOCK): it then
    runs without locks and every call is serialised by the process lock.
    """

    def __init__(self, so: str) -> None:
        self._dll, functions = function_list(so)  # the CDLL keeps the module loaded
        self._initialize = _CK_RV_FN(functions.C_Initialize)
        self._finalize = _CK_RV_FN(functions.C_Finalize)
        self.locking = True
        super().__init__(so)  # calls initialize()

    def initialize(self) -> None:
        args = _CkInitializeArgs(flags=_CKF_OS_LOCKING_OK)
        rv = self._initialize(ctypes.addressof(args))
        if rv == _CKR_CANT_LOCK:
            self.locking = False
            rv = self._initialize(None)
        if rv not in (_CKR_OK, _CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise ckr.PKCS11Error(f"C_Initialize returned {rv:#x}")

    def finalize(self) -> None:
        rv = self._finalize(None)
        if rv not in (_CKR_OK, _CKR_CRYPTOKI_NOT_INITIALIZED):
            raise ckr.PKCS11Error(f"C_Finalize returned {rv:#x}")


def _load_module(module: str) -> Pkcs11Lib:
    """The module's python-pkcs11 ``lib``: initialised with OS locking if this is its first load
    in the process (then ``module`` joins _OS_LOCKING). Call with _LOCK held."""
    loaded: dict[str, Any] = pkcs11._loaded
    if module in loaded:
        return pkcs11.lib(module)
    lib = _LockingLib(module)
    loaded[module] = lib  # so pkcs11.lib() and module_loaded() find it
    # Loaded for the process's life (as python-pkcs11 keeps it); one extra reference keeps it
    # out of interpreter teardown, where lib.__dealloc__ would look up unload() on a
    # subclass whose type may already be cleared ("Exception ignored ... no attribute").
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(lib))
    if lib.locking:
        _OS_LOCKING.add(module)
    log.info("hsm_module_loaded module=%s os_locking=%s", module, lib.locking)
    return lib


def preload_module(module: str, token_label: str) -> None:
    """Load and initialise ``module`` now, so that a later :meth:`Pkcs11Hsm.open` finds it
    loaded: run from a thread, SoftHSM2's read of its token directory at C_Initialize
    (~1 s for 30,000 objects; the GIL is released) overlaps the caller's other start-up
    work. Errors are left for ``open`` to meet again and report.
    """
    with _LOCK:
        if module in pkcs11._loaded:
            return
        try:
            _find_token_loaded_now(_load_module(module), module, token_label)
        except (ckr.PKCS11Error, ConfigError) as exc:
            log.debug("hsm_preload_failed module=%s error=%s", module, type(exc).__name__)


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
    """The object(s) of one key version in this process's session.

    ``duplicate`` is set when the token holds two objects of one class for the ref
    (a crash leftover of a re-used version): every process then refuses the ref,
    rather than each picking whichever object its search returned first.
    """

    secret: Object | None = None
    private: Object | None = None
    public: Object | None = None
    duplicate: bool = False
    modulus_len: int | None = None  # RSA: read once (an attribute read is a PKCS#11 call)

    def add(self, obj: Object) -> None:
        cls = obj.object_class
        if cls is ObjectClass.SECRET_KEY:
            self.duplicate |= self.secret is not None
            self.secret = obj
        elif cls is ObjectClass.PRIVATE_KEY:
            self.duplicate |= self.private is not None
            self.private = obj
        elif cls is ObjectClass.PUBLIC_KEY:
            self.duplicate |= self.public is not None
            self.public = obj


@dataclass(slots=True)
class _Cache:
    objects: dict[KeyVersionRef, _KeyObjects] = field(default_factory=dict)
    public_der: dict[KeyVersionRef, bytes] = field(default_factory=dict)
    hmac_keys: dict[KeyVersionRef, SignMixin] = field(default_factory=dict)  # checked HMAC keys
    wrapping: dict[KeyVersionRef, Object] = field(default_factory=dict)  # private halves
    indexed: bool = False

    def drop(self, ref: KeyVersionRef) -> None:
        self.objects.pop(ref, None)
        self.public_der.pop(ref, None)
        self.hmac_keys.pop(ref, None)


@dataclass(eq=False, slots=True)
class _Lane:
    """A session, the handles found or made through it, and the lock its calls take.

    ``kept`` holds sessions whose objects this lane adopted (the background index):
    only this lane uses them, under its lock.
    """

    lock: threading.RLock
    session: Session | None = None
    generation: int = 0
    cache: _Cache = field(default_factory=_Cache)
    kept: list[Session] = field(default_factory=list)


class Pkcs11Hsm:
    """A token opened through a PKCS#11 module; see the module docstring. Use :meth:`open`."""

    def __init__(
        self,
        *,
        module: str,
        lib: Pkcs11Lib,
        token: Token,
        session: Session,
        pin: str,
        session_wrapper: Callable[[Session], Session] | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
    ) -> None:
        self._module = module
        self._lib = lib
        self._token = token
        self._token_label = token.label
        self._pin = pin  # kept to log in again after a lost session; never logged
        self._wrap_session = session_wrapper
        self._lock_timeout = lock_timeout
        self._concurrent = module in _OS_LOCKING
        # The lane every thread uses unless it asked for its own (see use_own_session).
        self._shared = _Lane(
            lock=threading.RLock() if self._concurrent else _LOCK,
            session=session if session_wrapper is None else session_wrapper(session),
            generation=_GENERATION.get(module, 0),
        )
        self._lanes: list[_Lane] = [self._shared]
        self._local = threading.local()
        self._indexer: threading.Thread | None = None
        self._destroyed_while_indexing: set[KeyVersionRef] = set()
        self._closed = False
        self._closing = threading.Event()
        self._oaep_sha256: bool | None = None
        # Searches skip python-pkcs11's per-object cost (hsmkeys.hsm.finder); a fault-injecting
        # session wrapper sees python-pkcs11's calls only, so with one every search is python-pkcs11's.
        self._finder = ObjectFinder(module) if session_wrapper is None else None

    # The current thread's lane: its own after use_own_session(), else the shared one.
    def _lane(self) -> _Lane:
        lane: _Lane = getattr(self._local, "lane", self._shared)
        return lane

    @property
    def _session(self) -> Session | None:
        return self._lane().session

    @_session.setter
    def _session(self, session: Session | None) -> None:
        self._lane().session = session

    @property
    def _generation(self) -> int:
        return self._lane().generation

    @_generation.setter
    def _generation(self, generation: int) -> None:
        self._lane().generation = generation

    @property
    def _cache(self) -> _Cache:
        return self._lane().cache

    @_cache.setter
    def _cache(self, cache: _Cache) -> None:
        self._lane().cache = cache

    def use_own_session(self) -> bool:
        """Give the calling thread a lane of its own (a new session and handle cache) for
        the rest of its life, so its calls run concurrently with other threads' calls.

        False (and the thread keeps sharing the process's lane) when the module runs
        without OS locking. The session opens on the thread's first call.
        """
        if not self._concurrent:
            return False
        if getattr(self._local, "lane", None) is None:
            lane = _Lane(lock=threading.RLock(), generation=_GENERATION.get(self._module, 0))
            with _LOCK:
                self._lanes.append(lane)
            self._local.lane = lane
        return True

    def __repr__(self) -> str:
        return f"Pkcs11Hsm(module={self._module!r}, token={self._token_label!r})"

    @classmethod
    def open(
        cls,
        *,
        module: str,
        token_label: str,
        pin: str,
        session_wrapper: Callable[[Session], Session] | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
    ) -> Pkcs11Hsm:
        """Load ``module``, find the token labelled ``token_label`` and log in as user.

        Raises ConfigError when the module cannot be loaded, no token has that label
        or the PIN is refused (the PIN never appears in the message).
        ``session_wrapper`` wraps every session the instance opens (fault injection in
        tests: :mod:`hsmkeys.hsm.faults`); ``lock_timeout`` bounds the wait for the
        process-wide HSM lock (DependencyTimeoutException after it).
        """
        with _LOCK:
            first_load = module not in pkcs11._loaded
            try:
                lib = _load_module(module)
            except ckr.PKCS11Error as exc:
                raise ConfigError(f"cannot load PKCS#11 module {module}: {exc}") from None
            token = _find_token_loaded_now(lib, module, token_label) if first_load else _find_token(
                lib, module, token_label
            )
            session = _login(token, pin)
        return cls(
            module=module,
            lib=lib,
            token=token,
            session=session,
            pin=pin,
            session_wrapper=session_wrapper,
            lock_timeout=lock_timeout,
        )

    # ---------------------------------------------------------- plumbing

    def _call(self, what: str, op: Callable[[], T], *, retry: bool, decrypt: bool = False) -> T:
        """Run ``op`` under the process lock, with the one error mapping and session recovery.

        A lost session or device (_SESSION_LOST, _DEVICE_LOST) is discarded (a device
        error also re-initialises the module), and ``op`` runs once more on a new
        session when ``retry`` (idempotent operations); otherwise, or if that fails
        too, the request gets KMSInternalException and the next one opens a new session.
        """
        lock = self._lane().lock
        # Uncontended (the usual case): the non-blocking try is the cheaper call.
        if not (lock.acquire(False) or lock.acquire(timeout=self._lock_timeout)):
            log.error("hsm_lock_timeout operation=%s timeout_s=%s", what, self._lock_timeout)
            raise DependencyTimeoutException(
                f"the HSM did not answer within {self._lock_timeout:g} s ({what}); retry later"
            )
        try:
            for attempt in (1, 2):
                try:
                    self._live_session()  # (re)opened before op reads the cache it resets
                    return op()
                except _LOST as exc:
                    log.warning(
                        "hsm_session_lost operation=%s ckr=%s attempt=%d", what, type(exc).__name__, attempt
                    )
                    self._discard_session(reinitialize=isinstance(exc, _DEVICE_LOST))
                    if not retry or attempt == 2:
                        raise KMSInternalException(
                            f"HSM session lost during {what}: {type(exc).__name__}"
                        ) from None
                except ckr.PKCS11Error as exc:
                    raise _kms_error(exc, what=what, decrypt=decrypt) from None
            raise AssertionError("unreachable")
        finally:
            lock.release()

    def _live_session(self) -> Session:
        """The session, opened again (and logged in) if it was lost or the module re-initialised."""
        if self._closed:
            raise KMSInternalException("the HSM session is closed")
        session = self._session
        if session is None or self._generation != _GENERATION.get(self._module, 0):
            session = self._reopen()
        return session

    def _discard_session(self, *, reinitialize: bool) -> None:
        """Forget the session and every handle; on a device error finalize and initialise the module."""
        session, self._session = self._session, None
        self._cache = _Cache()
        if session is not None:
            with suppress(ckr.PKCS11Error):  # it is already gone: that is why it is discarded
                session.close()
        if reinitialize:
            # Every session and handle of the process dies with C_Finalize: other instances
            # notice through _GENERATION and open new sessions too.
            _GENERATION[self._module] = _GENERATION.get(self._module, 0) + 1
            try:
                self._lib.finalize()
            except ckr.PKCS11Error as exc:
                log.warning("hsm_finalize_failed ckr=%s", type(exc).__name__)
            try:
                self._lib.initialize()
            except ckr.PKCS11Error as exc:
                log.error("hsm_initialize_failed ckr=%s", type(exc).__name__)
            log.warning("hsm_module_reinitialized module=%s", self._module)

    def _reopen(self) -> Session:
        self._session = None
        self._cache = _Cache()
        generation = _GENERATION.get(self._module, 0)
        try:
            if generation != self._generation:
                self._lib.initialize()  # no-op when initialised; needed if an initialise failed before
                self._token = _find_token(self._lib, self._module, self._token_label)
            session = _login(self._token, self._pin)
        except (ckr.PKCS11Error, ConfigError, KMSError) as exc:
            raise KMSInternalException(f"cannot open a new HSM session: {type(exc).__name__}") from None
        self._session = session if self._wrap_session is None else self._wrap_session(session)
        self._generation = generation
        log.warning("hsm_session_opened module=%s token=%s", self._module, self._token_label)
        return self._session

    @contextmanager
    def _mapped(self, what: str, *, decrypt: bool = False) -> Iterator[None]:
        """Map PKCS#11 errors of a step to KMS errors; a lost session goes up to :meth:`_call`."""
        try:
            yield
        except _LOST:
            raise
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
        """Run ``use`` on the ref's cached objects (an idempotent operation); re-look-up once on a stale handle.

        The usual case (objects cached, session live, lock free) runs ``use`` directly under
        the lane's lock; a stale handle or a lost session there goes the whole way through
        :meth:`_call` (which looks up, recovers and retries), any other PKCS#11 error is
        mapped as :meth:`_call` maps it.
        """
        lane = self._lane()
        lock = lane.lock
        if lock.acquire(False):
            try:
                objects = lane.cache.objects.get(ref)
                if (
                    objects is not None
                    and not objects.duplicate
                    and lane.session is not None
                    and lane.generation == _GENERATION.get(self._module, 0)
                    and not self._closed
                ):
                    try:
                        return use(objects)
                    except _STALE_HANDLE + _LOST:
                        pass  # below, through _call
                    except ckr.PKCS11Error as exc:
                        raise _kms_error(exc, what=what, decrypt=decrypt) from None
            finally:
                lock.release()

        def attempt() -> T:
            for tries in (1, 2):
                objects = self._objects(ref)
                try:
                    return use(objects)
                except _STALE_HANDLE:
                    self._cache.drop(ref)
                    if tries == 2:
                        raise NotFoundException(f"no HSM object for {ref.label}") from None
            raise AssertionError("unreachable")

        return self._call(what, attempt, retry=True, decrypt=decrypt)

    def _objects(self, ref: KeyVersionRef) -> _KeyObjects:
        """Cached objects of ``ref``; builds the index on the first miss, searches on later ones."""
        found = self._cache.objects.get(ref)
        if found is None:
            with self._mapped("lookup"):
                if not self._cache.indexed and not self._background_index_pending():
                    self._build_index()
                    found = self._cache.objects.get(ref)
                else:
                    found = self._search(ref)
                    if found is not None:
                        self._cache.objects[ref] = found
        if found is None:
            raise NotFoundException(f"no HSM object for {ref.label}")
        if found.duplicate:
            log.error("hsm_duplicate_objects label=%s", ref.label)
            raise KMSInternalException(f"several HSM objects carry {ref.label}; run hsmkeys doctor")
        return found

    def _background_index_pending(self) -> bool:
        """True on the shared lane while start_indexing's scan has not been handed over."""
        indexer = self._indexer
        return indexer is not None and indexer.is_alive() and self._lane() is self._shared

    def _build_index(self) -> None:
        index = self._scan()
        self._cache.objects.update(index)
        self._cache.indexed = True

    def _find(self, template: dict[Attribute, Any] | None = None) -> list[Object]:
        """Every object of the token matching ``template``, bound to this lane's session."""
        session = self._live_session()
        if self._finder is None:
            return list(session.get_objects() if template is None else session.get_objects(template))
        return self._finder.find(session, template)

    def _search(self, ref: KeyVersionRef) -> _KeyObjects | None:
        """One C_FindObjects by CKA_ID (cost grows with the token's object count)."""
        return _again_if_stale(lambda: self._search_once(ref))

    def _search_once(self, ref: KeyVersionRef) -> _KeyObjects | None:
        objects = _KeyObjects()
        any_found = False
        for obj in self._find({Attribute.ID: ref.object_id}):
            try:
                label = obj[Attribute.LABEL]
            except _STALE_HANDLE:
                continue  # destroyed (by another thread or process) since the search found it
            if label == ref.label:
                objects.add(obj)
                any_found = True
        return objects if any_found else None

    def _scan(self) -> dict[KeyVersionRef, _KeyObjects]:
        """Every hsmkeys object in the token, in one pass."""
        return _again_if_stale(self._scan_once)

    def _scan_once(self) -> dict[KeyVersionRef, _KeyObjects]:
        index: dict[KeyVersionRef, _KeyObjects] = {}
        for obj in self._find():
            if obj.object_class not in (
                ObjectClass.SECRET_KEY,
                ObjectClass.PRIVATE_KEY,
                ObjectClass.PUBLIC_KEY,
            ):
                continue
            try:
                attrs = obj.get_attributes([Attribute.ID, Attribute.LABEL])
            except _STALE_HANDLE:
                continue  # destroyed (by another thread or process) since the scan found it
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
        """Close every lane's sessions (idempotent); the instance cannot be used afterwards.

        A background index still scanning finds the instance closed and discards its work.
        """
        self._closed = True
        self._closing.set()
        with _LOCK:
            lanes = list(self._lanes)
        for lane in lanes:
            with lane.lock:
                sessions = [lane.session, *lane.kept]
                lane.session, lane.kept, lane.cache = None, [], _Cache()
            for session in sessions:
                if session is None:
                    continue
                try:
                    session.close()
                except ckr.PKCS11Error as exc:
                    log.warning("hsm_close_failed ckr=%s", type(exc).__name__)

    # ---------------------------------------------------------- background index

    def start_indexing(self) -> bool:
        """Build the shared lane's object index in a background thread (one pass over the
        token on a session of its own) and return at once; False if not started (the
        module runs without OS locking, or the index exists or is being built).

        Until the index arrives a miss costs one search by CKA_ID; after it, none. A
        failed scan is logged and leaves the lane searching per miss.
        """
        if not self._concurrent or self._shared.cache.indexed or self._indexer is not None:
            return False
        self._indexer = threading.Thread(target=self._index_in_background, name="hsmkeys-hsm-index", daemon=True)
        self._indexer.start()
        return True

    def indexing_done(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` s for a background index started by start_indexing; whether it is done."""
        indexer = self._indexer
        if indexer is None:
            return True
        indexer.join(timeout)
        return not indexer.is_alive()

    def _index_in_background(self) -> None:
        # The first requests search alone: a search run together with the pass's first
        # C_FindObjects (which cannot pause for it) takes twice as long.
        if self._closing.wait(_INDEX_START_DELAY_S):
            return
        lane = _Lane(lock=threading.RLock(), generation=_GENERATION.get(self._module, 0))
        self._local.lane = lane
        try:
            index = self._call("index", self._scan, retry=True)
        except KMSError as exc:
            log.error("hsm_index_failed error=%s", type(exc).__name__)
            return
        finally:
            del self._local.lane
        shared = self._shared
        with shared.lock:
            session = lane.session
            if self._closed or session is None or shared.generation != lane.generation:
                return  # closed, or re-initialised meanwhile: these handles are void
            cache = shared.cache
            gone = self._destroyed_while_indexing
            for ref, objects in index.items():
                if ref not in gone:
                    cache.objects.setdefault(ref, objects)  # a handle found meanwhile stays
            cache.indexed = True
            shared.kept.append(session)  # the index's objects are bound to it
            gone.clear()
        log.info("hsm_index_built versions=%d", len(index))

    # ---------------------------------------------------------- objects

    def create_key(self, ref: KeyVersionRef, spec: KeySpec, usage: KeyUsage) -> None:
        """No search per create: the ref is fresh (new UUID, or version n+1). A leftover
        with the same ref that existed when this process indexed the token is refused
        (AlreadyExistsException); one made later by another process's crash makes the ref
        a duplicate, which every process refuses (see _KeyObjects) until doctor removes it.
        """
        if usage not in keyspecs.ALLOWED_USAGES[spec]:
            raise ValidationException(f"KeyUsage {usage} is not compatible with KeySpec {spec}")
        capabilities = _KEY_CAPABILITIES[usage]

        def run() -> None:
            session = self._live_session()
            if not self._cache.indexed:
                with self._mapped("lookup"):
                    self._build_index()
            if ref in self._cache.objects:
                raise AlreadyExistsException(f"the HSM already holds {ref.label}")
            for attempt in (1, 2):
                try:
                    self._cache.objects[ref] = generate(session)
                    return
                except _GENERATE_GLITCH as exc:
                    # SoftHSM2 2.6.1's file store locks its files per process (fcntl), so a
                    # read by another thread can make a generate fail (softhsm/SoftHSMv2#573).
                    # The ref is fresh and this thread holds _TOKEN_WRITES: remove what the
                    # failed call left under it, then generate once more.
                    log.warning("hsm_create_failed label=%s ckr=%s attempt=%d", ref.label, type(exc).__name__, attempt)
                    _destroy_matching(self._find({Attribute.ID: ref.object_id}), ref.label)
                    if attempt == 2:
                        raise

        def generate(session: Session) -> _KeyObjects:
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
            return objects

        self._call(f"create {ref.label}", _token_write(run), retry=False)
        log.info("hsm_key_created label=%s spec=%s usage=%s", ref.label, spec, usage)

    def has_key(self, ref: KeyVersionRef) -> bool:
        return self._call("lookup", lambda: self._search(ref) is not None, retry=True)

    def destroy_key(self, ref: KeyVersionRef) -> None:
        def run() -> int:
            for lane in list(self._lanes):  # other lanes would only learn it from a stale handle
                lane.cache.drop(ref)
            if self._indexer is not None and self._indexer.is_alive():
                self._destroyed_while_indexing.add(ref)
            return _destroy_matching(self._find({Attribute.ID: ref.object_id}), ref.label)

        destroyed = self._call(f"destroy {ref.label}", _token_write(run), retry=False)
        if destroyed:
            log.info("hsm_key_destroyed label=%s objects=%d", ref.label, destroyed)

    def list_key_refs(self) -> set[KeyVersionRef]:
        def run() -> set[KeyVersionRef]:
            index = self._scan()
            # The pass is the index: keep it (drops entries of objects destroyed elsewhere).
            self._cache.objects = index
            self._cache.public_der = {r: d for r, d in self._cache.public_der.items() if r in index}
            self._cache.hmac_keys = {}  # re-checked on next use against the fresh objects
            self._cache.indexed = True
            return set(index)

        return self._call("list", run, retry=True)

    def random(self, n: int) -> bytes:
        if n < 0:
            raise ValidationException("the number of random bytes must not be negative")
        if n == 0:
            return b""
        # python-pkcs11 counts in bits.
        return self._call("random", lambda: _as_bytes(self._live_session().generate_random(n * 8)), retry=True)

    # ---------------------------------------------------------- symmetric

    def encrypt_aes_gcm(self, ref: KeyVersionRef, iv: bytes, aad: bytes, plaintext: bytes) -> bytes:
        if len(iv) != GCM_IV_LEN:
            raise ValidationException(f"AES-GCM needs a {GCM_IV_LEN}-byte IV")
        params = GCMParams(iv, aad, GCM_TAG_LEN * 8)

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
            k = objects.modulus_len
            if k is None:
                k = objects.modulus_len = len(key[Attribute.MODULUS])
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

        def run(objects: _KeyObjects) -> bytes:
            key = self._cache.hmac_keys.get(ref)  # checked once: key_type is a PKCS#11 call
            if key is None:
                secret = objects.secret
                if not isinstance(secret, SignMixin) or secret.key_type is not KeyType.GENERIC_SECRET:
                    raise InvalidKeyUsageException(f"{ref.label} is not an HMAC key")
                key = self._cache.hmac_keys[ref] = secret
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

        def run(objects: _KeyObjects) -> bytes:
            key = objects.private
            if not isinstance(key, DeriveMixin) or key.key_type is not KeyType.EC:
                raise InvalidKeyUsageException(f"{ref.label} is not a key agreement key")
            curve = _CURVE_BY_PARAMS.get(bytes(key[Attribute.EC_PARAMS]))
            if curve is None or curve.name != peer.curve.name:
                raise ValidationException("PublicKey is not on the curve of the KMS key.")
            return _ecdh_secret(key, peer.curve, point)

        return self._with_objects(ref, "derive", run)

    def generate_data_key_pair(self, spec: DataKeyPairSpec) -> tuple[bytes, bytes]:
        """Generated by the HSM as exportable session objects, read once, then destroyed."""
        def run() -> tuple[bytes, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey]:
            public, private = _generate_pair(
                self._live_session(),
                spec.value,
                store=False,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template={Attribute.TOKEN: False},
                private_template=dict(_EXPORTABLE_TEMPLATE),
            )
            try:
                return _spki(public), _private_key(private, spec.value)
            finally:
                for obj in (private, public):
                    try:
                        obj.destroy()
                    except _LOST:
                        pass  # session objects die with the session
                    except ckr.PKCS11Error as exc:
                        log.warning("hsm_session_object_not_destroyed ckr=%s", type(exc).__name__)

        # Session objects only: nothing persists, so a lost session is retried like a read.
        public_der, private_key = self._call(f"generate data key pair {spec}", run, retry=True)
        private_der = private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return private_der, public_der

    # ---------------------------------------------------------- import (BYOK)

    def wrapping_algorithms(self) -> frozenset[str]:
        """SHA-1 algorithms always; SHA-256 ones only if the module unwraps RSA-OAEP with
        SHA-256 (SoftHSM2 2.6 does not: CKR_ARGUMENTS_BAD). Probed once per process
        with a session RSA-1024 pair; the material is never decoded outside the HSM,
        so there is no host-side fallback as decrypt_rsa_oaep has."""
        if self._oaep_sha256 is None:
            self._oaep_sha256 = self._call("probe OAEP SHA-256 unwrap", self._probe_oaep_sha256, retry=True)
        if self._oaep_sha256:
            return WRAPPING_ALGORITHMS
        return frozenset({"RSAES_OAEP_SHA_1", "RSA_AES_KEY_WRAP_SHA_1"})

    def _probe_oaep_sha256(self) -> bool:
        public, private = self._live_session().generate_keypair(
            KeyType.RSA,
            1024,
            store=False,
            capabilities=MechanismFlag.UNWRAP | MechanismFlag.WRAP,
            private_template={Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
            public_template={Attribute.TOKEN: False},
        )
        try:
            assert isinstance(private, UnwrapMixin)
            private.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.GENERIC_SECRET,
                b"\x01" * 128,
                mechanism=Mechanism.RSA_PKCS_OAEP,
                mechanism_param=_OAEP_PARAMS["SHA_256"],
                store=False,
                capabilities=MechanismFlag(0),
                template=dict(_SESSION_SECRET),
            ).destroy()
            return True
        except (ckr.ArgumentsBad, ckr.MechanismParamInvalid, ckr.MechanismInvalid):
            return False
        except _LOST:
            raise
        except ckr.PKCS11Error:
            return True  # the parameters were accepted; the (random) ciphertext was not
        finally:
            for obj in (private, public):
                obj.destroy()

    def create_wrapping_key(self, ref: KeyVersionRef, spec: str) -> bytes:
        bits = WRAPPING_KEY_BITS.get(spec)
        if bits is None:
            raise ValidationException(f"WrappingKeySpec {spec} is not supported")
        label, object_id = wrapping_label(ref), wrapping_object_id(ref)

        def run() -> bytes:
            session = self._live_session()
            if self._find({Attribute.ID: object_id}):
                raise AlreadyExistsException(f"the HSM already holds {label}")
            public, private = session.generate_keypair(
                KeyType.RSA,
                bits,
                id=object_id,
                label=label,
                store=True,
                capabilities=MechanismFlag.UNWRAP,
                public_template={**_PUBLIC_TEMPLATE, Attribute.VERIFY_RECOVER: False},
                private_template={**_SECRET_TEMPLATE, Attribute.SIGN_RECOVER: False},
            )
            self._cache.wrapping[ref] = private
            return _spki(public)

        der = self._call(f"create {label}", _token_write(run), retry=False)
        log.info("hsm_wrapping_key_created label=%s spec=%s", label, spec)
        return der

    def destroy_wrapping_key(self, ref: KeyVersionRef) -> None:
        def run() -> int:
            self._cache.wrapping.pop(ref, None)
            return _destroy_matching(self._find({Attribute.ID: wrapping_object_id(ref)}), wrapping_label(ref))

        if self._call(f"destroy {wrapping_label(ref)}", _token_write(run), retry=False):
            log.info("hsm_wrapping_key_destroyed label=%s", wrapping_label(ref))

    def list_wrapping_refs(self) -> set[KeyVersionRef]:
        def run() -> set[KeyVersionRef]:
            found: set[KeyVersionRef] = set()
            for obj in self._find():
                if obj.object_class not in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                    continue
                attrs = obj.get_attributes([Attribute.ID, Attribute.LABEL])
                object_id, label = attrs.get(Attribute.ID), attrs.get(Attribute.LABEL)
                if not isinstance(label, str) or not label.startswith(WRAPPING_LABEL_PREFIX):
                    continue
                if not isinstance(object_id, bytes) or not object_id.startswith(b"import"):
                    continue
                inner = _ref_of(object_id[len(b"import") :], LABEL_PREFIX + label[len(WRAPPING_LABEL_PREFIX) :])
                if inner is not None and wrapping_object_id(inner) == object_id:
                    found.add(inner)
            return found

        return self._call("list wrapping keys", run, retry=True)

    def _wrapping_private(self, ref: KeyVersionRef) -> UnwrapMixin:
        key = self._cache.wrapping.get(ref)
        if key is None:
            label = wrapping_label(ref)
            with self._mapped("lookup"):
                for obj in self._find({Attribute.ID: wrapping_object_id(ref), Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
                    if obj[Attribute.LABEL] == label:
                        key = obj
            if key is None:
                raise NotFoundException(f"no HSM object for {label}")
            self._cache.wrapping[ref] = key
        if not isinstance(key, UnwrapMixin):
            raise KMSInternalException(f"{wrapping_label(ref)} cannot unwrap")
        return key

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
        """See :meth:`Hsm.import_key`. Every step is a C_UnwrapKey inside the HSM:

        * RSAES_OAEP_SHA_1: OAEP straight into the token object. To learn the length
          first, an OAEP unwrap into a session staging object (sensitive; extractable
          only for this) is wrapped with AES-KWP under a session AES key made in the
          HSM: only that ciphertext's length (the material's, rounded up to 8) is used.
        * RSA_AES_KEY_WRAP_SHA_1 (no module here has CKM_RSA_AES_KEY_WRAP, and
          python-pkcs11 cannot pass its parameters): OAEP into a session AES key
          (UNWRAP only, sensitive, non-extractable), then CKM_AES_KEY_WRAP_PAD of the
          material into the token object (PKCS#8 for RSA/ECC).

        Length checks: the HSM reveals an unwrapped key's length only to 8 bytes (KWP;
        SoftHSM2 reports CKA_VALUE_LEN 0), then the new key is used once
        (:meth:`_probe_length`). AES: 25..32 bytes and an AES-GCM probe (SoftHSM2 refuses
        AES keys of a non-AES size) = exactly 32. HMAC: the upper bounds are multiples of
        8, so exact; the lower bound is exact on SoftHSM2 (it refuses HMAC keys shorter
        than the digest, and AWS's minimum is the digest length). A module that accepts
        them would take a key up to 7 bytes short: under RFC 2104's zero padding that is
        the same key as an allowed one ending in zero bytes.
        """
        if usage not in keyspecs.ALLOWED_USAGES[spec]:
            raise ValidationException(f"KeyUsage {usage} is not compatible with KeySpec {spec}")
        check_import_algorithm(spec, algorithm)
        if algorithm not in self.wrapping_algorithms():
            raise UnsupportedOperationException(
                f"{algorithm} is not supported by this HSM ({self._module}): it cannot unwrap "
                "RSA-OAEP with SHA-256 inside the HSM. Use the _SHA_1 wrapping algorithm."
            )
        wrapped = bytes(wrapped)
        secret = spec is KeySpec.SYMMETRIC_DEFAULT or spec in keyspecs.HMAC_KEY_BYTES

        def run() -> None:
            if not self._cache.indexed:
                with self._mapped("lookup"):
                    self._build_index()
            if ref in self._cache.objects:
                raise AlreadyExistsException(f"the HSM already holds {ref.label}")
            unwrapper = self._wrapping_private(wrapping)
            if secret:
                objects = self._import_secret(ref, spec, usage, unwrapper, algorithm, wrapped)
            else:
                objects = self._import_pair(ref, spec, usage, unwrapper, wrapped, public_key_der)
            self._cache.objects[ref] = objects

        self._call(f"import {ref.label}", _token_write(run), retry=False)
        log.info("hsm_key_imported label=%s spec=%s usage=%s algorithm=%s", ref.label, spec, usage, algorithm)

    def _import_secret(
        self,
        ref: KeyVersionRef,
        spec: KeySpec,
        usage: KeyUsage,
        unwrapper: UnwrapMixin,
        algorithm: str,
        wrapped: bytes,
    ) -> _KeyObjects:
        session = self._live_session()
        aes = spec is KeySpec.SYMMETRIC_DEFAULT
        final: dict[str, Any] = {
            "id": ref.object_id,
            "label": ref.label,
            "store": True,
            "capabilities": _KEY_CAPABILITIES[usage],
            "template": dict(_SECRET_TEMPLATE),
        }
        key_type = KeyType.AES if aes else KeyType.GENERIC_SECRET
        transient: list[Object] = []
        try:
            if algorithm in OAEP_ALGORITHMS:
                if len(wrapped) != _modulus_len(unwrapper):
                    raise InvalidCiphertextException(INVALID_CIPHERTEXT)
                oaep = {"mechanism": Mechanism.RSA_PKCS_OAEP, "mechanism_param": _OAEP_PARAMS[_hash_of(algorithm)]}
                with self._mapped("unwrap", decrypt=True):
                    staging = unwrapper.unwrap_key(
                        ObjectClass.SECRET_KEY,
                        KeyType.GENERIC_SECRET,
                        wrapped,
                        store=False,
                        capabilities=MechanismFlag(0),
                        template={**_SESSION_SECRET, Attribute.EXTRACTABLE: True},
                        **oaep,
                    )
                transient.append(staging)
                kek = session.generate_key(
                    KeyType.AES, 256, store=False, capabilities=MechanismFlag.WRAP, template=dict(_SESSION_SECRET)
                )
                transient.append(kek)
                assert isinstance(kek, WrapMixin)
                # Only the length of this ciphertext is used. The token object is unwrapped
                # from the customer's blob again: SoftHSM2 zero-pads a key to 8 bytes before
                # C_WrapKey with KWP, so a re-wrapped key would not be the same material.
                rounded = len(_as_bytes(kek.wrap_key(staging, mechanism=Mechanism.AES_KEY_WRAP_PAD))) - 8
                check_secret_length(spec, rounded - 7, rounded)
                with self._mapped("unwrap", decrypt=True):
                    key = unwrapper.unwrap_key(ObjectClass.SECRET_KEY, key_type, wrapped, **oaep, **final)
            else:
                outer, blob = self._ephemeral_aes(unwrapper, algorithm, wrapped, transient)
                if len(blob) % 8 or len(blob) < 16:
                    raise InvalidCiphertextException(INVALID_CIPHERTEXT)
                rounded = len(blob) - 8  # RFC 5649: 8-byte integrity block + material padded to 8
                check_secret_length(spec, rounded - 7, rounded)
                with self._mapped("unwrap", decrypt=True):
                    key = outer.unwrap_key(
                        ObjectClass.SECRET_KEY, key_type, blob, mechanism=Mechanism.AES_KEY_WRAP_PAD, **final
                    )
            objects = _KeyObjects()
            objects.add(key)
            self._probe_length(objects, spec)
            return objects
        finally:
            _destroy_quietly(transient)

    def _probe_length(self, objects: _KeyObjects, spec: KeySpec) -> None:
        """Use the new key once; a module that refuses it (SoftHSM2: an AES key of a non-AES
        size, an HMAC key shorter than its digest) has the wrong material: destroy it."""
        key = objects.secret
        try:
            if spec is KeySpec.SYMMETRIC_DEFAULT:
                _fingerprint_of(objects)
            else:
                assert isinstance(key, SignMixin)
                key.sign(b"", mechanism=_HMAC_MECHANISMS[_SPEC_MAC[spec]])
        except _LOST:
            raise
        except ckr.PKCS11Error:
            _destroy_quietly([o for o in (key,) if o is not None])
            low, high = HMAC_IMPORT_BYTES.get(spec, (SYMMETRIC_IMPORT_BYTES, SYMMETRIC_IMPORT_BYTES))
            raise IncorrectKeyMaterialException(
                f"{spec} key material must be {low}" + ("" if low == high else f" to {high}") + " bytes long."
            ) from None

    def _ephemeral_aes(
        self, unwrapper: UnwrapMixin, algorithm: str, wrapped: bytes, transient: list[Object]
    ) -> tuple[UnwrapMixin, bytes]:
        """RSA_AES_KEY_WRAP step 1: OAEP-unwrap the ephemeral AES key into a session object."""
        k = _modulus_len(unwrapper)
        if len(wrapped) <= k + 8:
            raise InvalidCiphertextException(INVALID_CIPHERTEXT)
        with self._mapped("unwrap", decrypt=True):
            aes = unwrapper.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.AES,
                wrapped[:k],
                mechanism=Mechanism.RSA_PKCS_OAEP,
                mechanism_param=_OAEP_PARAMS[_hash_of(algorithm)],
                store=False,
                capabilities=MechanismFlag.UNWRAP,
                template=dict(_SESSION_SECRET),
            )
        transient.append(aes)
        assert isinstance(aes, UnwrapMixin)
        return aes, wrapped[k:]

    def _import_pair(
        self,
        ref: KeyVersionRef,
        spec: KeySpec,
        usage: KeyUsage,
        unwrapper: UnwrapMixin,
        wrapped: bytes,
        public_key_der: bytes | None,
    ) -> _KeyObjects:
        session = self._live_session()
        rsa_key = spec.value in _RSA_BITS
        transient: list[Object] = []
        created: list[Object] = []
        try:
            aes, blob = self._ephemeral_aes(unwrapper, "RSA_AES_KEY_WRAP_SHA_1", wrapped, transient)
            template: dict[Attribute, Any] = {
                # python-pkcs11's generic template carries public-key capabilities: drop them.
                Attribute.ENCRYPT: DEFAULT,
                Attribute.VERIFY: DEFAULT,
                Attribute.WRAP: DEFAULT,
                Attribute.SIGN_RECOVER: False,  # SoftHSM2 defaults it to true on unwrapped keys
                # SoftHSM2 applies attributes in order: MODIFIABLE=false must come last.
                **_SECRET_TEMPLATE,
            }
            try:
                private = aes.unwrap_key(
                    ObjectClass.PRIVATE_KEY,
                    KeyType.RSA if rsa_key else KeyType.EC,
                    blob,
                    id=ref.object_id,
                    label=ref.label,
                    mechanism=Mechanism.AES_KEY_WRAP_PAD,
                    store=True,
                    capabilities=_KEY_CAPABILITIES[usage],
                    template=template,
                )
            except _LOST:
                raise
            except _WRAPPED_INVALID:
                raise InvalidCiphertextException(INVALID_CIPHERTEXT) from None
            except ckr.PKCS11Error:
                raise IncorrectKeyMaterialException(
                    f"The key material is not a PKCS#8 {spec} private key."
                ) from None
            created.append(private)
            loaded = _check_private(private, spec)
            public_der = self._matching_public(private, spec, usage, loaded, public_key_der)
            public = session.create_object(_public_object_template(ref, usage, public_der))
            created.append(public)
            objects = _KeyObjects()
            objects.add(private)
            objects.add(public)
            created.clear()
            return objects
        finally:
            _destroy_quietly(transient)
            _destroy_quietly(created)  # only on failure: a half-imported key is removed

    def _matching_public(
        self,
        private: Object,
        spec: KeySpec,
        usage: KeyUsage,
        loaded: rsa.RSAPublicKey | None,
        public_key_der: bytes | None,
    ) -> bytes:
        """The public key's DER SPKI: read from an RSA private object, or the given one
        for EC (checked against the private key by a signature or an ECDH in the HSM)."""
        given: Any = None
        if public_key_der is not None:
            try:
                given = serialization.load_der_public_key(bytes(public_key_der))
            except (ValueError, UnsupportedAlgorithm):
                raise IncorrectKeyMaterialException("The public key is not a DER SubjectPublicKeyInfo.") from None
        if loaded is not None:
            der = loaded.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            if given is not None and given.public_numbers() != loaded.public_numbers():
                raise IncorrectKeyMaterialException("The public key does not match the imported private key.")
            return der
        curve = _CURVES[spec.value][1]
        if given is None:
            given = _recover_public(private, curve, usage)
        if not isinstance(given, ec.EllipticCurvePublicKey) or given.curve.name != curve.name:
            raise IncorrectKeyMaterialException(
                f"The public key is not a DER SPKI on {curve.name}, the curve of {spec}."
            )
        if usage is KeyUsage.SIGN_VERIFY:
            assert isinstance(private, SignMixin)
            digest = hashlib.sha256(os.urandom(32)).digest()
            raw = private.sign(digest, mechanism=Mechanism.ECDSA)
            half = len(raw) // 2
            signature = encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
            try:
                given.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
            except InvalidSignature:
                raise IncorrectKeyMaterialException(
                    "The public key does not match the imported private key."
                ) from None
        else:
            assert isinstance(private, DeriveMixin)
            peer = ec.generate_private_key(curve)
            point = peer.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
            # A secret with a throwaway peer: it tells nothing about the imported key.
            same = hmac.compare_digest(_ecdh_secret(private, curve, point), peer.exchange(ec.ECDH(), given))
            if not same:
                raise IncorrectKeyMaterialException("The public key does not match the imported private key.")
        return bytes(
            given.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    def key_fingerprint(self, ref: KeyVersionRef) -> bytes:
        if ref in self._cache.public_der:
            return fingerprint("spki", self._cache.public_der[ref])
        return self._with_objects(ref, "fingerprint", _fingerprint_of)


# --------------------------------------------------------------- helpers


def _ecdh_secret(private: DeriveMixin, curve: ec.EllipticCurve, point: bytes) -> bytes:
    """Raw ECDH (CKM_ECDH1_DERIVE, no KDF) of ``private`` with the uncompressed ``point``,
    in the HSM; the derived session object is destroyed once read."""
    secret = private.derive_key(
        KeyType.GENERIC_SECRET,
        ((curve.key_size + 7) // 8) * 8,
        store=False,
        capabilities=MechanismFlag(0),
        mechanism=Mechanism.ECDH1_DERIVE,
        mechanism_param=(KDF.NULL, None, point),
        template={Attribute.TOKEN: False, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
    )
    try:
        return bytes(secret[Attribute.VALUE])
    finally:
        secret.destroy()


def _recover_public(private: Object, curve: ec.EllipticCurve, usage: KeyUsage) -> ec.EllipticCurvePublicKey:
    """The public half of an EC private key the HSM holds but cannot show (SoftHSM2
    keeps no point with an unwrapped key): recovered from two signatures made in the HSM,
    or, for a key that can only derive, from ECDH with the base point (see ecpoint)."""
    params = ecpoint.curve_for(curve)
    if usage is KeyUsage.SIGN_VERIFY:
        assert isinstance(private, SignMixin)
        candidates: set[tuple[int, int]] | None = None
        for _ in range(4):  # two signatures almost always leave one candidate
            digest = hashlib.sha256(os.urandom(32)).digest()
            raw = private.sign(digest, mechanism=Mechanism.ECDSA)
            half = len(raw) // 2
            found = ecpoint.recover_from_signature(
                params, digest, int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
            )
            candidates = found if candidates is None else candidates & found
            if len(candidates) == 1:
                return ecpoint.public_key(curve, next(iter(candidates)))
        raise IncorrectKeyMaterialException("The public key of the imported EC key could not be recovered.")
    assert isinstance(private, DeriveMixin)
    base = ec.derive_private_key(1, curve).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    # x(d·G) is the public point's abscissa: public data, not a secret.
    x = int.from_bytes(_ecdh_secret(private, curve, base), "big")
    point = ecpoint.even_point(params, x)
    if point is None:
        raise IncorrectKeyMaterialException("The public key of the imported EC key could not be recovered.")
    return ecpoint.public_key(curve, point)


def _again_if_stale(search: Callable[[], T], attempts: int = 3) -> T:
    """Run a search again when an object it found was destroyed (by another thread or
    process) before python-pkcs11 read its class: the search itself is still valid."""
    for attempt in range(attempts):
        try:
            return search()
        except _STALE_HANDLE:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _token_write(op: Callable[[], T]) -> Callable[[], T]:
    """``op`` run under _TOKEN_WRITES."""

    def run() -> T:
        with _TOKEN_WRITES:
            return op()

    return run


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



_TOKEN_SCAN_ATTEMPTS: Final = 4


def _find_token_loaded_now(lib: Pkcs11Lib, module: str, token_label: str) -> Token:
    """:func:`_find_token` right after this process loaded the module (no other instance
    uses it yet). SoftHSM2 reads its token directory at C_Initialize; another process
    writing that token at the same moment (a sibling worker starting up) can make it skip
    the token. Seen as NoSuchToken: read the directory again (finalize, initialize) a few
    times before giving up."""
    for attempt in range(_TOKEN_SCAN_ATTEMPTS):
        try:
            return _find_token(lib, module, token_label)
        except ConfigError:
            if attempt == _TOKEN_SCAN_ATTEMPTS - 1:
                raise
            log.warning("hsm_token_not_found_rescanning module=%s attempt=%d", module, attempt + 1)
            _GENERATION[module] = _GENERATION.get(module, 0) + 1
            with suppress(ckr.PKCS11Error):
                lib.finalize()
            time.sleep(0.1 * (attempt + 1))
            lib.initialize()
    raise AssertionError("unreachable")


def _find_token(lib: Pkcs11Lib, module: str, token_label: str) -> Token:
    try:
        token: Token = lib.get_token(token_label=token_label)
        return token
    except ckr.NoSuchToken:
        raise ConfigError(
            f"no token labelled {token_label!r} in {module} "
            "(for SoftHSM2: check SOFTHSM2_CONF and that the token was initialised "
            "before the module was loaded)"
        ) from None
    except ckr.MultipleTokensReturned:
        raise ConfigError(f"several tokens are labelled {token_label!r}") from None


def _destroy_matching(found: list[Object], label: str) -> int:
    """Destroy every object ``found`` (one search by CKA_ID) that carries ``label``; how many went."""
    destroyed = 0
    for obj in found:
        if obj[Attribute.LABEL] != label:
            continue
        try:
            obj.destroy()
            destroyed += 1
        except _STALE_HANDLE:
            pass  # another process destroyed it first
    return destroyed


def _destroy_quietly(objects: list[Object]) -> None:
    """Destroy transient objects; a lost session took them already."""
    for obj in objects:
        try:
            obj.destroy()
        except ckr.PKCS11Error as exc:
            if not isinstance(exc, _LOST + _STALE_HANDLE):
                log.warning("hsm_object_not_destroyed ckr=%s", type(exc).__name__)


def _modulus_len(key: Object) -> int:
    return len(bytes(key[Attribute.MODULUS]))


def _hash_of(algorithm: str) -> str:
    return "SHA_256" if algorithm.endswith("SHA_256") else "SHA_1"


def _check_private(private: Object, spec: KeySpec) -> rsa.RSAPublicKey | None:
    """IncorrectKeyMaterialException unless the unwrapped key has the spec's size or curve;
    the RSA public key (from the private object's public attributes)."""
    if spec.value in _RSA_BITS:
        attrs = private.get_attributes([Attribute.MODULUS, Attribute.PUBLIC_EXPONENT])
        modulus = int.from_bytes(attrs[Attribute.MODULUS], "big")
        if modulus.bit_length() != _RSA_BITS[spec.value]:
            raise IncorrectKeyMaterialException(f"The key material is not a {spec} private key.")
        return rsa.RSAPublicNumbers(int.from_bytes(attrs[Attribute.PUBLIC_EXPONENT], "big"), modulus).public_key()
    if bytes(private[Attribute.EC_PARAMS]) != _CURVES[spec.value][0]:
        raise IncorrectKeyMaterialException(f"The key material is not a {spec} private key.")
    return None


def _der_octet_string_of(body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([0x04, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x04, 0x80 | len(size)]) + size + body


def _public_object_template(ref: KeyVersionRef, usage: KeyUsage, der: bytes) -> dict[Attribute, Any]:
    """A token public key object like the one generate_keypair makes for ``usage``."""
    loaded = serialization.load_der_public_key(der)
    template: dict[Attribute, Any] = {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.ID: ref.object_id,
        Attribute.LABEL: ref.label,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.ENCRYPT: usage is KeyUsage.ENCRYPT_DECRYPT,
        Attribute.VERIFY: usage is KeyUsage.SIGN_VERIFY,
        Attribute.WRAP: False,
        Attribute.VERIFY_RECOVER: False,
        Attribute.DERIVE: False,
    }
    if isinstance(loaded, rsa.RSAPublicKey):
        numbers = loaded.public_numbers()
        template[Attribute.KEY_TYPE] = KeyType.RSA
        template[Attribute.MODULUS] = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
        template[Attribute.PUBLIC_EXPONENT] = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
    elif isinstance(loaded, ec.EllipticCurvePublicKey):
        params = next(p for p, curve in _CURVES.values() if curve.name == loaded.curve.name)
        point = loaded.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        template[Attribute.KEY_TYPE] = KeyType.EC
        template[Attribute.EC_PARAMS] = params
        template[Attribute.EC_POINT] = _der_octet_string_of(point)
    else:
        raise IncorrectKeyMaterialException("The public key is neither RSA nor EC.")
    template[Attribute.MODIFIABLE] = False  # last: SoftHSM2 applies attributes in order
    return template


def _fingerprint_of(objects: _KeyObjects) -> bytes:
    """See :func:`hsmkeys.hsm.base.fingerprint`; computed in the HSM with the key."""
    if objects.public is not None:
        return fingerprint("spki", _spki(objects.public))
    key = objects.secret
    if isinstance(key, EncryptMixin) and key.key_type is KeyType.AES:
        params = GCMParams(FINGERPRINT_IV, FINGERPRINT_AAD, GCM_TAG_LEN * 8)
        return fingerprint(
            "aes", _as_bytes(key.encrypt(FINGERPRINT_BLOCK, mechanism=Mechanism.AES_GCM, mechanism_param=params))
        )
    if isinstance(key, SignMixin):
        # SHA-224: SoftHSM2 refuses HMAC keys shorter than the digest; no HMAC key is under 28 bytes.
        return fingerprint("hmac", _as_bytes(key.sign(FINGERPRINT_MESSAGE, mechanism=Mechanism.SHA224_HMAC)))
    raise InvalidKeyUsageException("the HSM object has no fingerprint")


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
