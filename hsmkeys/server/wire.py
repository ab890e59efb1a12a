"""AWS JSON 1.1 wire format for KMS, driven entirely by the botocore service model.

No operation is written by hand: for each operation in the model a plan is compiled
once per process (a reader for the input shape, a writer for the output shape) and
bound to the KeyStore method named ``botocore.xform_name(OperationName)``.

Request handling, in order (each step raises a KMSError subclass):

* ``X-Amz-Target`` not ``TrentService.<Op>`` of the model -> UnknownOperationException
* the operation is not in the operation table -> UnsupportedOperationException
* body not a JSON object, a member of the wrong JSON type, bad base64, a null list
  or map element -> SerializationException (the smithy "malformed request" rule)
* a missing required member or a broken length/range/enum/pattern constraint ->
  ValidationException, worded as AWS words it ("1 validation error detected: Value
  '2000' at 'numberOfBytes' failed to satisfy constraint: Member must have value less
  than or equal to 1024"); every violation is reported, as AWS does
* a member the KeyStore method takes no parameter for, set to a non-empty value ->
  UnsupportedOperationException naming the member

Unknown top-level or nested members are ignored: AWS JSON services (and the smithy
server rules) ignore them so that newer clients keep working against older servers.

Output: the result dataclass is written member by member of the output shape
(field = xform_name(member)); fields that are not shape members are never sent,
None is skipped, blobs are base64, timestamps epoch seconds, and an empty tuple is
skipped when it is the dataclass field's default (KMS omits e.g. SigningAlgorithms
for a symmetric key but always sends ``Keys: []``).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import inspect
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import botocore.session
from botocore import xform_name

from hsmkeys import models
from hsmkeys.errors import (
    SerializationException,
    UnknownOperationException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkeys.operations import OPERATIONS, Operation

TARGET_PREFIX = "TrentService."
CONTENT_TYPE = "application/x-amz-json-1.1"
#: Largest request body accepted; larger ones get 413 (KMS's largest field is 64 KiB).
MAX_BODY_BYTES = 1 << 20
_SHOWN_VALUE_MAX = 256  # chars of a rejected value echoed back in a ValidationException

# A reader turns one decoded JSON value into the KeyStore's argument value. It raises
# SerializationException at once for a wrong type and appends constraint violations to
# the list (so all of them are reported together).
_Reader = Callable[[Any, str, list[str]], Any]
# A writer turns one result value into its JSON value.
_Writer = Callable[[Any], Any]


# ------------------------------------------------------------------ messages


def _camel(member_name: str) -> str:
    """The member path AWS prints in validation messages: ``NumberOfBytes`` -> ``numberOfBytes``."""
    return member_name[:1].lower() + member_name[1:]


def _violation(path: str, shown: str | None, constraint: str) -> str:
    value = "Value" if shown is None else f"Value {shown}"
    return f"{value} at '{path}' failed to satisfy constraint: Member must {constraint}"


def _show(value: object) -> str:
    text = str(value)
    if len(text) > _SHOWN_VALUE_MAX:
        text = text[:_SHOWN_VALUE_MAX] + "..."
    return f"'{text}'"


def validation_error(violations: list[str]) -> ValidationException:
    n = len(violations)
    plural = "s" if n > 1 else ""
    return ValidationException(f"{n} validation error{plural} detected: " + "; ".join(violations))


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _wrong_type(path: str, expected: str, value: object) -> SerializationException:
    return SerializationException(f"Expected {expected} at '{path}' but found {_json_type(value)}")


# ------------------------------------------------------------------ readers


def _length_checks(meta: Mapping[str, Any], path: str, errors: list[str], n: int, shown: str | None) -> None:
    low = meta.get("min")
    high = meta.get("max")
    if low is not None and n < low:
        errors.append(_violation(path, shown, f"have length greater than or equal to {low}"))
    elif high is not None and n > high:
        errors.append(_violation(path, shown, f"have length less than or equal to {high}"))


def _string_reader(shape: Any) -> _Reader:
    meta = shape.metadata
    sensitive = bool(meta.get("sensitive"))
    enum_values = frozenset(meta["enum"]) if meta.get("enum") else None
    enum_text = ", ".join(meta["enum"]) if enum_values else ""
    pattern_text = meta.get("pattern")
    try:
        pattern = re.compile(pattern_text) if pattern_text else None
    except re.error:  # a Java-only construct; the KeyStore validates such fields itself
        pattern = None
    has_length = "min" in meta or "max" in meta

    def read(value: Any, path: str, errors: list[str]) -> Any:
        if not isinstance(value, str):
            raise _wrong_type(path, "string", value)
        if enum_values is not None:
            if value not in enum_values:
                shown = None if sensitive else _show(value)
                errors.append(_violation(path, shown, f"satisfy enum value set: [{enum_text}]"))
            return value
        if has_length:
            _length_checks(meta, path, errors, len(value), None if sensitive else _show(value))
        if pattern is not None and pattern.search(value) is None:
            shown = None if sensitive else _show(value)
            errors.append(
                _violation(path, shown, f"satisfy regular expression pattern: {pattern_text}")
            )
        return value

    return read


def _integer_reader(shape: Any) -> _Reader:
    low = shape.metadata.get("min")
    high = shape.metadata.get("max")

    def read(value: Any, path: str, errors: list[str]) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(path, "integer", value)
        if low is not None and value < low:
            errors.append(_violation(path, _show(value), f"have value greater than or equal to {low}"))
        elif high is not None and value > high:
            errors.append(_violation(path, _show(value), f"have value less than or equal to {high}"))
        return value

    return read


def _read_boolean(value: Any, path: str, errors: list[str]) -> Any:
    if not isinstance(value, bool):
        raise _wrong_type(path, "boolean", value)
    return value


def _blob_reader(shape: Any) -> _Reader:
    meta = shape.metadata
    has_length = "min" in meta or "max" in meta

    def read(value: Any, path: str, errors: list[str]) -> Any:
        if not isinstance(value, str):
            raise _wrong_type(path, "base64 string", value)
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise SerializationException(f"Value at '{path}' is not valid base64") from None
        if has_length:
            _length_checks(meta, path, errors, len(data), None)
        return data

    return read


def _read_timestamp(value: Any, path: str, errors: list[str]) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong_type(path, "epoch seconds", value)
    try:
        return datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise SerializationException(f"Value at '{path}' is not a valid timestamp") from None


def _list_reader(shape: Any, cache: dict[str, _Reader]) -> _Reader:
    item = _reader(shape.member, cache)
    meta = shape.metadata
    has_length = "min" in meta or "max" in meta

    def read(value: Any, path: str, errors: list[str]) -> Any:
        if not isinstance(value, list):
            raise _wrong_type(path, "array", value)
        if has_length:
            _length_checks(meta, path, errors, len(value), None)
        out = []
        for i, element in enumerate(value, 1):
            element_path = f"{path}.{i}.member"
            if element is None:
                raise SerializationException(f"Null value at '{element_path}'")
            out.append(item(element, element_path, errors))
        return tuple(out)

    return read


def _map_reader(shape: Any, cache: dict[str, _Reader]) -> _Reader:
    read_key = _reader(shape.key, cache)
    read_value = _reader(shape.value, cache)
    meta = shape.metadata
    has_length = "min" in meta or "max" in meta

    def read(value: Any, path: str, errors: list[str]) -> Any:
        if not isinstance(value, dict):
            raise _wrong_type(path, "object", value)
        if has_length:
            _length_checks(meta, path, errors, len(value), None)
        out = {}
        for k, v in value.items():
            if v is None:
                raise SerializationException(f"Null value at '{path}' for a map key")
            out[read_key(k, f"{path}.key", errors)] = read_value(v, f"{path}.value", errors)
        return out

    return read


@dataclass(frozen=True, slots=True)
class _Member:
    wire: str  # JSON name, e.g. "NumberOfBytes"
    attr: str  # xform_name, e.g. "number_of_bytes"
    path: str  # name in messages, e.g. "numberOfBytes"
    read: _Reader
    required: bool


def _members(shape: Any, cache: dict[str, _Reader]) -> tuple[_Member, ...]:
    required = set(shape.required_members)
    return tuple(
        _Member(
            wire=name,
            attr=xform_name(name),
            path=_camel(name),
            read=_reader(member, cache),
            required=name in required,
        )
        for name, member in shape.members.items()
    )


def _read_members(
    members: tuple[_Member, ...], value: dict[str, Any], prefix: str, errors: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in members:
        v = value.get(m.wire)
        path = prefix + m.path
        if v is None:  # JSON null is "not set", as in every AWS JSON protocol
            if m.required:
                errors.append(_violation(path, "null", "not be null"))
            continue
        out[m.attr] = m.read(v, path, errors)
    return out


def _structure_reader(shape: Any, cache: dict[str, _Reader]) -> _Reader:
    # Nested input structures become the models dataclass of the same name (Tag ->
    # models.Tag); a shape with no such class is refused by the binding, not here.
    target = getattr(models, shape.name, None)
    members: tuple[_Member, ...] = ()

    def read(value: Any, path: str, errors: list[str]) -> Any:
        if not isinstance(value, dict):
            raise _wrong_type(path, "object", value)
        fields = _read_members(members, value, path + ".", errors)
        if target is None or errors:
            return fields
        try:
            return target(**fields)
        except TypeError:
            raise SerializationException(f"Value at '{path}' has an unsupported shape") from None

    cache[shape.name] = read  # before compiling members: recursive shapes terminate
    members = _members(shape, cache)
    return read


def _reader(shape: Any, cache: dict[str, _Reader]) -> _Reader:
    found = cache.get(shape.name)
    if found is not None:
        return found
    kind = shape.type_name
    reader: _Reader
    if kind == "structure":
        return _structure_reader(shape, cache)
    if kind == "string":
        reader = _string_reader(shape)
    elif kind in ("integer", "long"):
        reader = _integer_reader(shape)
    elif kind == "boolean":
        reader = _read_boolean
    elif kind == "blob":
        reader = _blob_reader(shape)
    elif kind == "timestamp":
        reader = _read_timestamp
    elif kind == "list":
        reader = _list_reader(shape, cache)
    elif kind == "map":
        reader = _map_reader(shape, cache)
    else:  # float/double/document: not in the KMS model; refuse rather than guess
        raise ValueError(f"unsupported shape type {kind} ({shape.name})")
    cache[shape.name] = reader
    return reader


def _accepts_input_structures(shape: Any, seen: set[str] | None = None) -> bool:
    """Whether every structure reachable from a member has a models dataclass to build."""
    seen = set() if seen is None else seen
    if shape.name in seen:
        return True
    seen.add(shape.name)
    if shape.type_name == "structure":
        target = getattr(models, shape.name, None)
        if not (isinstance(target, type) and dataclasses.is_dataclass(target)):
            return False
        fields = {f.name for f in dataclasses.fields(target)}
        if not all(xform_name(name) in fields for name in shape.members):
            return False
        return all(_accepts_input_structures(m, seen) for m in shape.members.values())
    if shape.type_name == "list":
        return _accepts_input_structures(shape.member, seen)
    if shape.type_name == "map":
        return _accepts_input_structures(shape.value, seen)
    return True


# ------------------------------------------------------------------ writers


def _write_blob(value: Any) -> Any:
    return base64.b64encode(value).decode("ascii")


def _write_timestamp(value: Any) -> Any:
    return value.timestamp()


def _write_scalar(value: Any) -> Any:
    return value


class _StructureWriter:
    """Writes a dataclass by the members of one output shape; plans are cached per class."""

    __slots__ = ("_by_class", "_members")

    def __init__(self) -> None:
        self._members: tuple[tuple[str, str, _Writer], ...] = ()
        self._by_class: dict[type, tuple[tuple[str, str, _Writer, bool], ...]] = {}

    def compile(self, shape: Any, cache: dict[str, _Writer]) -> None:
        self._members = tuple(
            (name, xform_name(name), _writer(member, cache)) for name, member in shape.members.items()
        )

    def _plan(self, cls: type) -> tuple[tuple[str, str, _Writer, bool], ...]:
        defaults: dict[str, Any] = {}
        if dataclasses.is_dataclass(cls):
            defaults = {
                f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
            }
        plan = tuple(
            (wire, attr, write, defaults.get(attr) == ()) for wire, attr, write in self._members
        )
        self._by_class[cls] = plan
        return plan

    def __call__(self, value: Any) -> Any:
        cls = type(value)
        plan = self._by_class.get(cls) or self._plan(cls)
        out: dict[str, Any] = {}
        for wire, attr, write, omit_empty in plan:
            v = getattr(value, attr, None)
            if v is None or (omit_empty and v == ()):
                continue
            out[wire] = write(v)
        return out


def _writer(shape: Any, cache: dict[str, _Writer]) -> _Writer:
    found = cache.get(shape.name)
    if found is not None:
        return found
    kind = shape.type_name
    writer: _Writer
    if kind == "structure":
        structure = _StructureWriter()
        cache[shape.name] = structure
        structure.compile(shape, cache)
        return structure
    if kind == "blob":
        writer = _write_blob
    elif kind == "timestamp":
        writer = _write_timestamp
    elif kind == "list":
        item = _writer(shape.member, cache)
        writer = (lambda v: list(v)) if item is _write_scalar else (lambda v: [item(x) for x in v])
    elif kind == "map":
        value_writer = _writer(shape.value, cache)
        writer = lambda v: {k: value_writer(x) for k, x in v.items()}  # noqa: E731
    else:  # string (StrEnum is a str), integer, long, boolean
        writer = _write_scalar
    cache[shape.name] = writer
    return writer


# ------------------------------------------------------------------ operations


def _reject_non_finite(token: str) -> Any:
    raise SerializationException(f"Invalid JSON number {token}")


_decode_json = json.JSONDecoder(parse_constant=_reject_non_finite).decode
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_encode_json_ascii = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode
# A \uD800-\uDFFF escape, the only way JSON text can carry a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def decode_body(body: bytes) -> dict[str, Any]:
    """The request JSON object; an empty body is ``{}``. Raises SerializationException.

    A string holding a lone surrogate (``"\\ud800"`` unpaired) is not Unicode text: no
    name, context or policy can hold it (it has no UTF-8 form), so it is refused here.
    """
    if not body.strip():
        return {}
    try:
        value = _decode_json(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SerializationException("Request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise SerializationException("Request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(body) is not None and _has_lone_surrogate(value):
        raise SerializationException("Request body holds a string that is not valid Unicode (a lone surrogate)")
    return value


def _has_lone_surrogate(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def encode_body(value: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; text that has no UTF-8 form (a lone surrogate in an echoed
    name) is written with ASCII escapes instead, which every JSON reader accepts."""
    try:
        return _encode_json(value).encode("utf-8")
    except UnicodeEncodeError:
        return _encode_json_ascii(value).encode("ascii")


@dataclass(frozen=True, slots=True)
class OperationWire:
    """One model operation's compiled input reader and output writer, KeyStore-independent."""

    name: str  # "GenerateDataKey"
    method_name: str  # "generate_data_key"
    members: tuple[_Member, ...]
    member_shapes: Mapping[str, Any]  # wire name -> botocore Shape, for binding checks
    write_output: _Writer | None

    def read(self, document: dict[str, Any]) -> dict[str, Any]:
        """Snake_case arguments for every member present. Raises Serialization/ValidationException."""
        errors: list[str] = []
        args = _read_members(self.members, document, "", errors)
        if errors:
            raise validation_error(errors)
        return args

    def write(self, result: object) -> bytes:
        if self.write_output is None or result is None:
            return b"{}"
        return encode_body(self.write_output(result))


@dataclass(frozen=True, slots=True)
class KmsWire:
    """Every operation of the botocore KMS model, compiled once per process."""

    operations: Mapping[str, OperationWire]  # by operation name

    @staticmethod
    @functools.cache
    def load() -> KmsWire:
        model = botocore.session.get_session().get_service_model("kms")
        readers: dict[str, _Reader] = {}
        writers: dict[str, _Writer] = {}
        operations: dict[str, OperationWire] = {}
        for name in model.operation_names:
            op = model.operation_model(name)
            shape = op.input_shape
            operations[name] = OperationWire(
                name=name,
                method_name=xform_name(name),
                members=_members(shape, readers) if shape is not None else (),
                member_shapes=dict(shape.members) if shape is not None else {},
                write_output=_writer(op.output_shape, writers) if op.output_shape is not None else None,
            )
        return KmsWire(operations=operations)


def _is_empty(value: object) -> bool:
    """A value that asks for nothing beyond the default: False, empty string/list/map/bytes."""
    return value is False or (isinstance(value, str | bytes | tuple | dict) and len(value) == 0)


class BoundOperation:
    """One model operation bound to its entry in the operation table (or to nothing).

    An operation the table does not declare is answered UnsupportedOperationException.
    """

    __slots__ = ("_invoke", "_needed", "_op", "_unsupported", "name", "wire")

    def __init__(
        self, wire: OperationWire, op: Operation[Any, Any] | None, invoke: Callable[..., object] | None
    ) -> None:
        self.name = wire.name
        self.wire = wire
        self._op = op
        self._invoke = invoke
        self._unsupported: tuple[tuple[str, str], ...] = ()  # (attr, wire name) not accepted
        # Members the model leaves optional but the implementation cannot do without
        # (newer models relax e.g. Decrypt's CiphertextBlob): (attr, message path).
        self._needed: tuple[tuple[str, str], ...] = ()
        if op is None:
            return
        parameters = op.parameters
        self._needed = tuple(
            (m.attr, m.path)
            for m in wire.members
            if not m.required
            and m.attr in parameters
            and parameters[m.attr].default is inspect.Parameter.empty
        )
        self._unsupported = tuple(
            (m.attr, m.wire)
            for m in wire.members
            if m.attr not in parameters or not _accepts_input_structures(wire.member_shapes[m.wire])
        )

    @property
    def supported(self) -> bool:
        return self._op is not None

    @property
    def operation(self) -> Operation[Any, Any] | None:
        return self._op

    @property
    def slow(self) -> bool:
        """Whether the server runs it off the event loop (see Operation.slow)."""
        return self._op is not None and self._op.slow

    def parse(self, body: bytes) -> dict[str, Any]:
        """Keyword arguments for the operation from a request body.

        Raises UnsupportedOperationException (operation or a set member not served),
        SerializationException (malformed JSON or types), ValidationException (constraints).
        """
        if self._op is None:
            raise UnsupportedOperationException(f"{self.name} is not supported by this server")
        args = self.wire.read(decode_body(body))
        missing = [
            _violation(path, "null", "not be null") for attr, path in self._needed if attr not in args
        ]
        if missing:
            raise validation_error(missing)
        for attr, wire_name in self._unsupported:
            if attr in args:
                if not _is_empty(args[attr]):
                    raise UnsupportedOperationException(
                        f"{wire_name} is not supported for {self.name} by this server"
                    )
                del args[attr]
        return args

    def call(
        self,
        args: dict[str, Any],
        *,
        principal: str | None = None,
        request_id: str | None = None,
        source: str | None = None,
        secure_transport: bool = False,
        invocation_id: str | None = None,
    ) -> bytes:
        """Run the operation for a caller and return the response body; KMSErrors propagate.

        ``invocation_id``: the SDK's ``amz-sdk-invocation-id`` (the same on each retry).
        """
        assert self._invoke is not None and self._op is not None  # parse() refused the rest
        extra = {"invocation_id": invocation_id} if invocation_id else {}
        result = self._invoke(
            self._op,
            args,
            principal=principal,
            request_id=request_id,
            source=source,
            secure_transport=secure_transport,
            **extra,
        )
        return self.wire.write(result)


class Dispatcher:
    """Maps ``X-Amz-Target`` to bound operations for one KeyStore."""

    __slots__ = ("_by_target",)

    def __init__(self, keystore: object, wire: KmsWire | None = None) -> None:
        wire = KmsWire.load() if wire is None else wire
        invoke = getattr(keystore, "invoke", None)
        by_target: dict[str, BoundOperation] = {}
        for name, op_wire in wire.operations.items():
            op = OPERATIONS.get(name) if callable(invoke) else None
            by_target[TARGET_PREFIX + name] = BoundOperation(op_wire, op, invoke)
        self._by_target = by_target

    def find(self, target: str | None) -> BoundOperation | None:
        return self._by_target.get(target) if target is not None else None

    def resolve(self, target: str | None) -> BoundOperation:
        """Raises UnknownOperationException for a target that is not a KMS operation."""
        found = self._by_target.get(target) if target is not None else None
        if found is None:
            raise UnknownOperationException(
                "Missing X-Amz-Target header" if target is None else "Unknown operation"
            )
        return found

    @property
    def operations(self) -> tuple[BoundOperation, ...]:
        return tuple(self._by_target.values())
