"""Raw HTTP against the server: malformed requests and SigV4 failures are 4xx KMS
errors with a JSON body, never a 500."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from server_harness import (
    ACCESS_KEY_ID,
    REGION,
    SECRET_ACCESS_KEY,
    RawResponse,
    ServerProcess,
    kms_call,
    send,
    signed_headers,
)

pytestmark = pytest.mark.server


def assert_error(response: RawResponse, status: int, code: str) -> None:
    assert (response.status, response.error_code) == (status, code), response.body[:300]
    assert response.headers["content-type"].startswith("application/x-amz-json-1.1")
    assert response.json["message"]
    assert response.headers["x-amzn-requestid"]


def post(server: ServerProcess, target: str | None, body: bytes) -> RawResponse:
    return send(server, "POST", "/", body, signed_headers(server, target, body))


@pytest.fixture(scope="module")
def key_id(kms: Any) -> str:
    return str(kms.create_key()["KeyMetadata"]["KeyId"])


def test_signed_raw_call_succeeds(kms_server: ServerProcess, key_id: str) -> None:
    out = kms_call(kms_server, "DescribeKey", {"KeyId": key_id})
    assert out.status == 200
    assert out.json["KeyMetadata"]["KeyId"] == key_id


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"KeyId": NaN}'],
    ids=["broken", "array", "string", "not-utf8", "nan"],
)
def test_malformed_json_is_serialization_exception(kms_server: ServerProcess, body: bytes) -> None:
    assert_error(post(kms_server, "TrentService.DescribeKey", body), 400, "SerializationException")


@pytest.mark.parametrize(
    ("operation", "payload"),
    [
        ("DescribeKey", {"KeyId": 12}),
        ("GenerateRandom", {"NumberOfBytes": "12"}),
        ("Encrypt", {"KeyId": "k", "Plaintext": "not base64!"}),
        ("Encrypt", {"KeyId": "k", "Plaintext": "cA==", "EncryptionContext": ["a"]}),
        ("CreateKey", {"Tags": {"TagKey": "a"}}),
        ("CreateKey", {"BypassPolicyLockoutSafetyCheck": "yes"}),
    ],
    ids=["str-as-int", "int-as-str", "bad-base64", "map-as-list", "list-as-map", "bool-as-str"],
)
def test_wrong_typed_field_is_a_client_error(
    kms_server: ServerProcess, operation: str, payload: dict[str, Any]
) -> None:
    out = kms_call(kms_server, operation, payload)
    assert out.status == 400
    assert out.error_code in {"SerializationException", "ValidationException"}


@pytest.mark.parametrize(
    ("operation", "payload"),
    [
        ("DescribeKey", {}),
        ("Encrypt", {"KeyId": "alias/x"}),
        ("Decrypt", {}),
        ("CreateAlias", {"AliasName": "alias/only-name"}),
    ],
)
def test_missing_required_field_is_validation_exception(
    kms_server: ServerProcess, operation: str, payload: dict[str, Any]
) -> None:
    out = kms_call(kms_server, operation, payload)
    assert_error(out, 400, "ValidationException")
    assert "failed to satisfy constraint: Member must not be null" in out.json["message"]


def test_constraint_violations_are_all_reported(kms_server: ServerProcess) -> None:
    out = kms_call(kms_server, "ListKeys", {"Limit": 0, "Marker": ""})
    assert_error(out, 400, "ValidationException")
    assert out.json["message"].startswith("2 validation errors detected")


def test_unknown_operation(kms_server: ServerProcess) -> None:
    assert_error(
        post(kms_server, "TrentService.StealKeys", b"{}"), 400, "UnknownOperationException"
    )
    assert_error(
        post(kms_server, "OtherService.DescribeKey", b"{}"), 400, "UnknownOperationException"
    )
    assert_error(post(kms_server, None, b"{}"), 400, "UnknownOperationException")


def test_body_over_one_mib_is_413_validation_exception(kms_server: ServerProcess) -> None:
    body = json.dumps({"KeyId": "alias/x", "Plaintext": "A" * (1 << 20)}).encode()
    assert_error(post(kms_server, "TrentService.Encrypt", body), 413, "ValidationException")
    # The connection was closed; the server still answers the next request.
    assert kms_call(kms_server, "GenerateRandom", {"NumberOfBytes": 8}).status == 200


def test_wrong_content_type_is_refused(kms_server: ServerProcess) -> None:
    body = b"{}"
    headers = signed_headers(
        kms_server, "TrentService.ListKeys", body, extra={"Content-Type": "text/plain"}
    )
    out = send(kms_server, "POST", "/", body, headers)
    assert out.status == 400
    assert out.error_code == "SerializationException"


def test_unsigned_request_is_missing_authentication_token(kms_server: ServerProcess) -> None:
    out = send(
        kms_server,
        "POST",
        "/",
        b"{}",
        {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.ListKeys"},
    )
    assert_error(out, 400, "MissingAuthenticationTokenException")


def test_wrong_secret_is_invalid_signature(kms_server: ServerProcess) -> None:
    body = b"{}"
    headers = signed_headers(
        kms_server, "TrentService.ListKeys", body, secret_access_key="not-the-secret"
    )
    assert_error(send(kms_server, "POST", "/", body, headers), 400, "InvalidSignatureException")


def test_unknown_access_key_is_unrecognized_client(kms_server: ServerProcess) -> None:
    body = b"{}"
    headers = signed_headers(
        kms_server, "TrentService.ListKeys", body, access_key_id="AKIAUNKNOWN00000000"
    )
    assert_error(send(kms_server, "POST", "/", body, headers), 400, "UnrecognizedClientException")


def test_body_changed_after_signing_is_invalid_signature(kms_server: ServerProcess) -> None:
    headers = signed_headers(kms_server, "TrentService.GenerateRandom", b'{"NumberOfBytes": 8}')
    out = send(kms_server, "POST", "/", b'{"NumberOfBytes": 9}', headers)
    assert_error(out, 400, "InvalidSignatureException")


@pytest.mark.parametrize("minutes", [-6, 6])
def test_x_amz_date_more_than_five_minutes_off_is_rejected(
    kms_server: ServerProcess, minutes: int
) -> None:
    body = b"{}"
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=minutes)

    class SkewedSigV4(SigV4Auth):
        """botocore's signer, with X-Amz-Date (and so the scope date) set to ``when``."""

        def _modify_request_before_signing(self, request: AWSRequest) -> None:
            super()._modify_request_before_signing(request)
            stamp = when.strftime("%Y%m%dT%H%M%SZ")
            request.context["timestamp"] = stamp
            del request.headers["X-Amz-Date"]
            request.headers["X-Amz-Date"] = stamp

    def sign(request: AWSRequest) -> None:
        SkewedSigV4(Credentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY), "kms", REGION).add_auth(request)

    headers = signed_headers(kms_server, "TrentService.ListKeys", body, sign=sign)
    assert headers["X-Amz-Date"] == when.strftime("%Y%m%dT%H%M%SZ")
    out = send(kms_server, "POST", "/", body, headers)
    assert_error(out, 400, "InvalidSignatureException")
    assert "Signature expired" in out.json["message"] or "not yet current" in out.json["message"]


def test_wrong_region_in_scope_is_invalid_signature(kms_server: ServerProcess) -> None:
    body = b"{}"

    def sign(request: AWSRequest) -> None:
        SigV4Auth(Credentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY), "kms", "eu-west-1").add_auth(
            request
        )

    headers = signed_headers(kms_server, "TrentService.ListKeys", body, sign=sign)
    assert_error(send(kms_server, "POST", "/", body, headers), 400, "InvalidSignatureException")


def test_unknown_path_and_method(kms_server: ServerProcess) -> None:
    assert send(kms_server, "GET", "/nope").status == 404
    out = send(kms_server, "GET", "/")
    assert out.status == 405
    assert out.headers["allow"] == "POST"
    assert send(kms_server, "POST", "/healthz").status == 405


def test_operation_the_server_lacks_is_unsupported(kms_server: ServerProcess) -> None:
    out = kms_call(kms_server, "CreateCustomKeyStore", {"CustomKeyStoreName": "store"})
    assert out.status == 400
    assert out.error_code == "UnsupportedOperationException"


def test_query_string_and_encoded_path_are_covered_by_the_signature(
    kms_server: ServerProcess,
) -> None:
    body = b"{}"
    headers = signed_headers(kms_server, "TrentService.ListKeys", body)
    # Signed for "/", sent to "/?x=1": the canonical query differs.
    out = send(kms_server, "POST", "/?x=1", body, headers)
    assert_error(out, 400, "InvalidSignatureException")
