"""Settings: the YAML file, HSMKEYS_* overrides, relative paths and field-named errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hsmkeys.config import Settings
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
        ("    access_key_id: AKIAEXAMPLEADMIN1", "    access_key_id: short", "principals[0].access_key_id"),
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
