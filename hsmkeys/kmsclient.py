"""One small interface to a KMS, whether it is a remote endpoint or a KeyStore in process.

``KmsApi.call(operation, params)`` takes and returns the KMS wire shapes by their
botocore model names (``call("CreateKey", {"Description": "x"})``), with blobs as
``bytes`` and timestamps as aware ``datetime`` in both directions, and raises the
:mod:`hsmkeys.errors` subclass named by the error code (an unknown code raises a plain
:class:`~hsmkeys.errors.KMSError` carrying that code).

* :class:`Boto3Kms` wraps a boto3 ``kms`` client (any endpoint, boto3's credential chain).
* :class:`LocalKms` goes through the server's own wire layer
  (:class:`hsmkeys.server.wire.Dispatcher`) in process, so a call parses, validates and
  serialises exactly as it would over HTTP, without a server or credentials.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from hsmkeys import errors
from hsmkeys.errors import KMSError, ValidationException

__all__ = ["Boto3Kms", "KmsApi", "KmsTransportError", "LocalKms", "error_for_code"]


class KmsTransportError(KMSError):
    """The KMS endpoint could not be reached or the client could not sign (no region, no
    credentials); no KMS error code was received."""

    code = "TransportError"


class KmsApi(Protocol):
    """A KMS reachable by operation name. Raises KMSError subclasses by code."""

    def call(self, operation: str, params: Mapping[str, Any]) -> dict[str, Any]: ...


def error_for_code(code: str, message: str) -> KMSError:
    """The :mod:`hsmkeys.errors` exception for a KMS error code (a plain KMSError carrying
    ``code`` when hsmkeys has no class of that name)."""
    cls = getattr(errors, code, None)
    if isinstance(cls, type) and issubclass(cls, KMSError):
        return cls(message)
    error = KMSError(message)
    error.code = code
    return error


# ------------------------------------------------------------------ boto3


class Boto3Kms:
    """A boto3 ``kms`` client as a :class:`KmsApi`."""

    __slots__ = ("_client",)

    def __init__(self, client: Any) -> None:
        self._client = client

    @classmethod
    def connect(cls, *, endpoint_url: str | None = None, region: str | None = None) -> Boto3Kms:
        """A client from boto3's usual credential chain (env, profile, instance role);
        region from ``region`` else the environment / profile."""
        import boto3

        return cls(boto3.client("kms", endpoint_url=endpoint_url, region_name=region))

    def call(self, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        from botocore import xform_name
        from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

        method = getattr(self._client, xform_name(operation))
        try:
            response: dict[str, Any] = method(**params)
        except ClientError as exc:
            info = exc.response.get("Error", {})
            raise error_for_code(str(info.get("Code", "KMSError")), str(info.get("Message", ""))) from None
        except ParamValidationError as exc:  # botocore checks the model before sending
            raise ValidationException(" ".join(str(exc).split())) from None
        except BotoCoreError as exc:  # no region, no credentials, connection refused, ...
            raise KmsTransportError(" ".join(str(exc).split())) from None
        response.pop("ResponseMetadata", None)
        return response


# ------------------------------------------------------------------ in process


def _to_wire(value: Any) -> Any:
    """Request values as JSON, as botocore serialises them: bytes -> base64, times -> epoch."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, Mapping):
        return {k: _to_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_wire(v) for v in value]
    return value


def _from_wire(value: Any, shape: Any) -> Any:
    """A response JSON value typed by its botocore shape: blobs -> bytes, timestamps -> datetime."""
    if value is None:
        return None
    kind = shape.type_name
    if kind == "blob":
        return base64.b64decode(value)
    if kind == "timestamp":
        return datetime.fromtimestamp(value, tz=UTC)
    if kind == "structure":
        members = shape.members
        return {k: (_from_wire(v, members[k]) if k in members else v) for k, v in value.items()}
    if kind == "list":
        return [_from_wire(v, shape.member) for v in value]
    if kind == "map":
        return {k: _from_wire(v, shape.value) for k, v in value.items()}
    return value


@functools.cache
def _output_shape(operation: str) -> Any:
    import botocore.session

    model = botocore.session.get_session().get_service_model("kms")
    return model.operation_model(operation).output_shape


class LocalKms:
    """A KeyStore as a :class:`KmsApi`, through the server's wire layer, in process.

    Calls run as the trusted local caller (no principal), as the ``hsmkeys`` CLI does.
    """

    __slots__ = ("_dispatcher",)

    def __init__(self, keystore: object) -> None:
        from hsmkeys.server.wire import Dispatcher

        self._dispatcher = Dispatcher(keystore)

    def call(self, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        from hsmkeys.server.wire import TARGET_PREFIX

        bound = self._dispatcher.resolve(TARGET_PREFIX + operation)
        body = json.dumps(_to_wire(params)).encode("utf-8")
        reply = bound.call(bound.parse(body))
        document = json.loads(reply) if reply.strip() else {}
        shape = _output_shape(operation)
        if shape is None:
            return {}
        decoded: dict[str, Any] = _from_wire(document, shape)
        return decoded
