"""Lone surrogates (\\ud800 in JSON) must be refused as a KMS 4xx, never a 500."""

from __future__ import annotations

import pytest

from hsmkeys.server.wire import encode_body
from hsmkeys.testing.server import EphemeralKms

from .harness import kms_call

LONE = "\ud800"


@pytest.fixture(scope="module")
def key_id(kms: EphemeralKms) -> str:
    reply = kms_call(kms, "CreateKey", {})
    assert reply.status == 200, reply.body
    return str(reply.json()["KeyMetadata"]["KeyId"])


@pytest.mark.parametrize(
    ("operation", "payload"),
    [
        ("Encrypt", {"Plaintext": "aGk=", "EncryptionContext": {"a": LONE}}),
        ("Encrypt", {"Plaintext": "aGk=", "EncryptionContext": {LONE: "b"}}),
        ("DescribeKey", {}),
        ("Encrypt", {"Plaintext": "aGk="}),
        ("CreateAlias", {"AliasName": "alias/" + LONE}),
        ("TagResource", {"Tags": [{"TagKey": "k", "TagValue": "x\udfff"}]}),
    ],
)
def test_lone_surrogate_is_a_kms_4xx(kms: EphemeralKms, key_id: str, operation: str, payload: dict[str, object]) -> None:
    body = dict(payload)
    body.setdefault("KeyId", key_id if operation not in ("DescribeKey",) else LONE + key_id)
    if operation == "Encrypt" and "EncryptionContext" not in payload:
        body["KeyId"] = key_id + LONE
    if operation == "CreateAlias":
        body["TargetKeyId"] = key_id
        body.pop("KeyId")
    reply = kms_call(kms, operation, body)
    assert 400 <= reply.status < 500, (reply.status, reply.body)
    assert reply.error_code in ("SerializationException", "ValidationException", "NotFoundException"), reply.body


def test_error_body_encoder_survives_a_lone_surrogate() -> None:
    body = encode_body({"__type": "NotFoundException", "message": f"Invalid keyId '{LONE}'"})
    assert b"\\ud800" in body
