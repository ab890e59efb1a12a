"""``serve`` flags (TLS, binding, audit, access log, ephemeral scope) and ``init``'s TLS
certificate and secret-file permissions.

``serve`` is checked where it hands over to the runner (run_server / run_ephemeral
replaced by recorders) or, for refusals, end to end: they happen before binding.
"""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from hsmkeys.cli import main
from hsmkeys.config import ServerSettings, Settings
from hsmkeys.server import runner
from hsmkeys.server.tls import load_server_context
from hsmkeys.testing.plugin import softhsm_module_or_skip

from .conftest import RunCli

CONFIG = """\
hsm:
  module: /nonexistent/libsofthsm2.so
  token_label: t
  pin_env: NO_SUCH_PIN
catalog: var/catalog.db
audit_log: var/audit.log
principals:
  - arn: arn:aws:iam::111122223333:user/admin
    access_key_id: test
    secret_access_key_env: HSMKEYS_TEST_SECRET
"""


def _config(tmp_path: Path, text: str = CONFIG) -> Path:
    path = tmp_path / "hsmkeys.yaml"
    path.write_text(text)
    return path


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append((args, kwargs))


@pytest.fixture
def run_server(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(runner, "run_server", recorder)
    return recorder


@pytest.fixture
def run_ephemeral(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(runner, "run_ephemeral", recorder)
    return recorder


# --- serve: flags reach the runner --------------------------------------------------------


def test_serve_ephemeral_passes_scope_tls_access_log_and_insecure_http(
    tmp_path: Path, run_ephemeral: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [
        "serve", "--ephemeral", "--port", "0", "--region", "eu-west-2", "--account-id", "444455556666",
        "--tls-cert", "cert.pem", "--tls-key", "key.pem", "--access-log", "--insecure-http",
    ]  # fmt: skip
    assert main(argv) == 0
    ((_, kwargs),) = run_ephemeral.calls
    assert (kwargs["region"], kwargs["account_id"], kwargs["insecure_http"]) == ("eu-west-2", "444455556666", True)
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 0)
    cwd = tmp_path.resolve()
    assert kwargs["server"] == ServerSettings("127.0.0.1", 0, cwd / "cert.pem", cwd / "key.pem", True)


def test_serve_ephemeral_leaves_scope_to_the_environment_when_no_flag(run_ephemeral: Recorder) -> None:
    assert main(["serve", "--ephemeral"]) == 0
    ((_, kwargs),) = run_ephemeral.calls
    assert kwargs["region"] is None and kwargs["account_id"] is None  # HSMKEYS_* or defaults, in the runner
    assert kwargs["server"] == ServerSettings()
    assert kwargs["no_audit"] is False


def test_serve_ephemeral_passes_no_audit(run_ephemeral: Recorder) -> None:
    assert main(["serve", "--ephemeral", "--no-audit"]) == 0
    ((_, kwargs),) = run_ephemeral.calls
    assert kwargs["no_audit"] is True


def test_serve_flags_override_the_config_server_section(
    tmp_path: Path, run_server: Recorder
) -> None:
    config = _config(
        tmp_path,
        CONFIG + "server:\n  host: 127.0.0.2\n  port: 8443\n  access_log: true\n"
        "  tls_cert: conf-cert.pem\n  tls_key: conf-key.pem\n",
    )
    assert main(["--config", str(config), "serve", "--port", "9443", "--no-audit", "--workers", "2"]) == 0
    ((args, kwargs),) = run_server.calls
    settings: Settings = args[0]
    base = tmp_path.resolve()
    assert settings.server == ServerSettings("127.0.0.2", 9443, base / "conf-cert.pem", base / "conf-key.pem", True)
    assert kwargs == {"workers": 2, "insecure_http": False, "no_audit": True}


def test_serve_tls_flags_replace_the_configured_pair(tmp_path: Path, run_server: Recorder) -> None:
    config = _config(tmp_path, CONFIG + "server:\n  tls_cert: a.pem\n  tls_key: b.pem\n")
    other = tmp_path / "other"
    argv = ["--config", str(config), "serve", "--tls-cert", str(other / "c.pem"), "--tls-key", str(other / "k.pem")]
    assert main(argv) == 0
    settings: Settings = run_server.calls[0][0][0]
    assert (settings.server.tls_cert, settings.server.tls_key) == (other / "c.pem", other / "k.pem")
    assert not settings.server.access_log


@pytest.mark.parametrize("flag", ["--tls-cert", "--tls-key"])
def test_serve_with_half_a_tls_pair_is_refused(
    tmp_path: Path, run_server: Recorder, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    assert main(["--config", str(_config(tmp_path)), "serve", flag, "x.pem"]) == 2
    assert "give both --tls-cert and --tls-key" in capsys.readouterr().err
    assert not run_server.calls


@pytest.mark.parametrize("flag", [["--region", "eu-west-2"], ["--account-id", "444455556666"]])
def test_serve_scope_flags_without_ephemeral_are_refused(
    tmp_path: Path, run_server: Recorder, capsys: pytest.CaptureFixture[str], flag: list[str]
) -> None:
    assert main(["--config", str(_config(tmp_path)), "serve", *flag]) == 2
    assert "are for --ephemeral" in capsys.readouterr().err
    assert not run_server.calls


# --- serve: refusals, end to end (before anything binds or opens the HSM) ----------------


def test_serve_without_audit_log_is_refused_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HSMKEYS_TEST_SECRET", "s3cret")
    config = _config(tmp_path, CONFIG.replace("audit_log: var/audit.log\n", ""))
    assert main(["--config", str(config), "serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ConfigError: audit_log: not set") and "--no-audit" in err


def test_serve_plain_http_on_all_interfaces_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HSMKEYS_TEST_SECRET", "s3cret")
    assert main(["--config", str(_config(tmp_path)), "serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ConfigError: refusing plain HTTP on 0.0.0.0:0")
    assert "--insecure-http" in err and "--tls-cert" in err


# --- init --self-signed-cert --------------------------------------------------------------


def test_init_self_signed_cert_writes_a_localhost_pair_and_prints_the_ca_bundle(
    tmp_path: Path, cli: RunCli
) -> None:
    done = cli("--config", str(_config(tmp_path)), "init", "--self-signed-cert")
    assert done.code == 0, done.err
    var = tmp_path.resolve() / "var"
    cert, key = var / "tls-cert.pem", var / "tls-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert f"export AWS_CA_BUNDLE={cert}\n" in done.text
    assert f"server: {{tls_cert: {cert}, tls_key: {key}}}" in done.text
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    load_server_context(cert, key)  # a matching pair the server accepts


def test_init_self_signed_cert_writes_where_the_config_points_then_reuses(
    tmp_path: Path, cli: RunCli
) -> None:
    config = _config(tmp_path, CONFIG + "server:\n  tls_cert: tls/c.pem\n  tls_key: tls/k.pem\n")
    first = cli("--config", str(config), "--json", "init", "--self-signed-cert")
    assert first.code == 0, first.err
    cert = tmp_path.resolve() / "tls" / "c.pem"
    assert json.loads(first.text)["ca_bundle"] == str(cert)
    pem = cert.read_bytes()
    again = cli("--config", str(config), "init", "--self-signed-cert")
    assert again.code == 0, again.err
    assert "tls_cert:" not in again.text  # configured: no hint to add it
    assert f"tls cert  reused   {cert}" in again.text
    assert cert.read_bytes() == pem


def test_init_refuses_a_tls_key_others_can_read(tmp_path: Path, cli: RunCli) -> None:
    config = _config(tmp_path)
    assert cli("--config", str(config), "init", "--self-signed-cert").code == 0
    key = tmp_path.resolve() / "var" / "tls-key.pem"
    key.chmod(0o644)
    done = cli("--config", str(config), "init", "--self-signed-cert")
    assert done.code == 2
    assert f"server.tls_key: {key} is accessible by group or others" in done.err
    assert f"chmod 600 {key}" in done.err


def test_init_refuses_half_a_tls_pair(tmp_path: Path, cli: RunCli) -> None:
    config = _config(tmp_path)
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "tls-cert.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    done = cli("--config", str(config), "init", "--self-signed-cert")
    assert done.code == 2 and "tls-key.pem does not" in done.err


def test_init_create_token_refuses_a_pin_file_others_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = softhsm_module_or_skip()
    monkeypatch.setenv("SOFTHSM2_CONF", str(tmp_path / "var" / "softhsm2.conf"))
    config = _config(
        tmp_path,
        f"hsm:\n  module: {module}\n  token_label: perm-test\n  pin_file: var/pin\ncatalog: var/catalog.db\n",
    )
    pin = tmp_path / "var" / "pin"
    pin.parent.mkdir()
    pin.write_text("1234\n")
    pin.chmod(0o644)
    assert main(["--config", str(config), "init", "--create-token"]) == 2
    err = capsys.readouterr().err
    assert f"is accessible by group or others (mode 0644); run: chmod 600 {pin.resolve()}" in err
