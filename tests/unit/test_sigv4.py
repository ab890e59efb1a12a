"""SigV4 verification, with botocore's signer as the oracle.

Every request here is signed by ``botocore.auth.SigV4Auth`` at a frozen time, then
presented to the verifier the way an ASGI server (uvicorn) hands it over: raw
path, raw query string, lower-cased header names as bytes, the body as bytes.
"""

from __future__ import annotations

import ast
import datetime as datetime_module
import hashlib
import hmac
import string
import types
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import SplitResult, parse_qsl, quote, urlsplit

import botocore.auth
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsmkeys.clock import FakeClock
from hsmkeys.errors import (
    ConfigError,
    IncompleteSignatureException,
    InvalidSignatureException,
    KMSError,
    MissingAuthenticationTokenException,
    UnrecognizedClientException,
)
from hsmkeys.server import sigv4
from hsmkeys.server.sigv4 import Credential, SigV4Verifier

KEY_ID = "AKIDEXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
PRINCIPAL = "arn:aws:iam::111122223333:user/alice"
REGION = "eu-west-2"
ENDPOINT = "https://kms.hsmkeys.test:8443"
SIGNED_AT = datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC)
AMZ_DATE = "%Y%m%dT%H%M%SZ"
KMS_HEADERS = (
    ("X-Amz-Target", "TrentService.Encrypt"),
    ("Content-Type", "application/x-amz-json-1.1"),
    ("User-Agent", "Boto3/1.34 md/Botocore#1.34"),
)
KMS_BODY = b'{"KeyId": "alias/test", "Plaintext": "aGVsbG8="}'

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- botocore as the client ---------------------------------------------------------------


@dataclass(frozen=True)
class WireRequest:
    """A request as the verifier receives it from the ASGI scope and body."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def verify(self, verifier: SigV4Verifier) -> Credential:
        return verifier.verify(self.method, self.path, self.query, self.headers, self.body)

    def header(self, name: bytes) -> bytes:
        (value,) = [v for n, v in self.headers if n == name]
        return value

    def signed_headers(self) -> list[bytes]:
        authorization = self.header(b"authorization")
        signed = authorization.split(b"SignedHeaders=")[1].split(b",")[0]
        return signed.split(b";")

    def with_header(self, name: bytes, value: bytes) -> WireRequest:
        """Every ``name`` header replaced by one ``name: value``."""
        kept = tuple((n, v) for n, v in self.headers if n != name)
        return replace(self, headers=(*kept, (name, value)))

    def without_header(self, name: bytes) -> WireRequest:
        return replace(self, headers=tuple((n, v) for n, v in self.headers if n != name))


@contextmanager
def botocore_signing_time(when: datetime) -> Iterator[None]:
    """Freeze the clock botocore.auth reads, whichever way this botocore version reads it.

    botocore >= 1.31 calls ``botocore.compat.get_current_datetime()`` (imported into
    botocore.auth); older versions call ``datetime.datetime.utcnow()`` on botocore.auth's
    own ``datetime`` module. Both are patched; ``sign`` asserts the result.
    """
    naive = when.astimezone(UTC).replace(tzinfo=None)

    class FrozenDatetime(datetime_module.datetime):
        @classmethod
        def utcnow(cls) -> Any:
            return naive

        @classmethod
        def now(cls, tz: datetime_module.tzinfo | None = None) -> Any:
            return naive if tz is None else when.astimezone(tz)

    frozen_module = types.SimpleNamespace(**vars(datetime_module))
    frozen_module.datetime = FrozenDatetime
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(botocore.auth, "datetime", frozen_module))
        if hasattr(botocore.auth, "get_current_datetime"):

            def frozen_now(remove_tzinfo: bool = True) -> datetime:
                return naive if remove_tzinfo else when.astimezone(UTC)

            stack.enter_context(
                mock.patch.object(botocore.auth, "get_current_datetime", frozen_now)
            )
        yield


def sign(
    when: datetime = SIGNED_AT,
    *,
    body: bytes = KMS_BODY,
    method: str = "POST",
    path: str = "/",
    params: Sequence[tuple[str, str]] = (),
    headers: Sequence[tuple[str, str]] = KMS_HEADERS,
    key_id: str = KEY_ID,
    secret: str = SECRET,
    token: str | None = None,
    region: str = REGION,
    endpoint: str = ENDPOINT,
    strip_ows: bool = True,
    payload_signing: bool = True,
) -> WireRequest:
    """Sign with botocore at ``when`` and convert to what the ASGI server hands over.

    ``path`` is the raw (already percent-encoded) path the client puts on the wire.
    """
    request = AWSRequest(method=method, url=endpoint + path, data=body, params=list(params))
    for name, value in headers:
        request.headers[name] = value  # an HTTPMessage: a repeated name stays repeated
    if not payload_signing:
        request.context["payload_signing_enabled"] = False
    with botocore_signing_time(when):
        SigV4Auth(Credentials(key_id, secret, token), "kms", region).add_auth(request)
    # Proves the clock patch took effect on this botocore version.
    assert request.context["timestamp"] == when.strftime(AMZ_DATE)
    return to_asgi(request, strip_ows=strip_ows)


def to_asgi(request: AWSRequest, *, strip_ows: bool) -> WireRequest:
    """The request as uvicorn presents it: raw path and query, lower-cased names, bytes.

    Headers come from the AWSRequest rather than the prepared request, whose
    HeadersDict keeps only one value per name; an HTTP client sends them all.
    """
    prepared = request.prepare()
    url = urlsplit(prepared.url)
    body = prepared.body or b""
    assert isinstance(body, bytes)
    pairs = [(b"host", _host_header(url))]
    pairs += [
        (name.lower().encode("ascii"), _field_value(value, strip_ows=strip_ows))
        for name, value in request.headers.items()
    ]
    pairs.append((b"content-length", str(len(body)).encode("ascii")))
    return WireRequest(prepared.method, url.path or "/", url.query, tuple(pairs), body)


def _host_header(url: SplitResult) -> bytes:
    # What http.client sends, and what botocore signs when no Host header is set.
    assert url.hostname is not None
    default_port = {"http": 80, "https": 443}[url.scheme]
    port = "" if url.port in (None, default_port) else f":{url.port}"
    return (url.hostname + port).encode("ascii")


def _field_value(value: str, *, strip_ows: bool) -> bytes:
    # http.client encodes values as latin-1; h11 strips optional whitespace, httptools does not.
    raw = value.encode("latin-1")
    return raw.strip(b" \t") if strip_ows else raw


def make_verifier(
    clock_at: datetime = SIGNED_AT,
    *,
    region: str = REGION,
    credentials: Sequence[Credential] = (Credential(KEY_ID, SECRET, PRINCIPAL),),
) -> SigV4Verifier:
    return SigV4Verifier(credentials, region=region, clock=FakeClock(clock_at))


def assert_rejected(
    request: WireRequest, verifier: SigV4Verifier, error: type[KMSError], match: str | None = None
) -> KMSError:
    with pytest.raises(error, match=match) as caught:
        request.verify(verifier)
    assert caught.value.code == error.__name__
    return caught.value


# --- strategies ---------------------------------------------------------------------------

_TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
# Headers the signer or the HTTP client own, or that change how botocore signs (Date).
_RESERVED = {
    "authorization",
    "content-length",
    "date",
    "host",
    "transfer-encoding",
    "x-amz-content-sha256",
    "x-amz-date",
    "x-amz-security-token",
}
header_names = st.one_of(
    # A few fixed names so that repeats (and names botocore leaves unsigned) are common.
    st.sampled_from(["X-Custom", "x-custom", "X-Amz-Target", "User-Agent", "X-Amzn-Trace-Id"]),
    st.text(_TOKEN, min_size=1, max_size=12),
).filter(lambda name: name.lower() not in _RESERVED)
# Printable ASCII words and runs of the whitespace Trimall must collapse (botocore splits a
# str, so the ASCII separators 0x1c-0x1f count as whitespace too). Non-ASCII values cannot
# round-trip: botocore signs their UTF-8 while http.client sends latin-1.
_words = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=8)
_whitespace_runs = st.text(st.sampled_from(" \t\x0b\x0c\x1c\x1f"), min_size=1, max_size=3)
header_values = st.lists(st.one_of(_words, _whitespace_runs), max_size=6).map("".join)
path_segments = st.one_of(
    st.sampled_from(["", ".", ".."]),
    st.sampled_from(["a b", "~", "%", "é", "?#"]).map(lambda s: quote(s, safe="")),
    st.sampled_from(["%7e", "%2F", "%41", "%25"]),  # raw wire spellings, signed as sent
    st.tuples(st.text(max_size=8), st.sampled_from(["", "!$&'()*+,;=:@"])).map(
        lambda text_safe: quote(*text_safe)
    ),
)
raw_paths = st.one_of(
    st.just("/"),
    st.lists(path_segments, min_size=1, max_size=4).map(lambda segments: "/" + "/".join(segments)),
)
query_params = st.lists(st.tuples(st.text(max_size=6), st.text(max_size=6)), max_size=4)
signing_times = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2099, 12, 31, 23, 59, 59),
    timezones=st.just(UTC),
).map(lambda when: when.replace(microsecond=0))
regions = st.sampled_from(["us-east-1", "eu-west-2", "ap-southeast-3", "local"])
secrets = st.text(min_size=1, max_size=40)


@st.composite
def signed_requests(draw: st.DrawFn) -> tuple[WireRequest, datetime, str, str]:
    """(request, signing time, secret, region) for a random botocore-signed request."""
    when = draw(signing_times)
    secret = draw(secrets)
    region = draw(regions)
    request = sign(
        when,
        body=draw(st.binary(max_size=300)),
        method=draw(st.sampled_from(["POST", "GET", "PUT", "DELETE"])),
        path=draw(raw_paths),
        params=draw(query_params),
        headers=[
            *KMS_HEADERS[:2],  # X-Amz-Target and Content-Type, which must be signed
            *draw(st.lists(st.tuples(header_names, header_values), max_size=6)),
        ],
        secret=secret,
        region=region,
        endpoint=draw(st.sampled_from([ENDPOINT, "http://localhost", "http://127.0.0.1:4000"])),
        strip_ows=draw(st.booleans()),
    )
    return request, when, secret, region


# --- botocore-signed requests verify ------------------------------------------------------


def test_botocore_signed_kms_request_returns_its_credential() -> None:
    credential = sign().verify(make_verifier())
    assert credential == Credential(KEY_ID, SECRET, PRINCIPAL)
    assert credential.principal_arn == PRINCIPAL


def test_the_right_credential_is_chosen_among_several() -> None:
    bob = Credential("AKIDBOB", "bob-secret", "arn:aws:iam::111122223333:user/bob")
    verifier = make_verifier(credentials=[Credential(KEY_ID, SECRET, PRINCIPAL), bob])
    assert sign(key_id="AKIDBOB", secret="bob-secret").verify(verifier) == bob
    assert sign().verify(verifier).principal_arn == PRINCIPAL


@SETTINGS
@given(signed=signed_requests(), skew_seconds=st.integers(-300, 300))
def test_any_botocore_signed_request_verifies(
    signed: tuple[WireRequest, datetime, str, str], skew_seconds: int
) -> None:
    request, when, secret, region = signed
    verifier = make_verifier(
        when + timedelta(seconds=skew_seconds),
        region=region,
        credentials=[Credential(KEY_ID, secret, PRINCIPAL)],
    )
    assert request.verify(verifier).principal_arn == PRINCIPAL


def test_repeated_headers_are_signed_joined_in_arrival_order() -> None:
    request = sign(headers=[*KMS_HEADERS, ("X-Trace", " a  b "), ("x-trace", "c"), ("X-Trace", "")])
    assert [v for n, v in request.headers if n == b"x-trace"] == [b"a  b", b"c", b""]
    assert request.verify(make_verifier())
    swapped = [h for h in request.headers if h[0] != b"x-trace"]
    swapped += [(b"x-trace", b"c"), (b"x-trace", b"a  b"), (b"x-trace", b"")]
    assert_rejected(
        replace(request, headers=tuple(swapped)), make_verifier(), InvalidSignatureException
    )


def test_header_values_are_trimmed_and_inner_whitespace_collapsed() -> None:
    request = sign(
        headers=[*KMS_HEADERS, ("X-Spaces", "  one \t two\x0b\x1cthree  ")], strip_ows=False
    )
    assert request.header(b"x-spaces") == b"  one \t two\x0b\x1cthree  "
    assert request.verify(make_verifier())
    # Same words, whitespace spelled differently: the same canonical value.
    assert request.with_header(b"x-spaces", b"one two three").verify(make_verifier())


def test_percent_encoded_path_is_signed_encoded_twice() -> None:
    request = sign(path="/keys/a%20b/%7e/./x/../")
    assert request.path == "/keys/a%20b/%7e/./x/../"
    assert request.verify(make_verifier())
    # The decoded path (ASGI scope["path"]) is not what was signed: pass scope["raw_path"].
    assert_rejected(
        replace(request, path="/keys/a b/~/./x/../"), make_verifier(), InvalidSignatureException
    )


def test_unsigned_headers_may_change_or_be_added() -> None:
    request = sign()
    assert b"user-agent" not in request.signed_headers()
    changed = request.with_header(b"user-agent", b"other").with_header(
        b"x-forwarded-for", b"10.0.0.1"
    )
    assert changed.verify(make_verifier())


def test_mapping_headers_verify_like_asgi_pairs() -> None:
    request = sign()
    mapping = {name.decode().title(): value.decode() for name, value in request.headers}
    assert make_verifier().verify(
        request.method, request.path, request.query, mapping, request.body
    )


def test_signed_payload_hash_header_verifies() -> None:
    digest = hashlib.sha256(KMS_BODY).hexdigest()
    request = sign(headers=[*KMS_HEADERS, ("X-Amz-Content-SHA256", digest)])
    assert b"x-amz-content-sha256" in request.signed_headers()
    assert request.verify(make_verifier())


# --- any single mutation fails ------------------------------------------------------------

MUTATIONS: dict[str, type[KMSError]] = {
    "body": InvalidSignatureException,
    "signed header value": InvalidSignatureException,
    "path": InvalidSignatureException,
    "query": InvalidSignatureException,
    "method": InvalidSignatureException,
    "x-amz-date": InvalidSignatureException,
    "signature hex": InvalidSignatureException,
    "secret": InvalidSignatureException,
    "region": InvalidSignatureException,
    "dropped signed header": IncompleteSignatureException,
    "access key": UnrecognizedClientException,
}


@SETTINGS
@given(signed=signed_requests(), mutation=st.sampled_from(sorted(MUTATIONS)), data=st.data())
def test_any_single_mutation_fails_with_the_kms_error(
    signed: tuple[WireRequest, datetime, str, str], mutation: str, data: st.DataObject
) -> None:
    request, when, secret, region = signed
    verifier = make_verifier(
        when, region=region, credentials=[Credential(KEY_ID, secret, PRINCIPAL)]
    )
    mutated = _mutate(request, mutation, when, secret, region, data)
    assert_rejected(mutated, verifier, MUTATIONS[mutation])


def _mutate(
    request: WireRequest,
    mutation: str,
    when: datetime,
    secret: str,
    region: str,
    data: st.DataObject,
) -> WireRequest:
    headers = list(request.headers)
    if mutation == "body":
        if not request.body:
            return replace(request, body=b"\x00")
        at = data.draw(st.integers(0, len(request.body) - 1))
        flip = data.draw(st.integers(1, 255))
        body = bytearray(request.body)
        body[at] ^= flip
        return replace(request, body=bytes(body))
    if mutation == "signed header value":
        signed = set(request.signed_headers()) - {b"x-amz-date"}
        at = data.draw(st.sampled_from([i for i, (n, _) in enumerate(headers) if n in signed]))
        name, value = headers[at]
        headers[at] = (name, value + b"x")  # changes the trimmed value too
        return replace(request, headers=tuple(headers))
    if mutation == "path":
        return replace(request, path=request.path + "x")
    if mutation == "query":
        return replace(request, query=request.query + ("&" if request.query else "") + "x=1")
    if mutation == "method":
        return replace(request, method="PATCH")
    if mutation == "x-amz-date":
        shifted = when + timedelta(seconds=data.draw(st.sampled_from([-1, 1])))
        return request.with_header(b"x-amz-date", shifted.strftime(AMZ_DATE).encode())
    if mutation == "signature hex":
        authorization = request.header(b"authorization")
        at = data.draw(st.integers(len(authorization) - 64, len(authorization) - 1))
        old = authorization[at : at + 1]
        new = data.draw(st.sampled_from([c for c in b"0123456789abcdef" if bytes([c]) != old]))
        mutated = authorization[:at] + bytes([new]) + authorization[at + 1 :]
        return request.with_header(b"authorization", mutated)
    # The rest re-sign the same request with one signing input changed.
    authorization = request.header(b"authorization")
    if mutation == "secret":
        authorization = _resign(request, when, secret=secret + "x", region=region)
    elif mutation == "region":
        authorization = _resign(request, when, secret=secret, region=region + "x")
    elif mutation == "access key":
        authorization = _resign(request, when, secret=secret, region=region, key_id="AKIDOTHER")
    elif mutation == "dropped signed header":
        name = data.draw(st.sampled_from(sorted(request.signed_headers())))
        return request.without_header(name)
    else:
        raise AssertionError(mutation)
    return request.with_header(b"authorization", authorization.encode())


def _resign(
    request: WireRequest, when: datetime, *, secret: str, region: str, key_id: str = KEY_ID
) -> str:
    """The Authorization botocore computes for the same wire request with other credentials."""
    url = "http://" + request.header(b"host").decode() + request.path
    # As params, so that botocore re-encodes them exactly as when the request was first signed.
    params = parse_qsl(request.query, keep_blank_values=True)
    signed = set(request.signed_headers())
    aws_request = AWSRequest(method=request.method, url=url, data=request.body, params=params)
    for name, value in request.headers:
        if name in signed and name not in (b"host", b"x-amz-date", b"authorization"):
            aws_request.headers[name.decode()] = value.decode("latin-1")
    with botocore_signing_time(when):
        SigV4Auth(Credentials(key_id, secret), "kms", region).add_auth(aws_request)
    authorization: str = aws_request.headers["Authorization"]
    return authorization


def test_resign_reproduces_botocore_signature() -> None:
    # Guards the mutation test: the re-signing helper is right when nothing changes.
    request = sign(path="/a%20b", params=[("q", "x y")], headers=[*KMS_HEADERS, ("X-A", "1")])
    assert _resign(request, SIGNED_AT, secret=SECRET, region=REGION).encode() == request.header(
        b"authorization"
    )


# --- credentials, scope and clock ---------------------------------------------------------


def test_unknown_access_key_is_unrecognized_client() -> None:
    error = assert_rejected(
        sign(key_id="AKIDUNKNOWN"), make_verifier(), UnrecognizedClientException
    )
    assert error.message == "The security token included in the request is invalid."


def test_session_token_is_unrecognized_client() -> None:
    request = sign(token="FQoGZXIvYXdzEXAMPLE")
    assert b"x-amz-security-token" in request.signed_headers()
    assert_rejected(request, make_verifier(), UnrecognizedClientException)


def test_wrong_secret_is_invalid_signature() -> None:
    error = assert_rejected(
        sign(secret="not-the-secret"), make_verifier(), InvalidSignatureException
    )
    assert "does not match the signature you provided" in error.message


def test_other_region_or_service_scope_is_invalid_signature() -> None:
    assert_rejected(sign(region="us-east-1"), make_verifier(), InvalidSignatureException, "region")
    request = sign()
    sqs = request.header(b"authorization").replace(b"/kms/", b"/sqs/")
    assert_rejected(
        request.with_header(b"authorization", sqs),
        make_verifier(),
        InvalidSignatureException,
        "service",
    )


@pytest.mark.parametrize("offset", [timedelta(0), timedelta(minutes=5), -timedelta(minutes=5)])
def test_clock_skew_up_to_five_minutes_is_accepted(offset: timedelta) -> None:
    assert sign().verify(make_verifier(SIGNED_AT + offset))


def test_request_older_than_five_minutes_is_signature_expired() -> None:
    verifier = make_verifier(SIGNED_AT + timedelta(minutes=5, seconds=1))
    error = assert_rejected(sign(), verifier, InvalidSignatureException)
    # AWS's wording: "Signature expired: <date> is now earlier than <now - 5 min> (<now> - 5 min.)"
    assert error.message == (
        "Signature expired: 20260314T150926Z is now earlier than 20260314T150927Z "
        "(20260314T151427Z - 5 min.)"
    )


def test_request_more_than_five_minutes_ahead_is_not_yet_current() -> None:
    verifier = make_verifier(SIGNED_AT - timedelta(minutes=5, seconds=1))
    error = assert_rejected(sign(), verifier, InvalidSignatureException)
    assert error.message == (
        "Signature not yet current: 20260314T150926Z is still later than 20260314T150925Z "
        "(20260314T150425Z + 5 min.)"
    )


@SETTINGS
@given(when=signing_times, skew_seconds=st.integers(301, 10**8), ahead=st.booleans())
def test_any_skew_beyond_five_minutes_is_rejected(
    when: datetime, skew_seconds: int, ahead: bool
) -> None:
    offset = timedelta(seconds=skew_seconds)
    verifier = make_verifier(when - offset if ahead else when + offset)
    match = "Signature not yet current" if ahead else "Signature expired"
    assert_rejected(sign(when), verifier, InvalidSignatureException, match)


def test_credential_scope_date_must_match_x_amz_date() -> None:
    request = sign()
    yesterday = request.header(b"authorization").replace(b"/20260314/", b"/20260313/")
    assert_rejected(
        request.with_header(b"authorization", yesterday),
        make_verifier(),
        InvalidSignatureException,
        "Date in Credential scope does not match",
    )


# --- missing and malformed authentication -------------------------------------------------


def test_no_authorization_is_missing_authentication_token() -> None:
    request = sign().without_header(b"authorization").without_header(b"x-amz-date")
    assert_rejected(request, make_verifier(), MissingAuthenticationTokenException)


def test_x_amz_date_without_authorization_is_incomplete_signature() -> None:
    request = sign().without_header(b"authorization")
    assert_rejected(request, make_verifier(), IncompleteSignatureException, "Credential")


def test_presigned_query_is_refused_as_incomplete_signature() -> None:
    request = replace(
        sign().without_header(b"authorization"),
        query="X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20260314"
        "%2Feu-west-2%2Fkms%2Faws4_request&X-Amz-Signature=00",
    )
    assert_rejected(request, make_verifier(), IncompleteSignatureException, "presigned")


_GOOD_SCOPE = b"Credential=AKIDEXAMPLE/20260314/eu-west-2/kms/aws4_request"
_GOOD_SIGNED = b"SignedHeaders=content-type;host;x-amz-date;x-amz-target"
_GOOD_SIGNATURE = b"Signature=" + b"0" * 64


@pytest.mark.parametrize(
    "authorization",
    [
        b"",
        b"AWS4-HMAC-SHA256",
        b"AWS4-HMAC-SHA1 " + b", ".join([_GOOD_SCOPE, _GOOD_SIGNED, _GOOD_SIGNATURE]),
        b"AWS3-HTTPS AWSAccessKeyId=AKIDEXAMPLE,Algorithm=HmacSHA256,Signature=abc",
        b"Bearer token",
        b"AWS4-HMAC-SHA256 " + b", ".join([_GOOD_SCOPE, _GOOD_SIGNED]),
        b"AWS4-HMAC-SHA256 " + b", ".join([_GOOD_SIGNED, _GOOD_SIGNATURE]),
        b"AWS4-HMAC-SHA256 " + b", ".join([_GOOD_SCOPE, _GOOD_SIGNATURE]),
        b"AWS4-HMAC-SHA256 " + b", ".join([_GOOD_SCOPE, _GOOD_SIGNED, b"Signature="]),
        b"AWS4-HMAC-SHA256 " + b", ".join([_GOOD_SCOPE, _GOOD_SIGNED, _GOOD_SIGNATURE, b"junk"]),
        b"AWS4-HMAC-SHA256 "
        + b", ".join(
            [b"Credential=AKIDEXAMPLE/20260314/eu-west-2/kms", _GOOD_SIGNED, _GOOD_SIGNATURE]
        ),
        b"AWS4-HMAC-SHA256 "
        + b", ".join([_GOOD_SCOPE, b"SignedHeaders=host;;x-amz-date", _GOOD_SIGNATURE]),
    ],
)
def test_malformed_authorization_is_incomplete_signature(authorization: bytes) -> None:
    request = sign().with_header(b"authorization", authorization)
    assert_rejected(request, make_verifier(), IncompleteSignatureException)


@pytest.mark.parametrize(
    "amz_date", [b"2026-03-14T15:09:26Z", b"20260314T150926", b"20261314T150926Z", b""]
)
def test_malformed_x_amz_date_is_incomplete_signature(amz_date: bytes) -> None:
    request = sign().with_header(b"x-amz-date", amz_date)
    assert_rejected(request, make_verifier(), IncompleteSignatureException, "ISO-8601")


def test_date_header_instead_of_x_amz_date_is_incomplete_signature() -> None:
    # botocore signs with Date when one is set; only X-Amz-Date is supported here.
    request = sign(headers=[*KMS_HEADERS, ("Date", "Sat, 14 Mar 2026 15:09:26 GMT")])
    assert_rejected(request, make_verifier(), IncompleteSignatureException, "X-Amz-Date")


def _resigned_without(name: str) -> WireRequest:
    """A request validly signed by botocore whose SignedHeaders leave out ``name``.

    botocore signs every header it is given (but a few like User-Agent), so the header
    is added after signing, as a client that signs less would send it.
    """
    kept = [(n, v) for n, v in KMS_HEADERS if n.lower() != name]
    request = sign(headers=kept)
    for header, value in KMS_HEADERS:
        if header.lower() == name:
            request = request.with_header(name.encode(), value.encode())
    return request


@pytest.mark.parametrize(
    ("name", "label"),
    [
        (b"host", "Host"),
        (b"x-amz-date", "X-Amz-Date"),
        (b"x-amz-target", "X-Amz-Target"),
        (b"content-type", "Content-Type"),
    ],
)
def test_required_headers_left_out_of_signed_headers_are_invalid_signature(
    name: bytes, label: str
) -> None:
    request = sign()
    authorization = (
        request.header(b"authorization").replace(name + b";", b"").replace(b";" + name, b"")
    )
    assert name not in authorization.split(b"SignedHeaders=")[1].split(b",")[0].split(b";")
    assert_rejected(
        request.with_header(b"authorization", authorization),
        make_verifier(),
        InvalidSignatureException,
        f"'{label}'.* must be a 'SignedHeader'",
    )


@pytest.mark.parametrize("name", ["x-amz-target", "content-type"])
def test_request_signed_without_target_or_content_type_is_invalid_signature(name: str) -> None:
    request = _resigned_without(name)
    assert name.encode() not in request.signed_headers()
    assert_rejected(request, make_verifier(), InvalidSignatureException, "SignedHeader")


@pytest.mark.parametrize("name", ["X-Amz-Target", "Content-Type"])
def test_request_without_target_or_content_type_verifies_for_the_app_to_refuse(name: str) -> None:
    # Nothing to replay: the app answers UnknownOperationException / SerializationException.
    request = sign(headers=[(n, v) for n, v in KMS_HEADERS if n != name])
    assert name.lower().encode() not in dict(request.headers)
    assert request.verify(make_verifier())


def test_captured_encrypt_replayed_as_another_operation_is_invalid_signature() -> None:
    captured = sign()
    assert captured.verify(make_verifier())
    for target in (b"TrentService.Decrypt", b"TrentService.ReEncrypt", b"TrentService.encrypt"):
        replayed = captured.with_header(b"x-amz-target", target)
        assert_rejected(replayed, make_verifier(), InvalidSignatureException, "does not match")


@pytest.mark.parametrize("name", [b"authorization", b"x-amz-date", b"host"])
def test_repeated_single_valued_header_is_incomplete_signature(name: bytes) -> None:
    request = sign()
    doubled = replace(request, headers=(*request.headers, (name, request.header(name))))
    assert_rejected(doubled, make_verifier(), IncompleteSignatureException, "only once")


# --- payload hash header ------------------------------------------------------------------


def test_unsigned_payload_is_refused() -> None:
    request = sign(payload_signing=False)  # botocore sends UNSIGNED-PAYLOAD over https
    assert request.header(b"x-amz-content-sha256") == b"UNSIGNED-PAYLOAD"
    assert_rejected(request, make_verifier(), InvalidSignatureException, "UNSIGNED-PAYLOAD")


def test_payload_hash_header_of_another_body_is_invalid_signature() -> None:
    other = hashlib.sha256(b"other").hexdigest()
    request = sign(headers=[*KMS_HEADERS, ("X-Amz-Content-SHA256", other)])
    assert_rejected(request, make_verifier(), InvalidSignatureException, "x-amz-content-sha256")


def test_unsigned_payload_hash_header_is_invalid_signature() -> None:
    request = sign().with_header(
        b"x-amz-content-sha256", hashlib.sha256(KMS_BODY).hexdigest().encode()
    )
    assert_rejected(request, make_verifier(), InvalidSignatureException, "x-amz-content-sha256")


# --- the signing-key cache ----------------------------------------------------------------


class _CountingHmac:
    """Stands in for the hmac module inside sigv4 and counts signing-key derivations."""

    def __init__(self) -> None:
        self.derivations = 0
        self.compare_digest = hmac.compare_digest

    def digest(self, key: bytes, msg: bytes, digest: str) -> bytes:
        if msg == b"aws4_request":  # the last step of kSigning = HMAC(kService, "aws4_request")
            self.derivations += 1
        return hmac.digest(key, msg, digest)


@pytest.fixture
def counting_hmac(monkeypatch: pytest.MonkeyPatch) -> _CountingHmac:
    counter = _CountingHmac()
    monkeypatch.setattr(sigv4, "hmac", counter)
    return counter


def test_signing_key_is_derived_once_per_day(counting_hmac: _CountingHmac) -> None:
    clock = FakeClock(SIGNED_AT)
    verifier = SigV4Verifier([Credential(KEY_ID, SECRET, PRINCIPAL)], region=REGION, clock=clock)
    sign(SIGNED_AT).verify(verifier)
    assert counting_hmac.derivations == 1
    for seconds in (1, 60, 3600):
        later = SIGNED_AT + timedelta(seconds=seconds)
        clock.set(later)
        sign(later, body=b"%d" % seconds).verify(verifier)
    assert counting_hmac.derivations == 1

    next_day = SIGNED_AT + timedelta(days=1)
    clock.set(next_day)
    sign(next_day).verify(verifier)
    assert counting_hmac.derivations == 2
    clock.set(SIGNED_AT)
    sign(SIGNED_AT).verify(verifier)  # both days stay cached
    assert counting_hmac.derivations == 2


def test_signing_keys_are_cached_per_secret(counting_hmac: _CountingHmac) -> None:
    bob = Credential("AKIDBOB", "bob-secret", "arn:aws:iam::111122223333:user/bob")
    verifier = make_verifier(credentials=[Credential(KEY_ID, SECRET, PRINCIPAL), bob])
    for _ in range(2):
        sign().verify(verifier)
        sign(key_id="AKIDBOB", secret="bob-secret").verify(verifier)
    assert counting_hmac.derivations == 2


def test_cached_key_is_scoped_to_the_secret(counting_hmac: _CountingHmac) -> None:
    verifier = make_verifier()
    sign().verify(verifier)
    # Same key id and day, other secret: the cached key must not make it verify.
    assert_rejected(sign(secret="guess"), verifier, InvalidSignatureException)
    assert counting_hmac.derivations == 1


def test_rejected_requests_derive_no_key(counting_hmac: _CountingHmac) -> None:
    verifier = make_verifier(SIGNED_AT + timedelta(hours=1))
    assert_rejected(sign(key_id="AKIDUNKNOWN"), verifier, UnrecognizedClientException)
    assert_rejected(sign(), verifier, InvalidSignatureException, "Signature expired")
    assert_rejected(sign(region="us-east-1"), verifier, InvalidSignatureException, "region")
    assert counting_hmac.derivations == 0


def test_signing_key_cache_stays_small(counting_hmac: _CountingHmac) -> None:
    clock = FakeClock(SIGNED_AT)
    verifier = SigV4Verifier([Credential(KEY_ID, SECRET, PRINCIPAL)], region=REGION, clock=clock)
    for day in range(40):
        when = SIGNED_AT + timedelta(days=day)
        clock.set(when)
        sign(when).verify(verifier)
    assert counting_hmac.derivations == 40
    (state,) = verifier._by_key_id.values()
    assert 1 <= len(state.signing_keys) <= 4


# --- construction and module shape --------------------------------------------------------


def test_duplicate_access_key_id_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        SigV4Verifier([Credential(KEY_ID, "a", "p"), Credential(KEY_ID, "b", "q")], region=REGION)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"region": ""},
        {"region": REGION, "service": ""},
        {"region": REGION, "max_skew": timedelta(0)},
    ],
)
def test_bad_verifier_settings_are_config_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SigV4Verifier([], **kwargs)


def test_credential_repr_hides_the_secret() -> None:
    assert SECRET not in repr(Credential(KEY_ID, SECRET, PRINCIPAL))


def test_verifier_does_not_use_botocore() -> None:
    # Rebuilding botocore requests per call costs about a third of the server's throughput.
    source = Path(sigv4.__file__).read_text(encoding="utf-8")
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom)
    }
    assert "botocore" not in imported
