"""Hostile input: hypothesis-built requests for every operation the server serves
(random, missing, mistyped, oversized, unicode-heavy and surrogate fields; random
bytes as ciphertexts, signatures and import tokens; random headers and bodies) get
no 5xx, and every refusal is a KMS-named 4xx. The CLI's argument parsing, fed the
same, answers with a message and an exit status, never a traceback."""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import io
import json
import sys
from typing import Any

import botocore.session
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsmkeys import cli
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.clock import FakeClock
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.keystore import KeyStore
from hsmkeys.testing.server import EphemeralKms

from .harness import kms_call, send, sign, soak_number

MODEL = botocore.session.get_session().get_service_model("kms")
KMS_ERRORS = {name for name in MODEL.shape_names if MODEL.shape_for(name).metadata.get("exception")} | {
    "SerializationException",
    "ValidationException",
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "IncompleteSignatureException",
    "MissingAuthenticationTokenException",
    "UnknownOperationException",
    "UnsupportedOperationException",
}
EXAMPLES = 6  # per operation in make test; make soak: HSMKEYS_FUZZ_EXAMPLES (default 150)
SEEN: collections.Counter[str] = collections.Counter()

text = st.text(st.characters(blacklist_categories=()), max_size=40)  # includes lone surrogates
big_text = st.builds(lambda c, n: c * n, st.characters(blacklist_categories=()), st.integers(1, 70000))
json_any = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=8,
)
blob = st.binary(max_size=600).map(lambda b: base64.b64encode(b).decode())


def _typed(shape: Any, ids: list[str], depth: int = 0) -> st.SearchStrategy[Any]:
    kind = shape.type_name
    if kind == "string":
        return st.sampled_from(ids) | text | (big_text if depth == 0 else text) | st.sampled_from(shape.enum or ["x"])
    if kind == "blob":
        return blob | text
    if kind in ("integer", "long"):
        return st.integers(-(2**40), 2**40)
    if kind == "boolean":
        return st.booleans()
    if kind == "timestamp":
        return st.floats(-1e12, 1e12) | text
    if depth > 2:
        return json_any
    if kind == "list":
        return st.lists(_typed(shape.member, ids, depth + 1), max_size=4)
    if kind == "map":
        return st.dictionaries(text, text, max_size=4)
    members = {n: _typed(m, ids, depth + 1) | json_any for n, m in shape.members.items()}
    return st.fixed_dictionaries({}, optional=members)


def _assert_kms_answer(status: int, body: bytes, what: str) -> None:
    assert status < 500, f"{what}: {status} {body[:300]!r}"
    if status >= 400:
        code = json.loads(body).get("__type")
        assert code in KMS_ERRORS, f"{what}: {status} {code}"
        SEEN[code] += 1


@pytest.fixture(scope="module")
def key_ids(kms: EphemeralKms) -> list[str]:
    made = [kms_call(kms, "CreateKey", spec) for spec in ({}, {"KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY"},
                                                          {"KeySpec": "HMAC_256", "KeyUsage": "GENERATE_VERIFY_MAC"},
                                                          {"Origin": "EXTERNAL"})]
    return [reply.json()["KeyMetadata"]["KeyId"] for reply in made]


@pytest.mark.server
@pytest.mark.parametrize("operation", MODEL.operation_names)
def test_every_operation_answers_hostile_members_with_kms_4xx(kms: EphemeralKms, key_ids: list[str], operation: str) -> None:
    _fuzz_operation(kms, key_ids, operation, EXAMPLES)


@pytest.mark.soak
@pytest.mark.server
def test_every_operation_soak(kms: EphemeralKms, key_ids: list[str]) -> None:
    examples = int(soak_number("FUZZ_EXAMPLES", 150, 150))
    for operation in MODEL.operation_names:
        _fuzz_operation(kms, key_ids, operation, examples)
    print(f"\nhostile input soak: {examples} examples x {len(MODEL.operation_names)} operations; {dict(SEEN)}")


def _fuzz_operation(kms: EphemeralKms, key_ids: list[str], operation: str, examples: int) -> None:
    shape = MODEL.operation_model(operation).input_shape
    members = _typed(shape, key_ids) if shape is not None else st.just({})

    @settings(max_examples=examples, suppress_health_check=list(HealthCheck), database=None)
    @given(document=members | st.dictionaries(text, json_any, max_size=5))
    def check(document: dict[str, Any]) -> None:
        reply = kms_call(kms, operation, json.dumps(document).encode())
        _assert_kms_answer(reply.status, reply.body, operation)

    check()


@pytest.mark.server
def test_random_bodies_and_headers_are_kms_4xx(kms: EphemeralKms) -> None:
    names = st.sampled_from(["X-Amz-Target", "Content-Type", "X-Amz-Date", "Authorization", "amz-sdk-invocation-id", "X-Other"])
    header_value = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)

    @settings(max_examples=EXAMPLES * 10, suppress_health_check=list(HealthCheck), database=None)
    @given(
        body=st.binary(max_size=2000),
        target=st.sampled_from([f"TrentService.{n}" for n in MODEL.operation_names]) | header_value,
        extra=st.dictionaries(names, header_value, max_size=3),
        signed=st.booleans(),
    )
    def check(body: bytes, target: str, extra: dict[str, str], signed: bool) -> None:
        headers = sign(kms, target, body, extra if not signed else None) if signed else {"X-Amz-Target": target, **extra}
        reply = send(kms, "POST", "/", body, headers)
        _assert_kms_answer(reply.status, reply.body, f"raw {target}")

    check()
    print(f"\nhostile input: {EXAMPLES} examples x {len(MODEL.operation_names)} operations, "
          f"{EXAMPLES * 10} raw; refusals by code: {dict(SEEN)}")


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], list[str]]]:
    found: list[tuple[tuple[str, ...], list[str]]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _subcommands(sub, (*prefix, name))
    options = [o for a in parser._actions for o in a.option_strings]
    return found or [(prefix, options)]


# Commands that start servers, make tokens or touch files outside the test are not run.
_SKIPPED = {"serve", "init", "softhsm", "maintain", "audit", "provision", "encrypt-file", "decrypt-file"}
COMMANDS = [(path, opts) for path, opts in _subcommands(cli._parser()) if not _SKIPPED & set(path)]


def _store() -> KeyStore:
    return KeyStore(hsm=MemoryHsm(), catalog=SqliteCatalog(":memory:"), clock=FakeClock())


@pytest.mark.parametrize(("path", "options"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_cli_arguments_get_a_message_never_a_traceback(path: tuple[str, ...], options: list[str]) -> None:
    token = st.sampled_from([*options, "--", "-", "alias/x", "00000000-0000-0000-0000-000000000001"]) | text.filter(
        lambda t: "\x00" not in t
    )

    @settings(max_examples=EXAMPLES * 2, suppress_health_check=list(HealthCheck), database=None)
    @given(argv=st.lists(token, max_size=6))
    def check(argv: list[str]) -> None:
        err, out = io.StringIO(), io.StringIO()
        stdin = sys.stdin
        sys.stdin = io.TextIOWrapper(io.BytesIO(b"random stdin \xff\x00"))  # commands that read input
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                status = cli.main([*path, *argv], open_store=_store)
        finally:
            sys.stdin = stdin
        assert status in (0, 1, 2), status
        assert "Traceback" not in err.getvalue()
        if status == 2:
            assert err.getvalue().strip(), "an error exit needs a message"

    check()
