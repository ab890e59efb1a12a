"""Settings: the YAML file, HSMKEYS_* overrides, relative paths and field-named errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from hsmkeys.config import ServerSettings, Settings
from hsmkeys.errors import ConfigError

GOOD = """\
hsm:
  module: /usr/lib/softhsm/libsofthsm2.so
  token_label: hsmkeys
  pin_file: var/pin
catalog: var/catalog.db
region: eu-west-1
account_id: "123456789012"
audit_log: var/audit.log
maintenance_interval_seconds: 30
principals:
  - arn: arn:aws:iam::123456789012:user/admin
    access_key_id: AKIAEXAMPLEADMIN1
    secret_access_key_env: ADMIN_SECRET
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "hsmkeys.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_loads_fields_and_resolves_paths_relative_to_the_file(tmp_path: Path) -> None:
    s = Settings.load(write(tmp_path, GOOD), env={})
    base = (tmp_path / "conf").resolve()
    assert s.hsm.module == "/usr/lib/softhsm/libsofthsm2.so"
    assert s.hsm.token_label == "hsmkeys"
    assert s.hsm.pin_file == base / "var/pin"
    assert s.catalog == base / "var/catalog.db"
    assert s.audit_log == base / "var/audit.log"
    assert (s.region, s.account_id, s.maintenance_interval_seconds) == ("eu-west-1", "123456789012", 30.0)
    assert s.principals[0].arn == "arn:aws:iam::123456789012:user/admin"
    assert s.principals[0].secret_access_key({"ADMIN_SECRET": "s3cret"}) == "s3cret"
    assert s.config_path == base / "hsmkeys.yaml"


def test_path_comes_from_hsmkeys_config_env_when_not_given(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    assert Settings.load(env={"HSMKEYS_CONFIG": str(path)}).region == "eu-west-1"


def test_env_overrides_every_scalar_field(tmp_path: Path) -> None:
    env = {
        "HSMKEYS_HSM_MODULE": "/opt/vendor/pkcs11.so",
        "HSMKEYS_HSM_TOKEN_LABEL": "other",
        "HSMKEYS_REGION": "us-west-2",
        "HSMKEYS_ACCOUNT_ID": "999988887777",
        "HSMKEYS_CATALOG": "/tmp/x.db",
        "HSMKEYS_MAINTENANCE_INTERVAL_SECONDS": "5",
    }
    s = Settings.load(write(tmp_path, GOOD), env=env)
    assert s.hsm.module == "/opt/vendor/pkcs11.so"
    assert s.hsm.token_label == "other"
    assert (s.region, s.account_id) == ("us-west-2", "999988887777")
    assert s.catalog == Path("/tmp/x.db")
    assert s.maintenance_interval_seconds == 5.0


def test_pin_from_env_and_from_file(tmp_path: Path) -> None:
    s = Settings.load(write(tmp_path, GOOD), env={})
    assert s.hsm.pin_file is not None
    s.hsm.pin_file.parent.mkdir(parents=True)
    s.hsm.pin_file.write_text("1234\n")
    s.hsm.pin_file.chmod(0o600)
    assert s.hsm.pin() == "1234"
    text = GOOD.replace("pin_file: var/pin", "pin_env: MY_PIN")
    s2 = Settings.load(write(tmp_path, text), env={})
    assert s2.hsm.pin({"MY_PIN": "9876"}) == "9876"
    with pytest.raises(ConfigError, match=r"hsm\.pin_env: environment variable MY_PIN"):
        s2.hsm.pin({})


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("  module: /usr/lib/softhsm/libsofthsm2.so\n", "", "hsm.module"),
        ("  token_label: hsmkeys\n", "", "hsm.token_label"),
        ("  token_label: hsmkeys\n", "  token_label: " + "x" * 33 + "\n", "hsm.token_label"),
        ("  pin_file: var/pin\n", "", "hsm: give exactly one of pin_env or pin_file"),
        ("  pin_file: var/pin\n", "  pin_file: var/pin\n  pin_env: P\n", "hsm: give exactly one"),
        ("  pin_file: var/pin\n", "  pin: '1234'\n", "hsm.pin: unknown field"),
        ("catalog: var/catalog.db\n", "", "catalog: required"),
        ('account_id: "123456789012"', "account_id: 12345", "account_id"),
        ("region: eu-west-1", "region: Europe", "region"),
        ("maintenance_interval_seconds: 30", "maintenance_interval_seconds: soon", "maintenance_interval_seconds"),
        ("maintenance_interval_seconds: 30", "maintenance_interval_seconds: 0", "maintenance_interval_seconds"),
        ("region: eu-west-1", "regoin: eu-west-1", "regoin: unknown field"),
        ("    access_key_id: AKIAEXAMPLEADMIN1", "    access_key_id: not-a-key", "principals[0].access_key_id"),
        ("    access_key_id: AKIAEXAMPLEADMIN1", "    access_key_id: " + "A" * 129, "principals[0].access_key_id"),
        ("    access_key_id: AKIAEXAMPLEADMIN1", "    access_key_id: ''", "principals[0].access_key_id"),
        ("    access_key_id: AKIAEXAMPLEADMIN1", "    access_key_id: clé", "principals[0].access_key_id"),
        ("  - arn: arn:aws:iam::123456789012:user/admin", "  - arn: admin", "principals[0].arn"),
        ("    secret_access_key_env: ADMIN_SECRET\n", "", "principals[0]: give exactly one"),
    ],
)
def test_bad_or_missing_field_is_one_error_naming_it(tmp_path: Path, old: str, new: str, field: str) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        Settings.load(write(tmp_path, GOOD.replace(old, new)), env={})


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file"):
        Settings.load(tmp_path / "nope.yaml", env={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        Settings.load(write(tmp_path, "hsm: [unclosed"), env={})
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        Settings.load(write(tmp_path, "- a\n- b\n"), env={})


def test_duplicate_access_key_is_rejected(tmp_path: Path) -> None:
    text = GOOD + (
        "  - arn: arn:aws:iam::123456789012:user/other\n"
        "    access_key_id: AKIAEXAMPLEADMIN1\n"
        "    secret_access_key_env: OTHER\n"
    )
    with pytest.raises(ConfigError, match=r"principals\[1\].access_key_id: AKIAEXAMPLEADMIN1 is listed twice"):
        Settings.load(write(tmp_path, text), env={})


def test_repo_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    repo_config = Path(__file__).resolve().parents[2] / "hsmkeys.yaml"
    s = Settings.load(repo_config, env={})
    assert s.hsm.pin_file == repo_config.parent / "var" / "pin"
    assert len(s.principals) == 1


def test_softhsm2_conf_is_exported_only_when_the_environment_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = GOOD.replace("  pin_file: var/pin\n", "  pin_file: var/pin\n  softhsm2_conf: var/softhsm2.conf\n")
    s = Settings.load(write(tmp_path, text), env={})
    assert s.hsm.softhsm2_conf == (tmp_path / "conf" / "var" / "softhsm2.conf").resolve()
    monkeypatch.setenv("SOFTHSM2_CONF", "/elsewhere/softhsm2.conf")
    s.hsm.apply_softhsm2_conf()
    assert os.environ["SOFTHSM2_CONF"] == "/elsewhere/softhsm2.conf"
    monkeypatch.delenv("SOFTHSM2_CONF")
    s.hsm.apply_softhsm2_conf()
    assert os.environ["SOFTHSM2_CONF"] == str(s.hsm.softhsm2_conf)


# --- access key ids -----------------------------------------------------------------------


@pytest.mark.parametrize("key_id", ["test", "a", "AKIAEXAMPLEADMIN1", "local_dev_2", "x" * 128])
def test_access_key_id_may_be_any_1_to_128_word_characters(tmp_path: Path, key_id: str) -> None:
    text = GOOD.replace("access_key_id: AKIAEXAMPLEADMIN1", f"access_key_id: {key_id}")
    assert Settings.load(write(tmp_path, text), env={}).principals[0].access_key_id == key_id


def test_access_key_id_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace("access_key_id: AKIAEXAMPLEADMIN1", 'access_key_id: "test\\n"')
    with pytest.raises(ConfigError, match=r"principals\[0\]\.access_key_id"):
        Settings.load(write(tmp_path, text), env={})


# --- identity policies --------------------------------------------------------------------

ARN = "arn:aws:iam::123456789012:user/admin"
POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*"}],
}
CANONICAL = json.dumps(POLICY, sort_keys=True, separators=(",", ":"))
INLINE = """\
    policy:
      Version: 2012-10-17
      Statement:
        - Effect: Allow
          Action: [kms:Encrypt, kms:Decrypt]
          Resource: "*"
"""


def test_principal_without_a_policy_has_none(tmp_path: Path) -> None:
    assert Settings.load(write(tmp_path, GOOD), env={}).principals[0].policy is None


def test_inline_policy_is_kept_as_canonical_json_with_an_unquoted_version(tmp_path: Path) -> None:
    s = Settings.load(write(tmp_path, GOOD + INLINE), env={})
    assert s.principals[0].policy == CANONICAL


def test_policy_file_is_read_relative_to_the_config_and_canonicalised(tmp_path: Path) -> None:
    config = write(tmp_path, GOOD + "    policy_file: policies/admin.json\n")
    (config.parent / "policies").mkdir()
    (config.parent / "policies" / "admin.json").write_text(json.dumps(POLICY, indent=4))
    assert Settings.load(config, env={}).principals[0].policy == CANONICAL


def test_policy_and_policy_file_together_are_refused(tmp_path: Path) -> None:
    text = GOOD + INLINE + "    policy_file: admin.json\n"
    with pytest.raises(ConfigError, match=r"principals\[0\] \(arn:aws:iam::123456789012:user/admin\): "
                       "give policy or policy_file, not both"):
        Settings.load(write(tmp_path, text), env={})


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        ({"Version": "2012-10-17", "Statement": []}, "Statement"),
        ({"Version": "2012-10-17", "Statement": [{"Effect": "Maybe", "Action": "kms:*", "Resource": "*"}]},
         "Effect"),
        ({"Version": "2012-10-17", "Statment": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]},
         "Statment"),
    ],
)
def test_malformed_policy_is_one_config_error_naming_the_principal_and_problem(
    tmp_path: Path, policy: dict[str, object], problem: str
) -> None:
    config = write(tmp_path, GOOD + "    policy_file: admin.json\n")
    (config.parent / "admin.json").write_text(json.dumps(policy))
    with pytest.raises(ConfigError) as caught:
        Settings.load(config, env={})
    message = str(caught.value)
    assert message.startswith(f"principals[0].policy_file ({ARN}): ")
    assert problem in message


def test_malformed_inline_policy_names_the_policy_field(tmp_path: Path) -> None:
    text = GOOD + "    policy:\n      Statement: nothing\n"
    with pytest.raises(ConfigError, match=rf"^principals\[0\]\.policy \({ARN}\): .*Statement"):
        Settings.load(write(tmp_path, text), env={})


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("    policy: [not, a, mapping]\n", "must be a mapping"),
        ("    policy_file: missing.json\n", "cannot read"),
        ("    policy_file: broken.json\n", "not valid JSON"),
    ],
)
def test_unusable_policy_source_is_a_config_error(tmp_path: Path, extra: str, problem: str) -> None:
    config = write(tmp_path, GOOD + extra)
    (config.parent / "broken.json").write_text('{"Version": ')
    with pytest.raises(ConfigError, match=rf"principals\[0\]\.policy.* \({ARN}\): .*{problem}"):
        Settings.load(config, env={})


# --- secret file permissions --------------------------------------------------------------


def _secret_config(tmp_path: Path, mode: int) -> tuple[Settings, Path, Path]:
    text = GOOD.replace("    secret_access_key_env: ADMIN_SECRET", "    secret_access_key_file: var/admin.secret")
    config = write(tmp_path, text)
    var = config.parent / "var"
    var.mkdir()
    pin, secret = var / "pin", var / "admin.secret"
    for path, value in ((pin, "1234\n"), (secret, "s3cret\n")):
        path.write_text(value)
        path.chmod(mode)
    return Settings.load(config, env={}), pin, secret


def test_owner_only_secret_files_are_read(tmp_path: Path) -> None:
    settings, _, _ = _secret_config(tmp_path, 0o600)
    assert settings.hsm.pin() == "1234"
    assert settings.principals[0].secret_access_key() == "s3cret"
    (tmp_path / "readonly").mkdir()
    settings, _, _ = _secret_config(tmp_path / "readonly", 0o400)
    assert settings.hsm.pin() == "1234"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666, 0o620])
def test_secret_files_group_or_others_can_access_are_refused(tmp_path: Path, mode: int) -> None:
    settings, pin, secret = _secret_config(tmp_path, mode)
    with pytest.raises(ConfigError, match=rf"hsm\.pin_file: {pin} is accessible by group or others "
                       rf"\(mode {mode:04o}\); run: chmod 600 {pin}"):
        settings.hsm.pin()
    with pytest.raises(ConfigError, match=rf"principals\[AKIAEXAMPLEADMIN1\]\.secret_access_key: {secret} "
                       r"is accessible by group or others .*chmod 600"):
        settings.principals[0].secret_access_key()
    assert stat.S_IMODE(pin.stat().st_mode) == mode  # refused, not "fixed" behind the user's back


# --- the server section -------------------------------------------------------------------


def test_server_section_defaults_to_loopback_plain_http_without_access_log(tmp_path: Path) -> None:
    assert Settings.load(write(tmp_path, GOOD), env={}).server == ServerSettings(
        host="127.0.0.1", port=7300, tls_cert=None, tls_key=None, access_log=False
    )


def test_server_section_is_read_with_paths_relative_to_the_config(tmp_path: Path) -> None:
    text = GOOD + (
        "server:\n  host: 0.0.0.0\n  port: 8443\n  tls_cert: var/tls-cert.pem\n"
        "  tls_key: var/tls-key.pem\n  access_log: true\n"
    )
    server = Settings.load(write(tmp_path, text), env={}).server
    base = (tmp_path / "conf").resolve()
    assert server == ServerSettings("0.0.0.0", 8443, base / "var/tls-cert.pem", base / "var/tls-key.pem", True)
    assert server.tls


def test_server_fields_are_overridden_by_hsmkeys_server_env(tmp_path: Path) -> None:
    env = {
        "HSMKEYS_SERVER_HOST": "::1",
        "HSMKEYS_SERVER_PORT": "9000",
        "HSMKEYS_SERVER_TLS_CERT": "/etc/hsmkeys/cert.pem",
        "HSMKEYS_SERVER_TLS_KEY": "/etc/hsmkeys/key.pem",
        "HSMKEYS_SERVER_ACCESS_LOG": "yes",
    }
    server = Settings.load(write(tmp_path, GOOD + "server:\n  port: 8443\n"), env=env).server
    assert server == ServerSettings(
        "::1", 9000, Path("/etc/hsmkeys/cert.pem"), Path("/etc/hsmkeys/key.pem"), True
    )


@pytest.mark.parametrize(
    ("server", "env", "field"),
    [
        ("server:\n  tls_cert: cert.pem\n", {}, "server: give both tls_cert and tls_key"),
        ("server:\n  tls_key: key.pem\n", {}, "server: give both tls_cert and tls_key"),
        ("server:\n  port: 70000\n", {}, "server.port: must be 0-65535"),
        ("server:\n  port: -1\n", {}, "server.port: must be 0-65535"),
        ("server:\n  port: http\n", {}, "server.port: must be an integer"),
        ("server:\n  port: 7300.5\n", {}, "server.port: must be an integer"),
        ("", {"HSMKEYS_SERVER_PORT": "eighty"}, "server.port: must be an integer"),
        ("server:\n  access_log: sometimes\n", {}, "server.access_log: must be true or false"),
        ("", {"HSMKEYS_SERVER_ACCESS_LOG": "maybe"}, "server.access_log: must be true or false"),
        ("server:\n  tls: true\n", {}, "server.tls: unknown field"),
        ("server: [a]\n", {}, "server: must be a mapping"),
    ],
)
def test_bad_server_field_is_one_error_naming_it(
    tmp_path: Path, server: str, env: dict[str, str], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        Settings.load(write(tmp_path, GOOD + server), env=env)
