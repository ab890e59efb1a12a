"""The commands a newcomer reaches for on day one: rotation, tags, policies, grants,
data keys, the aws-CLI-style ``--context``, ``status``'s server check, and help text."""

from __future__ import annotations

import argparse
import base64
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hsmkeys.cli import _parser, main
from hsmkeys.clock import FakeClock
from hsmkeys.keystore import KeyStore

from .conftest import Ran, RunCli

GRANTEE = "arn:aws:iam::111122223333:role/app"


def _error_line(ran: Ran, code: str) -> None:
    assert ran.code == 2, ran
    lines = ran.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {code}: "), ran.err


def _usage_error(ran: Ran, *phrases: str) -> None:
    assert ran.code == 2, ran
    assert "Traceback" not in ran.err and all(p in ran.err for p in phrases), ran.err


# ------------------------------------------------------------------ --context


def test_context_comma_form_is_several_pairs_as_in_the_aws_cli(cli: RunCli, key_id: str) -> None:
    blob = cli("encrypt", "--key-id", key_id, "--context", "a=1,b=2", stdin=b"x").out
    assert cli("decrypt", "--context", "a=1", "--context", "b=2", stdin=blob).out == b"x"
    assert cli("decrypt", "--context", "b=2,a=1", stdin=blob).out == b"x"
    _error_line(cli("decrypt", "--context", "a=1", stdin=blob), "InvalidCiphertextException")


def test_context_json_object_is_accepted(cli: RunCli, key_id: str) -> None:
    blob = cli("encrypt", "--key-id", key_id, "--context", '{"a": "1", "b": "x,y"}', stdin=b"x").out
    assert cli("decrypt", "--context", "a=1", "--context", '{"b": "x,y"}', stdin=blob).out == b"x"


@pytest.mark.parametrize("bad", ["a=1,b", "a=1,,b=2", "=1", "a=1,=2", "novalue"])
def test_malformed_context_pair_is_a_usage_error_naming_it(cli: RunCli, key_id: str, bad: str) -> None:
    _usage_error(cli("encrypt", "--key-id", key_id, "--context", bad, stdin=b"x"), "expected KEY=VALUE", "--context")


def test_context_json_that_is_not_a_string_map_is_a_usage_error(cli: RunCli, key_id: str) -> None:
    _usage_error(cli("encrypt", "--key-id", key_id, "--context", '{"a": 1}', stdin=b"x"), "strings to strings")


def test_context_key_repeated_across_comma_pairs_is_input_error(cli: RunCli, key_id: str) -> None:
    _error_line(cli("encrypt", "--key-id", key_id, "--context", "a=1,a=2", stdin=b"x"), "InputError")


# ------------------------------------------------------------------ rotation


def test_rotation_enable_status_disable(cli: RunCli, key_id: str, clock: FakeClock) -> None:
    assert "rotation disabled" in cli("keys", "rotation", "status", key_id).text
    ran = cli("keys", "rotation", "enable", key_id, "--period-days", "90")
    assert ran.code == 0 and "rotation enabled, every 90 days" in ran.text, ran
    status = json.loads(cli("--json", "keys", "rotation", "status", key_id).out)
    assert status["KeyRotationEnabled"] is True and status["RotationPeriodInDays"] == 90
    assert status["KeyId"].endswith(key_id)
    assert cli("keys", "rotation", "disable", key_id).code == 0
    assert json.loads(cli("--json", "keys", "rotation", "status", key_id).out)["KeyRotationEnabled"] is False


def test_rotation_period_out_of_range_is_validation_error(cli: RunCli, key_id: str) -> None:
    _error_line(cli("keys", "rotation", "enable", key_id, "--period-days", "10"), "ValidationException")


def test_rotation_of_an_hmac_key_is_unsupported(cli: RunCli) -> None:
    key = json.loads(
        cli("--json", "keys", "create", "--key-spec", "HMAC_256", "--key-usage", "GENERATE_VERIFY_MAC").out
    )["KeyMetadata"]["KeyId"]
    _error_line(cli("keys", "rotation", "enable", key), "UnsupportedOperationException")


def test_describe_shows_rotation_status(cli: RunCli, key_id: str) -> None:
    assert "Rotation      disabled" in cli("keys", "describe", key_id).text
    cli("keys", "rotation", "enable", key_id)
    line = next(x for x in cli("keys", "describe", key_id).text.splitlines() if x.startswith("Rotation"))
    assert "enabled, every 365 days, next " in line


def test_describe_of_an_asymmetric_key_has_no_rotation_row(cli: RunCli) -> None:
    key = json.loads(
        cli("--json", "keys", "create", "--key-spec", "ECC_NIST_P256", "--key-usage", "SIGN_VERIFY").out
    )["KeyMetadata"]["KeyId"]
    ran = cli("keys", "describe", key)
    assert ran.code == 0 and "Rotation" not in ran.text


# ------------------------------------------------------------------ tags


def test_tag_list_untag(cli: RunCli, key_id: str) -> None:
    assert cli("keys", "tags", key_id).text.startswith("no tags")
    assert cli("keys", "tag", key_id, "team=pay", "env=prod").code == 0
    assert cli("keys", "tags", key_id).text.splitlines() == ["env=prod", "team=pay"]
    listed = json.loads(cli("--json", "keys", "tags", key_id).out)
    assert {(t["TagKey"], t["TagValue"]) for t in listed["Tags"]} == {("team", "pay"), ("env", "prod")}
    assert cli("keys", "untag", key_id, "env").code == 0
    assert cli("keys", "tags", key_id).text.splitlines() == ["team=pay"]
    assert "Tags          team=pay" in cli("keys", "describe", key_id).text


def test_tag_without_equals_is_a_usage_error(cli: RunCli, key_id: str) -> None:
    _usage_error(cli("keys", "tag", key_id, "team"), "expected KEY=VALUE")


def test_tag_key_given_twice_is_input_error(cli: RunCli, key_id: str) -> None:
    _error_line(cli("keys", "tag", key_id, "a=1", "a=2"), "InputError")


def test_tags_of_an_unknown_key_is_not_found(cli: RunCli) -> None:
    _error_line(cli("keys", "tags", "11111111-2222-3333-4444-555555555555"), "NotFoundException")


# ------------------------------------------------------------------ data keys


def test_data_key_plaintext_decrypts_from_its_blob(cli: RunCli, key_id: str) -> None:
    ran = cli("data-key", "--key-id", key_id, "--context", "app=demo")
    assert ran.code == 0, ran
    rows = dict(line.split(None, 1) for line in ran.text.splitlines())
    plaintext = base64.b64decode(rows["Plaintext"])
    assert len(plaintext) == 32 and rows["KeyId"].endswith(key_id)
    opened = cli("decrypt", "--context", "app=demo", stdin=rows["CiphertextBlob"].encode())
    assert opened.out == plaintext


def test_data_key_aes_128_json_is_the_kms_shape(cli: RunCli, key_id: str) -> None:
    reply = json.loads(cli("--json", "data-key", "--key-id", key_id, "--key-spec", "AES_128").out)
    assert set(reply) == {"CiphertextBlob", "Plaintext", "KeyId", "KeyMaterialId"}
    assert len(base64.b64decode(reply["Plaintext"])) == 16
    described = json.loads(cli("--json", "keys", "describe", key_id).out)["KeyMetadata"]
    assert reply["KeyMaterialId"] == described["CurrentKeyMaterialId"]


def test_data_key_under_an_hmac_key_is_invalid_key_usage(cli: RunCli) -> None:
    key = json.loads(
        cli("--json", "keys", "create", "--key-spec", "HMAC_256", "--key-usage", "GENERATE_VERIFY_MAC").out
    )["KeyMetadata"]["KeyId"]
    _error_line(cli("data-key", "--key-id", key), "InvalidKeyUsageException")


def test_data_key_with_unknown_spec_is_a_usage_error(cli: RunCli, key_id: str) -> None:
    _usage_error(cli("data-key", "--key-id", key_id, "--key-spec", "AES_512"), "invalid choice")


# ------------------------------------------------------------------ key policies


def _policy(account: str = "111122223333", action: str = "kms:*") -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{account}:root"}, "Action": action, "Resource": "*"}
            ],
        }
    )


def test_policy_get_prints_the_default_policy(cli: RunCli, key_id: str) -> None:
    ran = cli("keys", "policy", "get", key_id)
    assert ran.code == 0 and json.loads(ran.out)["Statement"], ran
    assert json.loads(cli("--json", "keys", "policy", "get", key_id).out)["PolicyName"] == "default"


def test_policy_put_from_file_and_stdin(cli: RunCli, key_id: str, tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(_policy(action="kms:Encrypt"))
    assert cli("keys", "policy", "put", key_id, str(path), "--bypass-policy-lockout-safety-check").code == 0
    assert json.loads(cli("keys", "policy", "get", key_id).out)["Statement"][0]["Action"] == "kms:Encrypt"
    assert cli("keys", "policy", "put", key_id, "-", stdin=_policy().encode()).code == 0
    assert json.loads(cli("keys", "policy", "get", key_id).out)["Statement"][0]["Action"] == "kms:*"


def test_policy_put_of_malformed_json_is_malformed_policy_document(cli: RunCli, key_id: str) -> None:
    _error_line(cli("keys", "policy", "put", key_id, "-", stdin=b"{not json"), "MalformedPolicyDocumentException")


def test_policy_put_of_missing_file_is_input_error(cli: RunCli, key_id: str, tmp_path: Path) -> None:
    _error_line(cli("keys", "policy", "put", key_id, str(tmp_path / "absent.json")), "InputError")


# ------------------------------------------------------------------ grants


def test_grants_create_list_revoke(cli: RunCli, key_id: str) -> None:
    assert cli("grants", "list", key_id).text.startswith("no grants")
    made = cli("grants", "create", key_id, "--grantee", GRANTEE, "--operations", "Encrypt,Decrypt", "--name", "app")
    assert made.code == 0, made
    grant_id = dict(line.split(None, 1) for line in made.text.splitlines())["GrantId"]
    listed = cli("grants", "list", key_id).text.splitlines()
    assert listed[0].split() == ["GrantId", "Grantee", "Operations", "Name"]
    assert listed[1].split() == [grant_id, GRANTEE, "Encrypt,Decrypt", "app"]
    grants = json.loads(cli("--json", "grants", "list", key_id).out)["Grants"]
    assert [g["GrantId"] for g in grants] == [grant_id] and grants[0]["Operations"] == ["Encrypt", "Decrypt"]
    assert cli("grants", "revoke", key_id, grant_id).code == 0
    assert json.loads(cli("--json", "grants", "list", key_id).out)["Grants"] == []


def test_grants_create_json_has_id_and_token(cli: RunCli, key_id: str) -> None:
    reply = json.loads(cli("--json", "grants", "create", key_id, "--grantee", GRANTEE, "--operations", "Encrypt").out)
    assert set(reply) == {"GrantId", "GrantToken"}


def test_grant_of_an_unknown_operation_is_validation_error(cli: RunCli, key_id: str) -> None:
    _error_line(cli("grants", "create", key_id, "--grantee", GRANTEE, "--operations", "Encrypt,Fly"), "ValidationException")


def test_grant_operations_with_an_empty_name_is_a_usage_error(cli: RunCli, key_id: str) -> None:
    _usage_error(cli("grants", "create", key_id, "--grantee", GRANTEE, "--operations", "Encrypt,"), "--operations")


def test_revoking_an_unknown_grant_is_not_found(cli: RunCli, key_id: str) -> None:
    ran = cli("grants", "revoke", key_id, "0" * 64)
    assert ran.code == 2 and ran.err.startswith("error: ") and "Traceback" not in ran.err, ran


# ------------------------------------------------------------------ status and config


@pytest.fixture
def healthz_server() -> Iterator[str]:
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b'{"status":"ok"}')

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_status_says_the_server_answers(cli: RunCli, healthz_server: str) -> None:
    ran = cli("status", "--endpoint", healthz_server)
    line = next(x for x in ran.text.splitlines() if x.startswith("server"))
    assert f"{healthz_server} answers (GET /healthz 200)" in line
    server = json.loads(cli("--json", "status", "--endpoint", healthz_server).out)["server"]
    assert server == {"url": healthz_server, "state": "up", "detail": "answers (GET /healthz 200)"}


def test_status_says_no_server_answers_and_how_to_start_one(cli: RunCli) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    ran = cli("status", "--endpoint", url)
    assert ran.code == 0, ran
    line = next(x for x in ran.text.splitlines() if x.startswith("server"))
    assert "not answering" in line and "hsmkeys serve" in line
    assert json.loads(cli("--json", "status", "--endpoint", url).out)["server"]["state"] == "down"


def test_status_checks_the_configured_address(
    store: KeyStore, tmp_path: Path, capsys: pytest.CaptureFixture[str], healthz_server: str
) -> None:
    import contextlib

    port = healthz_server.rsplit(":", 1)[1]
    config = tmp_path / "hsmkeys.yaml"
    config.write_text(
        "hsm:\n  module: /usr/lib/softhsm/libsofthsm2.so\n  token_label: t\n  pin_env: PIN\n"
        f"catalog: catalog.db\nserver:\n  host: 0.0.0.0\n  port: {port}\n"
    )
    code = main(["--config", str(config), "--json", "status"], open_store=lambda: contextlib.nullcontext(store))
    assert code == 0
    assert json.loads(capsys.readouterr().out)["server"]["url"] == f"http://127.0.0.1:{port}"


def test_missing_config_suggests_the_config_flag_and_env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HSMKEYS_CONFIG", raising=False)
    assert main(["keys", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ConfigError: config file hsmkeys.yaml not found") and err.count("\n") == 1
    assert "--config" in err and "HSMKEYS_CONFIG" in err


# ------------------------------------------------------------------ help


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield f"{path} {choice.dest}", choice
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_command_and_option_has_help_text() -> None:
    walked = list(_walk(_parser(), "hsmkeys"))
    assert len(walked) > 100  # the walk reached the sub-commands
    missing = [f"{path}: {action.option_strings or action.dest}" for path, action in walked if not action.help]
    assert missing == []
