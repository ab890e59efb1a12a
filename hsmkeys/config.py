"""Settings: one YAML file plus ``HSMKEYS_*`` environment overrides, checked once.

The file is ``--config``, else ``$HSMKEYS_CONFIG``, else ``./hsmkeys.yaml``. Relative
paths in it are relative to the file. Every scalar field can be overridden by an
environment variable named after its path: ``HSMKEYS_HSM_MODULE``,
``HSMKEYS_HSM_TOKEN_LABEL``, ``HSMKEYS_HSM_PIN_ENV``, ``HSMKEYS_HSM_PIN_FILE``,
``HSMKEYS_HSM_SOFTHSM2_CONF``,
``HSMKEYS_CATALOG``, ``HSMKEYS_REGION``, ``HSMKEYS_ACCOUNT_ID``, ``HSMKEYS_AUDIT_LOG``,
``HSMKEYS_MAINTENANCE_INTERVAL_SECONDS`` (relative paths from the environment are
relative to the working directory).

A PIN is never in the YAML, argv or logs: ``hsm.pin_env`` names an environment
variable holding it, or ``hsm.pin_file`` a file. Every problem is one
:class:`~hsmkeys.errors.ConfigError` whose message names the field.
"""

from __future__ import annotations

import os
import re
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hsmkeys.errors import ConfigError

DEFAULT_CONFIG = "hsmkeys.yaml"
ENV_PREFIX = "HSMKEYS_"
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_ACCOUNT = re.compile(r"^\d{12}$")
_PRINCIPAL_ARN = re.compile(r"^arn:aws:iam::\d{12}:(user|role)/[\w+=,.@/-]+$|^arn:aws:iam::\d{12}:root$")
_ACCESS_KEY_ID = re.compile(r"^[A-Z0-9]{16,128}$")
_TOP_LEVEL = {
    "hsm",
    "catalog",
    "region",
    "account_id",
    "audit_log",
    "maintenance_interval_seconds",
    "principals",
}
_HSM_FIELDS = {"module", "token_label", "pin_env", "pin_file", "softhsm2_conf"}
_PRINCIPAL_FIELDS = {"arn", "access_key_id", "secret_access_key_env", "secret_access_key_file"}


_KEY_ID_ALPHABET = string.ascii_uppercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits


def new_access_key_id() -> str:
    """A random access key id shaped like AWS's: AKIA and 16 upper-case letters or digits."""
    return "AKIA" + "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(16))


def new_secret_access_key() -> str:
    """A random 40-character secret, as long as an AWS secret access key."""
    return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40))


def _read_secret(field_name: str, env_name: str | None, file: Path | None, env: Mapping[str, str]) -> str:
    """A secret from the named environment variable or file; ConfigError naming the field."""
    if env_name is not None:
        value = env.get(env_name, "")
        if not value:
            raise ConfigError(f"{field_name}: environment variable {env_name} is not set or empty")
        return value
    if file is not None:
        try:
            value = file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{field_name}: cannot read {file}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"{field_name}: {file} is empty")
        return value
    raise ConfigError(f"{field_name}: neither an environment variable nor a file is configured")


@dataclass(frozen=True, slots=True)
class HsmSettings:
    module: str
    token_label: str
    pin_env: str | None = None
    pin_file: Path | None = None
    #: SoftHSM2 only: the SOFTHSM2_CONF to use when the environment does not set one.
    softhsm2_conf: Path | None = None

    def apply_softhsm2_conf(self) -> None:
        """Export ``softhsm2_conf`` as SOFTHSM2_CONF unless the environment already names one.

        Call before the PKCS#11 module is loaded: SoftHSM2 reads it once, at C_Initialize.
        """
        if self.softhsm2_conf is not None:
            os.environ.setdefault("SOFTHSM2_CONF", str(self.softhsm2_conf))

    def pin(self, env: Mapping[str, str] | None = None) -> str:
        """The user PIN, read when needed (never stored in the settings)."""
        return _read_secret(
            "hsm.pin_env" if self.pin_env else "hsm.pin_file",
            self.pin_env,
            self.pin_file,
            os.environ if env is None else env,
        )


@dataclass(frozen=True, slots=True)
class PrincipalSettings:
    arn: str
    access_key_id: str
    secret_access_key_env: str | None = None
    secret_access_key_file: Path | None = None

    def secret_access_key(self, env: Mapping[str, str] | None = None) -> str:
        return _read_secret(
            f"principals[{self.access_key_id}].secret_access_key",
            self.secret_access_key_env,
            self.secret_access_key_file,
            os.environ if env is None else env,
        )


@dataclass(frozen=True, slots=True)
class Settings:
    hsm: HsmSettings
    catalog: Path
    region: str = "us-east-1"
    account_id: str = "111122223333"
    audit_log: Path | None = None
    maintenance_interval_seconds: float = 60.0
    principals: tuple[PrincipalSettings, ...] = field(default=())
    config_path: Path | None = None

    @classmethod
    def load(cls, path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Read and check the config file; see the module docstring for where it is found."""
        env = os.environ if env is None else env
        file = Path(path or env.get(f"{ENV_PREFIX}CONFIG") or DEFAULT_CONFIG)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"config file {file}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {file} is not valid YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {file}: the top level must be a mapping")
        return cls.from_mapping(data, base_dir=file.resolve().parent, env=env, config_path=file.resolve())

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        *,
        base_dir: Path,
        env: Mapping[str, str] | None = None,
        config_path: Path | None = None,
    ) -> Settings:
        env = os.environ if env is None else env
        _no_unknown("", data, _TOP_LEVEL)
        hsm_data = data.get("hsm")
        if not isinstance(hsm_data, dict):
            raise ConfigError("hsm: required mapping (module, token_label, pin_env or pin_file)")
        _no_unknown("hsm.", hsm_data, _HSM_FIELDS)
        reader = _Reader(env, base_dir)

        module = reader.text("hsm.module", hsm_data.get("module"))
        token_label = reader.text("hsm.token_label", hsm_data.get("token_label"))
        if len(token_label.encode("utf-8")) > 32:
            raise ConfigError("hsm.token_label: at most 32 bytes")
        pin_env = reader.optional_text("hsm.pin_env", hsm_data.get("pin_env"))
        pin_file = reader.optional_path("hsm.pin_file", hsm_data.get("pin_file"))
        if (pin_env is None) == (pin_file is None):
            raise ConfigError("hsm: give exactly one of pin_env or pin_file (never the PIN itself)")

        region = reader.text("region", data.get("region", "us-east-1"))
        if not _REGION.match(region):
            raise ConfigError(f"region: {region!r} is not a region name like us-east-1")
        account_id = reader.text("account_id", data.get("account_id", "111122223333"))
        if not _ACCOUNT.match(account_id):
            raise ConfigError("account_id: must be 12 digits (quote it in YAML)")
        interval = reader.number(
            "maintenance_interval_seconds", data.get("maintenance_interval_seconds", 60)
        )
        if interval <= 0:
            raise ConfigError("maintenance_interval_seconds: must be greater than 0")

        return cls(
            hsm=HsmSettings(
                module=module,
                token_label=token_label,
                pin_env=pin_env,
                pin_file=pin_file,
                softhsm2_conf=reader.optional_path("hsm.softhsm2_conf", hsm_data.get("softhsm2_conf")),
            ),
            catalog=reader.path("catalog", data.get("catalog")),
            region=region,
            account_id=account_id,
            audit_log=reader.optional_path("audit_log", data.get("audit_log")),
            maintenance_interval_seconds=interval,
            principals=_principals(data.get("principals", []), base_dir),
            config_path=config_path,
        )


class _Reader:
    """Field readers applying HSMKEYS_* overrides: the env var named after the field path."""

    def __init__(self, env: Mapping[str, str], base_dir: Path) -> None:
        self._env = env
        self._base = base_dir

    def _raw(self, name: str, value: object) -> tuple[object, Path]:
        override = self._env.get(ENV_PREFIX + name.replace(".", "_").upper())
        if override is not None:
            return override, Path.cwd()
        return value, self._base

    def optional_text(self, name: str, value: object) -> str | None:
        raw, _ = self._raw(name, value)
        if raw is None or raw == "":
            return None
        if not isinstance(raw, str | int) or isinstance(raw, bool):
            raise ConfigError(f"{name}: must be a string")
        return str(raw)

    def text(self, name: str, value: object) -> str:
        text = self.optional_text(name, value)
        if text is None:
            raise ConfigError(f"{name}: required")
        return text

    def optional_path(self, name: str, value: object) -> Path | None:
        raw, base = self._raw(name, value)
        if raw is None or raw == "":
            return None
        if not isinstance(raw, str):
            raise ConfigError(f"{name}: must be a path")
        return (base / Path(raw).expanduser()).resolve()

    def path(self, name: str, value: object) -> Path:
        found = self.optional_path(name, value)
        if found is None:
            raise ConfigError(f"{name}: required")
        return found

    def number(self, name: str, value: object) -> float:
        raw, _ = self._raw(name, value)
        if isinstance(raw, bool):
            raise ConfigError(f"{name}: must be a number")
        try:
            return float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: must be a number, got {raw!r}") from None


def _no_unknown(prefix: str, data: Mapping[str, Any], known: set[str]) -> None:
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown field (known: {', '.join(sorted(known))})")


def _principals(value: object, base_dir: Path) -> tuple[PrincipalSettings, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError("principals: must be a list")
    reader = _Reader({}, base_dir)  # principals are not overridden one field at a time
    seen: set[str] = set()
    found = []
    for i, item in enumerate(value):
        where = f"principals[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: must be a mapping")
        _no_unknown(f"{where}.", item, _PRINCIPAL_FIELDS)
        arn = reader.text(f"{where}.arn", item.get("arn"))
        if not _PRINCIPAL_ARN.match(arn):
            raise ConfigError(f"{where}.arn: {arn!r} is not an IAM user, role or root ARN")
        key_id = reader.text(f"{where}.access_key_id", item.get("access_key_id"))
        if not _ACCESS_KEY_ID.match(key_id):
            raise ConfigError(f"{where}.access_key_id: 16-128 upper-case letters and digits")
        if key_id in seen:
            raise ConfigError(f"{where}.access_key_id: {key_id} is listed twice")
        seen.add(key_id)
        secret_env = reader.optional_text(f"{where}.secret_access_key_env", item.get("secret_access_key_env"))
        secret_file = reader.optional_path(
            f"{where}.secret_access_key_file", item.get("secret_access_key_file")
        )
        if (secret_env is None) == (secret_file is None):
            raise ConfigError(
                f"{where}: give exactly one of secret_access_key_env or secret_access_key_file"
            )
        found.append(PrincipalSettings(arn, key_id, secret_env, secret_file))
    return tuple(found)
