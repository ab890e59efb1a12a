"""Parameter checks with AWS KMS's limits and messages; every failure is a ValidationException."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import TypeVar

from hsmkeys.errors import UnsupportedOperationException, ValidationException

E = TypeVar("E", bound=enum.Enum)
T = TypeVar("T")


def _fail(field: str, value: object, constraint: str) -> ValidationException:
    shown = "" if isinstance(value, bytes) else f" '{value}'"
    return ValidationException(
        f"1 validation error detected: Value{shown} at '{field}' failed to satisfy constraint: "
        f"Member must {constraint}"
    )


def check_present(field: str, value: T | None) -> T:
    """``value``, or KMS's ValidationException for a required member left out."""
    if value is None:
        raise ValidationException(
            f"1 validation error detected: Value null at '{field}' failed to satisfy constraint: Member must not be null"
        )
    return value


def check_bytes(field: str, value: object, *, min_len: int, max_len: int) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ValidationException(f"{field} must be bytes")
    data = bytes(value)
    if len(data) < min_len:
        raise _fail(field, data, f"have length greater than or equal to {min_len}")
    if len(data) > max_len:
        raise _fail(field, data, f"have length less than or equal to {max_len}")
    return data


def check_str(field: str, value: object, *, min_len: int, max_len: int) -> str:
    if not isinstance(value, str):
        raise ValidationException(f"{field} must be a string")
    if len(value) < min_len:
        raise _fail(field, value, f"have length greater than or equal to {min_len}")
    if len(value) > max_len:
        raise _fail(field, value, f"have length less than or equal to {max_len}")
    return value


def check_int(field: str, value: object, *, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValidationException(f"{field} must be an integer")
    if value < low:
        raise _fail(field, value, f"have value greater than or equal to {low}")
    if value > high:
        raise _fail(field, value, f"have value less than or equal to {high}")
    return value


def check_enum(enum_type: type[E], field: str, value: object) -> E:
    """``value`` as a member of ``enum_type``. A value KMS documents but hsmkeys does not
    serve (models.NOT_SERVED) is UnsupportedOperationException; any other is the
    ValidationException KMS gives a value outside the enum."""
    try:
        return enum_type(value)
    except ValueError:
        from hsmkeys.models import NOT_SERVED

        if value in NOT_SERVED.get(enum_type, ()):
            raise UnsupportedOperationException(f"{field} {value} is not supported by hsmkeys.") from None
        allowed = ", ".join(str(m.value) for m in enum_type)
        raise _fail(field, value, f"satisfy enum value set: [{allowed}]") from None


def check_context(field: str, context: Mapping[str, str] | None) -> dict[str, str]:
    """An encryption context: string keys and values, keys non-empty."""
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise ValidationException(f"{field} must be a map of strings")
    out: dict[str, str] = {}
    for k, v in context.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValidationException(f"{field} keys and values must be strings")
        if not k:
            raise _fail(field, k, "have keys of length greater than or equal to 1")
        out[k] = v
    return out


def check_grant_tokens(grant_tokens: Sequence[str] | None) -> tuple[str, ...]:
    if grant_tokens is None:
        return ()
    if isinstance(grant_tokens, str) or not isinstance(grant_tokens, Sequence):
        raise ValidationException("grantTokens must be a list of strings")
    if len(grant_tokens) > 10:
        raise _fail("grantTokens", len(grant_tokens), "have length less than or equal to 10")
    for token in grant_tokens:
        check_str("grantTokens", token, min_len=1, max_len=8192)
    return tuple(grant_tokens)
