"""The installed ``hsmkeys`` console script against a throwaway SoftHSM2 token.

Each child process gets SOFTHSM2_CONF in its own environment only; the token, PINs
and catalog live in a temp dir (never var/ or the system token directory).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from hsmkeys.testing.plugin import softhsm_module_or_skip

pytestmark = pytest.mark.hsm

ACCESS_KEY_ID = "AKIAHSMKEYSCLITEST01"


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "hsmkeys"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "hsmkeys"]


@dataclass(frozen=True)
class Done:
    code: int
    out: bytes
    err: str


@dataclass(frozen=True)
class Project:
    root: Path
    config: Path
    env: Mapping[str, str]

    def run(self, *argv: str, stdin: bytes = b"", config: Path | None = None) -> Done:
        done = subprocess.run(
            [*_console_script(), "--config", str(config or self.config), *argv],
            input=stdin,
            capture_output=True,
            env=dict(self.env),
            cwd=self.root,
            timeout=60,
            check=False,
        )
        return Done(done.returncode, done.stdout, done.stderr.decode("utf-8", "replace"))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A config in a temp dir, initialised once with ``init --create-token``."""
    module = Path(softhsm_module_or_skip())
    root = tmp_path_factory.mktemp("cli-softhsm")
    config = root / "hsmkeys.yaml"
    config.write_text(
        "hsm:\n"
        f"  module: {module}\n"
        "  token_label: hsmkeys-cli-test\n"
        "  pin_file: var/pin\n"
        "catalog: var/catalog.db\n"
        "audit_log: var/audit.log\n"
        "principals:\n"
        "  - arn: arn:aws:iam::111122223333:user/admin\n"
        f"    access_key_id: {ACCESS_KEY_ID}\n"
        "    secret_access_key_file: var/admin.secret\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSMKEYS_") and k != "SOFTHSM2_CONF"}
    env["SOFTHSM2_CONF"] = str(root / "var" / "softhsm2.conf")
    project = Project(root, config, env)
    first = project.run("init", "--create-token")
    assert first.code == 0, first
    assert b"created" in first.out
    return project


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_create_token_twice_reuses_everything(project: Project) -> None:
    var = project.root / "var"
    pin = (var / "pin").read_text()
    again = project.run("init", "--create-token")
    assert again.code == 0, again
    assert b"created" not in again.out and b"reused everything" in again.out
    assert (var / "pin").read_text() == pin
    for name in ("pin", "pin.so", "admin.secret", "credentials"):
        assert _mode(var / name) == 0o600, name
    secret = (var / "admin.secret").read_text().strip()
    assert len(secret) == 40
    credentials = (var / "credentials").read_text()
    assert "[default]" in credentials and f"aws_access_key_id = {ACCESS_KEY_ID}" in credentials
    assert f"aws_secret_access_key = {secret}" in credentials
    printed = again.out.decode() + again.err
    for value in (pin.strip(), (var / "pin.so").read_text().strip(), secret):
        assert value not in printed
    assert str(var / "credentials") in printed


def test_keys_create_json_is_kms_shape(project: Project) -> None:
    done = project.run("keys", "create", "--description", "cli", "--json")
    assert done.code == 0, done
    md = json.loads(done.out)["KeyMetadata"]
    assert md["Arn"] == f"arn:aws:kms:us-east-1:111122223333:key/{md['KeyId']}"
    assert md["KeyState"] == "Enabled" and md["KeySpec"] == "SYMMETRIC_DEFAULT"
    assert isinstance(md["CreationDate"], float)


def test_encrypt_decrypt_round_trip_with_context_and_wrong_context(project: Project) -> None:
    key_id = json.loads(project.run("--json", "keys", "create").out)["KeyMetadata"]["KeyId"]
    plaintext = b"\x00secret\xff"
    enc = project.run("encrypt", "--key-id", key_id, "--context", "app=cli", stdin=plaintext)
    assert enc.code == 0, enc
    dec = project.run("decrypt", "--context", "app=cli", stdin=enc.out)
    assert (dec.code, dec.out) == (0, plaintext), dec
    wrong = project.run("decrypt", "--context", "app=other", stdin=enc.out)
    assert wrong.code == 2 and wrong.out == b""
    assert wrong.err.startswith("error: InvalidCiphertextException:") and wrong.err.count("\n") == 1


def test_doctor_and_audit_verify_pass(project: Project) -> None:
    doctor = project.run("doctor")
    assert doctor.code == 0, doctor
    audit = project.run("audit", "verify", str(project.root / "var" / "audit.log"))
    assert audit.code == 0 and audit.out.startswith(b"intact:"), audit


def test_bad_config_field_exits_2_naming_the_field(project: Project) -> None:
    bad = project.root / "bad.yaml"
    bad.write_text(project.config.read_text().replace("catalog:", "account_id: '12'\ncatalog:"))
    done = project.run("status", config=bad)
    assert done.code == 2 and done.err.startswith("error: ConfigError: account_id:"), done
    assert "Traceback" not in done.err
