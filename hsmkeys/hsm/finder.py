"""Finding token objects without python-pkcs11's per-object cost.

python-pkcs11 turns every handle a search returns into an object with ``make_object``:
ten attribute reads and a new Python class per object, ~300 µs. On a 30,000-object
SoftHSM2 token a pass over every object then takes ~9 s, and its Python work holds the
GIL against the requests served meanwhile. :class:`ObjectFinder` makes the same
search through the module's own function list (ctypes, which releases the GIL in each
call): one C_FindObjects pass, then one C_GetAttributeValue per object that reads the
class, key type, CKA_ID, CKA_LABEL and capability flags together (~1 s for the token
above). Each object is built from what that read returned: an instance of one class
per (object class, capabilities), cached, with python-pkcs11's own classes and
mixins, so ``encrypt``, ``sign``, ``unwrap_key`` and the rest are python-pkcs11's code
on the python-pkcs11 session the finder was given. Only attribute reads and
``destroy`` come back here: the attributes read at find time are served from that read
(token objects are never modified), any other attribute is read when asked, with
python-pkcs11's rules (an unavailable attribute raises; ``get_attributes`` leaves
unavailable ones out).

:func:`function_list` (the module's CK_FUNCTION_LIST through ctypes) also serves
``hsmkeys.hsm.pkcs11``'s own C_Initialize with OS locking.

Return codes become python-pkcs11's exception classes (:data:`_ERRORS`), so callers
handle a stale handle, a lost session or a dead device exactly as for python-pkcs11's
calls. An object destroyed between the search and its attribute read is left out.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, Final

import pkcs11.exceptions as ckr
from pkcs11 import Attribute, ObjectClass, _pkcs11
from pkcs11.attributes import AttributeMapper
from pkcs11.types import Object

log = logging.getLogger(__name__)

__all__ = ["FunctionList", "ObjectFinder", "function_list"]

#: python-pkcs11's session (``pkcs11._pkcs11.Session``): its ``handle`` is not in the
#: typed ``pkcs11.types.Session``.
Session = Any

_ULONG = ctypes.c_ulong
_UNAVAILABLE: Final = ctypes.c_ulong(-1).value  # CK_UNAVAILABLE_INFORMATION
_FIND_BATCH: Final = 4096
_ID_MAX: Final = 256  # bytes read at find time; longer values are read again, exactly
_LABEL_MAX: Final = 256

_CKR_OK: Final = 0x0
_CKR_ATTRIBUTE_SENSITIVE: Final = 0x11
_CKR_ATTRIBUTE_TYPE_INVALID: Final = 0x12

#: The return codes the calls here can give, as python-pkcs11 maps them; others are PKCS11Error.
_ERRORS: Final[Mapping[int, type[ckr.PKCS11Error]]] = {
    0x02: ckr.HostMemory,
    0x05: ckr.GeneralError,
    0x06: ckr.FunctionFailed,
    0x07: ckr.ArgumentsBad,
    0x11: ckr.AttributeSensitive,
    0x12: ckr.AttributeTypeInvalid,
    0x13: ckr.AttributeValueInvalid,
    0x30: ckr.DeviceError,
    0x31: ckr.DeviceMemory,
    0x32: ckr.DeviceRemoved,
    0x60: ckr.KeyHandleInvalid,
    0x82: ckr.ObjectHandleInvalid,
    0x90: ckr.OperationActive,
    0x91: ckr.OperationNotInitialized,
    0xB0: ckr.SessionClosed,
    0xB3: ckr.SessionHandleInvalid,
    0xB5: ckr.SessionReadOnly,
    0xE0: ckr.TokenNotPresent,
    0x101: ckr.UserNotLoggedIn,
}


def _template(items: Iterable[tuple[int, Any, int]]) -> ctypes.Array[_Attr]:
    """A CK_ATTRIBUTE array of (type, pointer or None, length)."""
    attrs = [_Attr(k, pointer, length) for k, pointer, length in items]
    return (_Attr * len(attrs))(*attrs)


def _check(rv: int) -> None:
    if rv != _CKR_OK:
        error = _ERRORS.get(rv)
        raise error() if error is not None else ckr.PKCS11Error(f"CKR {rv:#x}")


class _Attr(ctypes.Structure):
    _fields_ = (("type", _ULONG), ("pValue", ctypes.c_void_p), ("ulValueLen", _ULONG))


_NAMES: Final = (
    "C_Initialize",
    "C_Finalize",
    "C_GetInfo",
    "C_GetFunctionList",
    "C_GetSlotList",
    "C_GetSlotInfo",
    "C_GetTokenInfo",
    "C_GetMechanismList",
    "C_GetMechanismInfo",
    "C_InitToken",
    "C_InitPIN",
    "C_SetPIN",
    "C_OpenSession",
    "C_CloseSession",
    "C_CloseAllSessions",
    "C_GetSessionInfo",
    "C_GetOperationState",
    "C_SetOperationState",
    "C_Login",
    "C_Logout",
    "C_CreateObject",
    "C_CopyObject",
    "C_DestroyObject",
    "C_GetObjectSize",
    "C_GetAttributeValue",
    "C_SetAttributeValue",
    "C_FindObjectsInit",
    "C_FindObjects",
    "C_FindObjectsFinal",
)


class FunctionList(ctypes.Structure):
    """CK_FUNCTION_LIST up to C_FindObjectsFinal (the order is fixed by the standard)."""

    _fields_ = (("version", ctypes.c_ubyte * 2), *((name, ctypes.c_void_p) for name in _NAMES))


def function_list(module: str) -> tuple[ctypes.CDLL, FunctionList]:
    """``module`` (dlopen returns the already loaded library) and its CK_FUNCTION_LIST;
    keep the CDLL as long as the list's pointers are used."""
    dll = ctypes.CDLL(module)
    get_function_list = dll.C_GetFunctionList
    get_function_list.restype = _ULONG
    get_function_list.argtypes = (ctypes.POINTER(ctypes.POINTER(FunctionList)),)
    functions = ctypes.POINTER(FunctionList)()
    _check(get_function_list(ctypes.byref(functions)))
    return dll, functions.contents


_ATTR_P = ctypes.POINTER(_Attr)
_GET_ATTRIBUTE_VALUE = ctypes.CFUNCTYPE(_ULONG, _ULONG, _ULONG, _ATTR_P, _ULONG)
_FIND_OBJECTS_INIT = ctypes.CFUNCTYPE(_ULONG, _ULONG, _ATTR_P, _ULONG)
_FIND_OBJECTS = ctypes.CFUNCTYPE(_ULONG, _ULONG, ctypes.POINTER(_ULONG), _ULONG, ctypes.POINTER(_ULONG))
_FIND_OBJECTS_FINAL = ctypes.CFUNCTYPE(_ULONG, _ULONG)
_DESTROY_OBJECT = ctypes.CFUNCTYPE(_ULONG, _ULONG, _ULONG)

#: python-pkcs11's implementation classes (its type stubs list only the abstract ones).
_IMPL: Final[Mapping[str, Any]] = vars(_pkcs11)

#: Read with every object found: what make_object reads, plus CKA_KEY_TYPE, CKA_ID and CKA_LABEL.
_CAPABILITIES: Final = (
    (Attribute.ENCRYPT, _IMPL["EncryptMixin"]),
    (Attribute.DECRYPT, _IMPL["DecryptMixin"]),
    (Attribute.SIGN, _IMPL["SignMixin"]),
    (Attribute.VERIFY, _IMPL["VerifyMixin"]),
    (Attribute.WRAP, _IMPL["WrapMixin"]),
    (Attribute.UNWRAP, _IMPL["UnwrapMixin"]),
    (Attribute.DERIVE, _IMPL["DeriveMixin"]),
)
_PREFETCH: Final = (
    (Attribute.CLASS, ctypes.sizeof(_ULONG)),
    (Attribute.KEY_TYPE, ctypes.sizeof(_ULONG)),
    (Attribute.ID, _ID_MAX),
    (Attribute.LABEL, _LABEL_MAX),
    *((attribute, 1) for attribute, _ in _CAPABILITIES),
)


class _Found:
    """Attribute reads and ``destroy`` of an object a finder built; the rest is python-pkcs11's.

    First in every built class's bases, so these override python-pkcs11's ``Object``,
    which would go through an ObjectHandleWrapper that only python-pkcs11 can make.
    """

    def __init__(self, finder: ObjectFinder, session: Session, handle: int, known: dict[int, Any]) -> None:
        self._finder = finder
        self._session = session
        self._handle = handle
        self._known = known  # attribute -> value, read at find time (absent: unavailable)
        key_type = known.get(Attribute.KEY_TYPE)
        if key_type is not None:
            self.__dict__["key_type"] = key_type  # python-pkcs11's cached_property

    @property
    def session(self) -> Session:
        return self._session

    @property
    def handle(self) -> int:
        return self._handle

    def __getitem__(self, key: Attribute) -> Any:
        if key in self._known:
            return self._known[key]
        if key in _PREFETCHED:
            raise ckr.AttributeTypeInvalid()  # it was read: unavailable
        values = self._finder.read(self._session, self._handle, (key,))
        return values[key]

    def get_attributes(self, keys: Iterable[Attribute]) -> dict[Attribute, Any]:
        keys = list(keys)
        result = {k: self._known[k] for k in keys if k in self._known}
        missing = [k for k in keys if k not in result and k not in _PREFETCHED]
        if missing:
            result.update(self._finder.read(self._session, self._handle, missing, partial=True))
        return result

    def __setitem__(self, key: Attribute, value: Any) -> None:
        raise NotImplementedError("objects found by hsmkeys.hsm.finder are not modified")

    def copy(self, attrs: dict[Attribute, Any]) -> Object:
        raise NotImplementedError("objects found by hsmkeys.hsm.finder are not copied")

    def destroy(self) -> None:
        self._finder.destroy(self._session, self._handle)

    def _identity(self) -> tuple[str, Any, int]:
        return ("Object", self._session, self._handle)


_PREFETCHED: Final = frozenset(attribute for attribute, _ in _PREFETCH)
_CLASS_MAP: Final[Mapping[ObjectClass, type]] = _IMPL["_CLASS_MAP"]
_OBJECT: Final[type] = _IMPL["Object"]


class _PrefetchBuffer:
    """The CK_ATTRIBUTE template and value buffers of the prefetch, reused across one search's objects."""

    def __init__(self) -> None:
        self.buffers = [ctypes.create_string_buffer(size) for _, size in _PREFETCH]
        self.template = _template(
            (k, ctypes.addressof(b), size) for (k, size), b in zip(_PREFETCH, self.buffers, strict=True)
        )


class ObjectFinder:
    """Searches, attribute reads and destroys through ``module``'s function list.

    The module must be the one python-pkcs11 loaded and initialised (dlopen returns the
    loaded library), and every call is made under the caller's lock for the session,
    as python-pkcs11's own calls are.
    """

    def __init__(self, module: str) -> None:
        self._dll, table = function_list(module)  # the CDLL keeps the module loaded
        self._get_attribute_value = _GET_ATTRIBUTE_VALUE(table.C_GetAttributeValue)
        self._find_init = _FIND_OBJECTS_INIT(table.C_FindObjectsInit)
        self._find = _FIND_OBJECTS(table.C_FindObjects)
        self._find_final = _FIND_OBJECTS_FINAL(table.C_FindObjectsFinal)
        self._destroy = _DESTROY_OBJECT(table.C_DestroyObject)
        self._classes: dict[tuple[Any, ...], type] = {}
        self._searching = 0  # searches with a template in progress (see find)
        self._quiet = threading.Condition()
        # python-pkcs11's default conversions (each of its sessions has one like it).
        self._mapper = AttributeMapper()

    def find(self, session: Session, template: Mapping[Attribute, Any] | None = None) -> list[Object]:
        """Every object matching ``template`` (python-pkcs11 values), built as described above.

        A pass over every object (no template) pauses between objects while a search
        with a template runs on another session: run together, each slows the other
        down about twofold in SoftHSM2, and the search is what a request waits for.
        It pauses for at most as long as it has worked, so searches that keep coming
        cannot starve it (the pass is what ends the searches).
        """
        if template:
            with self._quiet:
                self._searching += 1
            try:
                return self._built(session, self._handles(session, template))
            finally:
                with self._quiet:
                    self._searching -= 1
                    self._quiet.notify_all()
        return self._built(session, self._handles(session, {}), yielding=True)

    def _built(self, session: Session, handles: list[int], *, yielding: bool = False) -> list[Object]:
        buffer = _PrefetchBuffer()
        found: list[Object] = []
        started, paused = time.monotonic(), 0.0
        for handle in handles:
            if yielding and self._searching:
                now = time.monotonic()
                worked = now - started - paused
                if paused < worked:
                    with self._quiet:
                        self._quiet.wait_for(lambda: not self._searching, timeout=worked - paused)
                    paused += time.monotonic() - now
            known = self._prefetch(session, handle, buffer)
            if known is not None:
                found.append(self._build(session, handle, known))
        return found

    def read(
        self, session: Session, handle: int, keys: Iterable[Attribute], *, partial: bool = False
    ) -> dict[Attribute, Any]:
        """Read ``keys`` as python-pkcs11 does: sizes first, then the available values.

        An unavailable attribute raises (its CKR) unless ``partial``, which leaves it
        out as ``get_attributes`` does (and raises only when none is available).
        """
        keys = list(keys)
        template = _template((k, None, 0) for k in keys)
        rv = self._get_attribute_value(session.handle, handle, template, len(keys))
        available = [(k, t.ulValueLen) for k, t in zip(keys, template, strict=True) if t.ulValueLen != _UNAVAILABLE]
        if not available or (len(available) < len(keys) and not partial):
            _check(rv if rv != _CKR_OK else 0x06)  # unavailable with CKR_OK: a broken token (as python-pkcs11)
        buffers = [ctypes.create_string_buffer(max(size, 1)) for _, size in available]
        values = _template(
            (k, ctypes.cast(b, ctypes.c_void_p), size) for (k, size), b in zip(available, buffers, strict=True)
        )
        _check(self._get_attribute_value(session.handle, handle, values, len(available)))
        mapper = self._mapper
        return {
            Attribute(k): mapper.unpack_attributes(k, b.raw[: v.ulValueLen])
            for (k, _), b, v in zip(available, buffers, values, strict=True)
        }

    def destroy(self, session: Session, handle: int) -> None:
        _check(self._destroy(session.handle, handle))

    # ------------------------------------------------------------------ internals

    def _handles(self, session: Session, template: Mapping[Attribute, Any]) -> list[int]:
        mapper = self._mapper
        packed = [(k, mapper.pack_attribute(k, v)) for k, v in template.items()]
        buffers = [ctypes.create_string_buffer(value, len(value)) for _, value in packed]
        attrs = _template(
            (k, ctypes.cast(b, ctypes.c_void_p), len(v)) for (k, v), b in zip(packed, buffers, strict=True)
        )
        handle = session.handle
        _check(self._find_init(handle, attrs if packed else None, len(packed)))
        handles: list[int] = []
        batch = (_ULONG * _FIND_BATCH)()
        count = _ULONG()
        try:
            while True:
                _check(self._find(handle, batch, _FIND_BATCH, ctypes.byref(count)))
                if not count.value:
                    return handles
                handles.extend(batch[: count.value])
        finally:
            self._find_final(handle)  # its own failure adds nothing to the search's

    def _prefetch(self, session: Session, handle: int, buffer: _PrefetchBuffer) -> dict[int, Any] | None:
        """The prefetched attributes in one read (a second, exact read if one was too long);
        None when the object is gone."""
        template = buffer.template
        for attr, (_, size) in zip(template, _PREFETCH, strict=True):
            attr.ulValueLen = size
        try:
            rv = self._get_attribute_value(session.handle, handle, template, len(_PREFETCH))
            if rv not in (_CKR_OK, _CKR_ATTRIBUTE_SENSITIVE, _CKR_ATTRIBUTE_TYPE_INVALID):
                _check(rv)
        except (ckr.ObjectHandleInvalid, ckr.KeyHandleInvalid):
            return None
        except ckr.PKCS11Error:
            # CKR_BUFFER_TOO_SMALL (a long CKA_ID or label) and the like: read exactly.
            try:
                found = self.read(session, handle, [k for k, _ in _PREFETCH], partial=True)
            except (ckr.ObjectHandleInvalid, ckr.KeyHandleInvalid):
                return None
            except ckr.AttributeValueInvalid:
                # An object whose file a killed writer left torn: SoftHSM2 answers every read
                # of it so. Left out (a search, a full pass, doctor still work); not destroyed,
                # as its owner cannot be known.
                log.warning("hsm_object_unreadable handle=%d ckr=AttributeValueInvalid", handle)
                return None
            return {int(k): v for k, v in found.items()}
        unpack = self._mapper.unpack_attributes
        return {
            attr.type: unpack(attr.type, ctypes.string_at(attr.pValue, attr.ulValueLen))
            for attr in template
            if attr.ulValueLen != _UNAVAILABLE
        }

    def _build(self, session: Session, handle: int, known: dict[int, Any]) -> Object:
        object_class = known.get(Attribute.CLASS)
        capabilities = tuple(mixin for attribute, mixin in _CAPABILITIES if known.get(attribute))
        shape = (object_class, capabilities)
        cls = self._classes.get(shape)
        if cls is None:
            base = _CLASS_MAP.get(object_class) if isinstance(object_class, ObjectClass) else None
            bases: tuple[type, ...] = (_Found, base, *capabilities, _OBJECT) if base else (_Found, _OBJECT)
            cls = type(base.__name__ if base else "Object", bases, {})
            if base is None:
                cls.object_class = object_class  # type: ignore[attr-defined]
            self._classes[shape] = cls
        obj: Object = cls(self, session, handle, known)
        return obj
