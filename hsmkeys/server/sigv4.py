"""AWS Signature Version 4 (header form) verification for the KMS wire server.

The canonical request is rebuilt from the raw request as it arrived (method,
raw path, raw query string, header bytes, body), following the SigV4 rules for
non-S3 services exactly as botocore signs them:

- URI: dot segments and empty segments removed, then URI-encoded once more
  (``quote(path, safe="/~")``; a ``%20`` on the wire is signed as ``%2520``).
- Query: each ``name=value`` pair decoded (``+`` is a space, as botocore's
  prepared URLs use form encoding), re-encoded per RFC 3986, sorted by encoded
  name then value.
- Headers: only the SignedHeaders; each value trimmed with inner whitespace runs
  collapsed to one space (``" ".join(value.split())`` on the UTF-8 text, as
  botocore does), repeated headers joined with ``,`` in arrival order.
- Payload: SHA-256 of the body. ``X-Amz-Content-Sha256``, if sent, must equal
  it: ``UNSIGNED-PAYLOAD`` and streaming payloads are refused, because a KMS
  body (plaintext, ciphertext, policies) must be covered by the signature even
  when TLS ends before this server.

Not supported, each refused with the error AWS would use: presigned (query
string) authentication, the ``Date`` header instead of ``X-Amz-Date``,
temporary credentials (``X-Amz-Security-Token``), SigV4a.

Errors (all from :mod:`hsmkeys.errors`), in the order they are checked:

- MissingAuthenticationTokenException: no Authorization header, no X-Amz-Date.
- IncompleteSignatureException: Authorization malformed (algorithm, missing
  Credential/SignedHeaders/Signature, not key=value, credential not 5 parts),
  X-Amz-Date missing or not ISO-8601 basic, presigned query, a signed header
  absent from the request.
- InvalidSignatureException: Host or X-Amz-Date not signed; X-Amz-Target or
  Content-Type sent but not signed (boto3, the aws CLI and the Encryption SDK sign
  all four; unsigned, a captured request could be replayed as another operation; a
  request without them is refused by the app as UnknownOperationException or
  SerializationException), scope region,
  service, terminator or date wrong, X-Amz-Date outside ``max_skew``, payload
  hash header wrong or unsigned, signature mismatch.
- UnrecognizedClientException: unknown access key id, or a session token.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, unquote_to_bytes

from hsmkeys.clock import Clock, SystemClock
from hsmkeys.errors import (
    ConfigError,
    IncompleteSignatureException,
    InvalidSignatureException,
    MissingAuthenticationTokenException,
    UnrecognizedClientException,
)

__all__ = ["Credential", "SigV4Verifier"]

_ALGORITHM = b"AWS4-HMAC-SHA256"
_TERMINATOR = b"aws4_request"
_TIMESTAMP = "%Y%m%dT%H%M%SZ"
_UNRECOGNIZED = "The security token included in the request is invalid."
_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. "
    "Consult the service documentation for details."
)
# str.split() also splits on the ASCII separators 0x1c-0x1f; bytes.split() does not.
_ASCII_SEPARATORS_TO_SPACE = bytes.maketrans(b"\x1c\x1d\x1e\x1f", b"    ")
_PRESIGNED_QUERY_KEYS = ("X-Amz-Algorithm=", "X-Amz-Credential=", "X-Amz-Signature=")
# Every request must sign these (AWS requires Host and X-Amz-Date, with this message).
_REQUIRED_SIGNED_HEADERS = (
    (b"host", "'Host' or ':authority'"),
    (b"x-amz-date", "'X-Amz-Date'"),
)
# A request that sends these must sign them: they choose the operation and the body's parser.
_SIGNED_WHEN_SENT = (
    (b"x-amz-target", "'X-Amz-Target'"),
    (b"content-type", "'Content-Type'"),
)
# Headers whose meaning would be ambiguous if repeated.
_SINGLE_VALUED = (b"authorization", b"x-amz-date", b"x-amz-content-sha256", b"host")
# Within max_skew at most two dates are live; a small bound keeps the cache tiny.
_SIGNING_KEYS_PER_CREDENTIAL = 4


@dataclass(frozen=True, slots=True)
class Credential:
    """A long-term access key and the principal it authenticates."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    principal_arn: str


class _CredentialState:
    """Per-credential precomputed state: the signing-key seed and derived keys by date."""

    __slots__ = ("credential", "seed", "signing_keys")

    def __init__(self, credential: Credential) -> None:
        self.credential = credential
        self.seed = b"AWS4" + credential.secret_access_key.encode("utf-8")
        self.signing_keys: dict[bytes, bytes] = {}


class SigV4Verifier:
    """Verifies SigV4-signed requests against a fixed set of credentials.

    Thread-safe: the only shared mutable state is a small signing-key cache whose
    races can at worst recompute a key.
    """

    def __init__(
        self,
        credentials: Iterable[Credential],
        *,
        region: str,
        service: str = "kms",
        clock: Clock = SystemClock(),  # noqa: B008 - stateless default, as the contract states
        max_skew: timedelta = timedelta(minutes=5),
    ) -> None:
        """Raises ConfigError on an empty region or service, a non-positive skew,
        or two credentials with the same access key id."""
        if not region or not service:
            raise ConfigError("SigV4 region and service must be non-empty")
        if max_skew <= timedelta(0):
            raise ConfigError("SigV4 max_skew must be positive")
        self._by_key_id: dict[bytes, _CredentialState] = {}
        for credential in credentials:
            key_id = credential.access_key_id.encode("utf-8")
            if key_id in self._by_key_id:
                raise ConfigError(f"duplicate access key id {credential.access_key_id!r}")
            self._by_key_id[key_id] = _CredentialState(credential)
        self._region = region.encode("utf-8")
        self._service = service.encode("utf-8")
        self._region_str = region
        self._service_str = service
        self._clock = clock
        self._max_skew = max_skew
        self._skew_text = _describe_skew(max_skew)
        # One-entry cache: under load most requests carry the same X-Amz-Date second.
        # Seeded with a valid pair: an empty X-Amz-Date must not hit the cache.
        self._last_date: tuple[bytes, datetime] = (
            b"19700101T000000Z",
            datetime(1970, 1, 1, tzinfo=UTC),
        )

    def verify(
        self,
        method: str,
        path: str,
        query: str,
        headers: Sequence[tuple[bytes, bytes]] | Mapping[str, str],
        body: bytes,
    ) -> Credential:
        """Return the credential that signed this request, or raise (see module doc).

        ``path`` is the raw request path, still percent-encoded as sent (ASGI
        ``raw_path``); ``query`` the raw query string without ``?``; ``headers``
        either ASGI pairs (lowercase name bytes, value bytes) or a name -> value
        mapping (any case; values as the text the client signed).
        """
        fields, repeated = _index_headers(headers)
        if repeated is not None:
            for name in _SINGLE_VALUED:
                if name in repeated:
                    raise IncompleteSignatureException(
                        f"The '{_text(name)}' header must be sent only once."
                    )
        authorization = fields.get(b"authorization")
        if authorization is None:
            raise _missing_authorization(fields, query)
        credential_value, signed_value, signature = _parse_authorization(authorization)

        amz_date = fields.get(b"x-amz-date")
        if amz_date is None:
            raise IncompleteSignatureException(
                "Authorization header requires existence of a 'X-Amz-Date' header."
            )
        amz_date = amz_date.strip()
        request_time = self._parse_amz_date(amz_date)

        signed_names = sorted({name.lower() for name in signed_value.split(b";")})
        if not signed_names[0]:
            raise IncompleteSignatureException("SignedHeaders contains an empty header name.")
        for name, label in _REQUIRED_SIGNED_HEADERS:
            if name not in signed_names:
                raise InvalidSignatureException(
                    f"{label} must be a 'SignedHeader' in the AWS Authorization."
                )
        for name, label in _SIGNED_WHEN_SENT:
            if name in fields and name not in signed_names:
                raise InvalidSignatureException(
                    f"{label} must be a 'SignedHeader' in the AWS Authorization when it is sent."
                )

        scope = credential_value.split(b"/")
        if len(scope) != 5:
            raise IncompleteSignatureException(
                "Credential must have exactly 5 slash-delimited elements, "
                f"e.g. keyid/date/region/service/term, got '{_text(credential_value)}'."
            )
        key_id, scope_date, scope_region, scope_service, terminator = scope
        self._check_scope(scope_date, scope_region, scope_service, terminator, amz_date)

        if b"x-amz-security-token" in fields:
            # Only long-term keys are configured: no session token can be valid.
            raise UnrecognizedClientException(_UNRECOGNIZED)
        state = self._by_key_id.get(key_id)
        if state is None:
            raise UnrecognizedClientException(_UNRECOGNIZED)
        self._check_skew(request_time)

        canonical_headers = []
        for name in signed_names:
            value = fields.get(name)
            if value is None:
                raise IncompleteSignatureException(
                    f"'{_text(name)}' is named as a SignedHeader, "
                    "but it does not exist in the HTTP request."
                )
            if repeated is not None and name in repeated:
                value = b",".join([_trim(v) for v in repeated[name]])
            else:
                value = _trim(value)
            canonical_headers.append(name + b":" + value + b"\n")

        declared_hash = fields.get(b"x-amz-content-sha256")
        if declared_hash is not None and b"x-amz-content-sha256" not in signed_names:
            raise InvalidSignatureException(
                "'x-amz-content-sha256' must be a 'SignedHeader' when it is sent."
            )
        payload_hash = _payload_hash(declared_hash, body)
        canonical_request = b"\n".join(
            (
                method.upper().encode("ascii", "replace"),
                _canonical_uri(path),
                _canonical_query(query),
                b"".join(canonical_headers),
                b";".join(signed_names),
                payload_hash,
            )
        )
        string_to_sign = b"\n".join(
            (
                _ALGORITHM,
                amz_date,
                credential_value[len(key_id) + 1 :],
                hashlib.sha256(canonical_request).hexdigest().encode("ascii"),
            )
        )
        expected = hmac.digest(self._signing_key(state, scope_date), string_to_sign, "sha256")
        if not hmac.compare_digest(expected.hex().encode("ascii"), signature):
            raise InvalidSignatureException(_MISMATCH)
        return state.credential

    def _parse_amz_date(self, amz_date: bytes) -> datetime:
        last_raw, last_time = self._last_date
        if amz_date == last_raw:
            return last_time
        try:
            if (
                len(amz_date) != 16
                or amz_date[8:9] != b"T"
                or amz_date[15:16] != b"Z"
                or not amz_date[:8].isdigit()
                or not amz_date[9:15].isdigit()
            ):
                raise ValueError(amz_date)
            parsed = datetime(
                int(amz_date[0:4]),
                int(amz_date[4:6]),
                int(amz_date[6:8]),
                int(amz_date[9:11]),
                int(amz_date[11:13]),
                int(amz_date[13:15]),
                tzinfo=UTC,
            )
        except ValueError:
            raise IncompleteSignatureException(
                f"Date must be in ISO-8601 'basic format'. Got '{_text(amz_date)}'. "
                "See http://en.wikipedia.org/wiki/ISO_8601"
            ) from None
        self._last_date = (amz_date, parsed)
        return parsed

    def _check_scope(
        self, date: bytes, region: bytes, service: bytes, terminator: bytes, amz_date: bytes
    ) -> None:
        if region != self._region:
            raise InvalidSignatureException(
                f"Credential should be scoped to a valid region, not '{_text(region)}'."
            )
        if service != self._service:
            raise InvalidSignatureException(
                f"Credential should be scoped to correct service: '{self._service_str}'."
            )
        if terminator != _TERMINATOR:
            raise InvalidSignatureException(
                "Credential should be scoped with a valid terminator: 'aws4_request', "
                f"not '{_text(terminator)}'."
            )
        if date != amz_date[:8]:
            raise InvalidSignatureException(
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of "
                f"date from HTTP: '{_text(date)}' != '{_text(amz_date[:8])}', "
                f"from '{_text(amz_date)}'."
            )

    def _check_skew(self, request_time: datetime) -> None:
        now = self._clock.now()
        if request_time < now - self._max_skew:
            raise InvalidSignatureException(
                f"Signature expired: {request_time.strftime(_TIMESTAMP)} is now earlier than "
                f"{(now - self._max_skew).strftime(_TIMESTAMP)} "
                f"({now.strftime(_TIMESTAMP)} - {self._skew_text})"
            )
        if request_time > now + self._max_skew:
            raise InvalidSignatureException(
                f"Signature not yet current: {request_time.strftime(_TIMESTAMP)} is still later "
                f"than {(now + self._max_skew).strftime(_TIMESTAMP)} "
                f"({now.strftime(_TIMESTAMP)} + {self._skew_text})"
            )

    def _signing_key(self, state: _CredentialState, date: bytes) -> bytes:
        # Only reached after the scope date matched X-Amz-Date and the skew check.
        key = state.signing_keys.get(date)
        if key is None:
            key = hmac.digest(state.seed, date, "sha256")
            key = hmac.digest(key, self._region, "sha256")
            key = hmac.digest(key, self._service, "sha256")
            key = hmac.digest(key, _TERMINATOR, "sha256")
            if len(state.signing_keys) >= _SIGNING_KEYS_PER_CREDENTIAL:
                state.signing_keys.clear()
            state.signing_keys[date] = key
        return key


def _index_headers(
    headers: Sequence[tuple[bytes, bytes]] | Mapping[str, str],
) -> tuple[dict[bytes, bytes], dict[bytes, list[bytes]] | None]:
    """Name -> value, plus (or None) the values of every name sent more than once."""
    if isinstance(headers, Mapping):
        return (
            {
                name.lower().encode("latin-1"): value.encode("utf-8")
                for name, value in headers.items()
            },
            None,
        )
    fields = dict(headers)
    if len(fields) == len(headers):
        return fields, None
    repeated: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        repeated.setdefault(name, []).append(value)
    return fields, {name: values for name, values in repeated.items() if len(values) > 1}


def _parse_authorization(value: bytes) -> tuple[bytes, bytes, bytes]:
    """(Credential, SignedHeaders, Signature) of an Authorization header, or raise Incomplete."""
    algorithm, _, parameters = value.strip().partition(b" ")
    if algorithm != _ALGORITHM:
        raise IncompleteSignatureException(
            f"Unsupported AWS 'algorithm': '{_text(algorithm)}'; only AWS4-HMAC-SHA256 is accepted."
        )
    credential = signed_headers = signature = None
    for item in parameters.split(b","):
        name, equals, parameter = item.strip().partition(b"=")
        if not equals:
            raise IncompleteSignatureException(
                f"'{_text(item.strip())}' not a valid key=value pair (missing equal-sign) "
                "in Authorization header."
            )
        if name == b"Credential":
            credential = parameter
        elif name == b"SignedHeaders":
            signed_headers = parameter
        elif name == b"Signature":
            signature = parameter
    if not credential or not signed_headers or not signature:
        raise IncompleteSignatureException(
            " ".join(
                f"Authorization header requires '{part}' parameter."
                for part, present in (
                    ("Credential", credential),
                    ("Signature", signature),
                    ("SignedHeaders", signed_headers),
                )
                if not present
            )
        )
    return credential, signed_headers, signature


def _missing_authorization(
    fields: Mapping[bytes, bytes], query: str
) -> MissingAuthenticationTokenException | IncompleteSignatureException:
    if query and any(key in query for key in _PRESIGNED_QUERY_KEYS):
        return IncompleteSignatureException(
            "Query-string (presigned) authentication is not supported; "
            "sign the Authorization header."
        )
    if b"x-amz-date" in fields:
        return IncompleteSignatureException(
            "Authorization header requires 'Credential' parameter. "
            "Authorization header requires 'Signature' parameter. "
            "Authorization header requires 'SignedHeaders' parameter."
        )
    return MissingAuthenticationTokenException("Missing Authentication Token")


def _trim(value: bytes) -> bytes:
    """SigV4 Trimall, with botocore's notion of whitespace (str.split on the UTF-8 text)."""
    if value.isascii():
        return b" ".join(value.translate(_ASCII_SEPARATORS_TO_SPACE).split())
    text = value.decode("utf-8", "surrogateescape")
    return " ".join(text.split()).encode("utf-8", "surrogateescape")


def _payload_hash(declared: bytes | None, body: bytes) -> bytes:
    computed = hashlib.sha256(body).hexdigest().encode("ascii")
    if declared is None:
        return computed
    declared = declared.strip()
    if declared == b"UNSIGNED-PAYLOAD" or declared.startswith(b"STREAMING-"):
        raise InvalidSignatureException(
            f"x-amz-content-sha256 '{_text(declared)}' is not accepted: "
            "the request body must be signed."
        )
    if declared.lower() != computed:
        raise InvalidSignatureException(
            "The provided 'x-amz-content-sha256' header does not match what was computed."
        )
    # The canonical request carries the header's own spelling, as the signer used it.
    return declared


def _canonical_uri(path: str) -> bytes:
    if path == "/":
        return b"/"
    return quote(_remove_dot_segments(path) or "/", safe="/~").encode("ascii")


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4, plus removal of empty segments (AWS collapses '//')."""
    if not path:
        return ""
    segments: list[str] = []
    for segment in path.split("/"):
        if not segment or segment == ".":
            continue
        if segment == "..":
            if segments:
                segments.pop()
        else:
            segments.append(segment)
    first = "/" if path[0] == "/" else ""
    last = "/" if path[-1] == "/" and segments else ""
    return first + "/".join(segments) + last


def _canonical_query(query: str) -> bytes:
    if not query:
        return b""
    pairs = []
    for item in query.split("&"):
        name, _, value = item.partition("=")
        pairs.append((_encode_query_component(name), _encode_query_component(value)))
    pairs.sort()
    return "&".join([f"{name}={value}" for name, value in pairs]).encode("ascii")


def _encode_query_component(raw: str) -> str:
    return quote(unquote_to_bytes(raw.replace("+", " ")), safe="-_.~")


def _describe_skew(skew: timedelta) -> str:
    seconds = int(skew.total_seconds())
    return f"{seconds // 60} min." if seconds % 60 == 0 else f"{seconds} sec."


def _text(value: bytes) -> str:
    """Request bytes made printable for an error message."""
    return value.decode("utf-8", "replace")
