"""Settings: one YAML file plus ``HSMKEYS_*`` environment overrides, checked once.

The file is ``--config``, else ``$HSMKEYS_CONFIG``, else ``./hsmkeys.yaml``. Relative
paths in it are relative to the file. Every scalar field can be overridden by an
environment variable named after its path: ``HSMKEYS_HSM_MODULE``,
``HSMKEYS_HSM_TOKEN_LABEL``, ``HSMKEYS_HSM_PIN_ENV``, ``HSMKEYS_HSM_PIN_FILE``,
``HSMKEYS_HSM_SOFTHSM2_CONF``,
``HSMKEYS_CATALOG``, ``HSMKEYS_REGION``, ``HSMKEYS_ACCOUNT_ID``, ``HSMKEYS_AUDIT_LOG``,
``HSMKEYS_MAINTENANCE_INTERVAL_SECONDS``, ``HSMKEYS_SERVER_HOST``,
``HSMKEYS_SERVER_PORT``, ``HSMKEYS_SERVER_TLS_CERT``, ``HSMKEYS_SERVER_TLS_KEY``,
``HSMKEYS_SERVER_ACCESS_LOG`` (relative paths from the environment are relative to
the working directory).

``catalog`` is a SQLite file path, or a ``postgresql://user@host:port/db`` URL naming a
PostgreSQL catalog that several hosts share. Its password is never in the URL: it comes
from ``$HSMKEYS_CATALOG_PASSWORD`` or ``catalog_password_file`` (or neither, for trust,
peer or certificate authentication).

A PIN is never in the YAML, argv or logs: ``hsm.pin_env`` names an environment
variable holding it, or ``hsm.pin_file`` a file. Secret files (``hsm.pin_file``,
``secret_access_key_file``) must not be readable by group or others (``chmod 600``);
they are checked whenever they are read. Every problem is one
:class:`~hsmkeys.errors.ConfigError` whose message names the field.

Principals authenticate with an access key id of 1-128 ASCII word characters (AWS
ids look like ``AKIA...``; local emulators use ``test``) and may carry an identity
policy, ``policy:`` (inline, as YAML) or ``policy_file:`` (a JSON file), kept as
canonical JSON text and compiled at load (``hsmkeys.authz.compile_policy``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import string
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from hsmkeys.errors import ConfigError, MalformedPolicyDocumentException
from hsmkeys.usage import Pricing

DEFAULT_CONFIG = "hsmkeys.yaml"
ENV_PREFIX = "HSMKEYS_"
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]+")
_ACCOUNT = re.compile(r"[0-9]{12}")
_PRINCIPAL_ARN = re.compile(r"^arn:aws:iam::\d{12}:(user|role)/[\w+=,.@/-]+$|^arn:aws:iam::\d{12}:root$")
_ACCESS_KEY_ID = re.compile(r"[A-Za-z0-9_]{1,128}")
_TOP_LEVEL = {
    "hsm",
    "catalog",
    "catalog_password_file",
    "region",
    "account_id",
    "audit_log",
    "audit_fsync_lines",
    "maintenance_interval_seconds",
    "maintenance_lease_seconds",
    "doctor_grace_seconds",
    "principals",
    "server",
    "pricing",
}
_HSM_FIELDS = {"module", "token_label", "pin_env", "pin_file", "softhsm2_conf"}
_PRINCIPAL_FIELDS = {
    "arn",
    "access_key_id",
    "secret_access_key_env",
    "secret_access_key_file",
    "policy",
    "policy_file",
}
_SERVER_FIELDS = {"host", "port", "tls_cert", "tls_key", "access_log"}
_PRICING_FIELDS = {"key_month", "per_10k_requests"}
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7300
DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT_ID = "111122223333"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


_KEY_ID_ALPHABET = string.ascii_uppercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits


def new_access_key_id() -> str:
    """A random access key id shaped like AWS's: AKIA and 16 upper-case letters or digits."""
    return "AKIA" + "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(16))


def new_secret_access_key() -> str:
    """A random 40-character secret, as long as an AWS secret access key."""
    return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40))


def is_access_key_id(value: str) -> bool:
    """Whether ``value`` is an accepted access key id: 1-128 of ``[A-Za-z0-9_]``."""
    return _ACCESS_KEY_ID.fullmatch(value) is not None


def check_region(value: str, where: str = "region") -> str:
    """``value`` if it is a region name like us-east-1; else ConfigError naming ``where``."""
    if not _REGION.fullmatch(value):
        raise ConfigError(f"{where}: {value!r} is not a region name like us-east-1")
    return value


def check_account_id(value: str, where: str = "account_id") -> str:
    """``value`` if it is 12 digits; else ConfigError naming ``where``."""
    if not _ACCOUNT.fullmatch(value):
        raise ConfigError(f"{where}: must be 12 digits (quote it in YAML), got {value!r}")
    return value


def read_secret_file(field_name: str, file: Path) -> str:
    """The stripped text of a secret file that only its owner may read.

    ConfigError naming the field and the file if it cannot be read, is empty, or is
    readable or writable by group or others (a PIN or secret key others can read is
    no secret).
    """
    try:
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{field_name}: cannot read {file}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as opened:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # of the file opened, not of a path re-resolved
        if mode & 0o077:
            raise ConfigError(
                f"{field_name}: {file} is accessible by group or others (mode {mode:04o}); "
                f"run: chmod 600 {file}"
            )
        try:
            value = opened.read().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{field_name}: cannot read {file}: {exc}") from None
    if not value:
        raise ConfigError(f"{field_name}: {file} is empty")
    return value


def _read_secret(field_name: str, env_name: str | None, file: Path | None, env: Mapping[str, str]) -> str:
    """A secret from the named environment variable or file; ConfigError naming the field."""
    if env_name is not None:
        value = env.get(env_name, "")
        if not value:
            raise ConfigError(f"{field_name}: environment variable {env_name} is not set or empty")
        return value
    if file is not None:
        return read_secret_file(field_name, file)
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
    #: The principal's identity policy as canonical JSON text (sorted keys, no spaces).
    policy: str | None = None

    def secret_access_key(self, env: Mapping[str, str] | None = None) -> str:
        return _read_secret(
            f"principals[{self.access_key_id}].secret_access_key",
            self.secret_access_key_env,
            self.secret_access_key_file,
            os.environ if env is None else env,
        )


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """``hsmkeys serve``: where to listen, TLS (both files or neither), the access log."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    tls_cert: Path | None = None
    tls_key: Path | None = None
    access_log: bool = False

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True, slots=True)
class Settings:
    hsm: HsmSettings
    catalog: Path
    region: str = DEFAULT_REGION
    account_id: str = DEFAULT_ACCOUNT_ID
    audit_log: Path | None = None
    audit_fsync_lines: bool = False  # fsync every audit line (checkpoint lines always are)
    maintenance_interval_seconds: float = 60.0
    #: How long the catalog's maintenance lease lasts unless renewed; a host that dies or
    #: freezes holding it stops maintenance for at most this long.
    maintenance_lease_seconds: float = 30.0
    #: ``doctor --fix`` destroys an orphan HSM object only when two scans at least this
    #: far apart saw it (a create or rotation in flight is not an orphan).
    doctor_grace_seconds: float = 600.0
    principals: tuple[PrincipalSettings, ...] = field(default=())
    config_path: Path | None = None
    server: ServerSettings = field(default_factory=ServerSettings)
    #: A PostgreSQL catalog's URL (no password in it); None: ``catalog`` is a SQLite file.
    #: With a URL, ``catalog`` is ``<config dir>/var/catalog.postgresql``, only the anchor
    #: of this host's own files (maintenance lock, default TLS pair); nothing is stored in it.
    catalog_url: str | None = None
    catalog_password_file: Path | None = None
    #: ``pricing:`` (key_month, per_10k_requests) for ``hsmkeys usage``; AWS list prices by default.
    pricing: Pricing = field(default_factory=Pricing)

    def catalog_password(self, env: Mapping[str, str] | None = None) -> str | None:
        """The PostgreSQL catalog's password: $HSMKEYS_CATALOG_PASSWORD, else the
        catalog_password_file, else None (the server authenticates otherwise)."""
        env = os.environ if env is None else env
        value = env.get(f"{ENV_PREFIX}CATALOG_PASSWORD", "")
        if value:
            return value
        if self.catalog_password_file is not None:
            return read_secret_file("catalog_password_file", self.catalog_password_file)
        return None

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
            data = yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass
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

        region = check_region(reader.text("region", data.get("region", DEFAULT_REGION)))
        account_id = check_account_id(
            reader.text("account_id", data.get("account_id", DEFAULT_ACCOUNT_ID))
        )
        interval = reader.number(
            "maintenance_interval_seconds", data.get("maintenance_interval_seconds", 60)
        )
        if interval <= 0:
            raise ConfigError("maintenance_interval_seconds: must be greater than 0")
        lease = reader.number("maintenance_lease_seconds", data.get("maintenance_lease_seconds", 30))
        if not 0 < lease < float("inf"):
            raise ConfigError("maintenance_lease_seconds: must be a number of seconds greater than 0")
        grace = reader.number("doctor_grace_seconds", data.get("doctor_grace_seconds", 600))
        if not 0 <= grace < float("inf"):
            raise ConfigError("doctor_grace_seconds: must be a number of seconds, 0 or more")

        catalog, catalog_url = _catalog(reader, data.get("catalog"), base_dir)
        catalog_password_file = reader.optional_path(
            "catalog_password_file", data.get("catalog_password_file")
        )
        if catalog_password_file is not None and catalog_url is None:
            raise ConfigError("catalog_password_file: only for a postgresql:// catalog")
        return cls(
            hsm=HsmSettings(
                module=module,
                token_label=token_label,
                pin_env=pin_env,
                pin_file=pin_file,
                softhsm2_conf=reader.optional_path("hsm.softhsm2_conf", hsm_data.get("softhsm2_conf")),
            ),
            catalog=catalog,
            region=region,
            account_id=account_id,
            audit_log=reader.optional_path("audit_log", data.get("audit_log")),
            audit_fsync_lines=reader.flag("audit_fsync_lines", data.get("audit_fsync_lines", False)),
            maintenance_interval_seconds=interval,
            maintenance_lease_seconds=lease,
            doctor_grace_seconds=grace,
            principals=_principals(data.get("principals", []), base_dir),
            config_path=config_path,
            server=_server(data.get("server"), reader),
            catalog_url=catalog_url,
            catalog_password_file=catalog_password_file,
            pricing=_pricing(data.get("pricing"), reader),
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

    def integer(self, name: str, value: object) -> int:
        raw, _ = self._raw(name, value)
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise ConfigError(f"{name}: must be an integer, got {raw!r}")
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{name}: must be an integer, got {raw!r}") from None

    def flag(self, name: str, value: object) -> bool:
        raw, _ = self._raw(name, value)
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ConfigError(f"{name}: must be true or false, got {raw!r}")

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
        if not is_access_key_id(key_id):
            raise ConfigError(f"{where}.access_key_id: 1-128 letters, digits or underscores")
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
        policy = _principal_policy(where, arn, item, reader)
        found.append(PrincipalSettings(arn, key_id, secret_env, secret_file, policy))
    return tuple(found)


def _principal_policy(where: str, arn: str, item: Mapping[str, Any], reader: _Reader) -> str | None:
    """The principal's identity policy as canonical JSON, compiled once to prove it valid."""
    inline, file = item.get("policy"), reader.optional_path(f"{where}.policy_file", item.get("policy_file"))
    if inline is None and file is None:
        return None
    if inline is not None and file is not None:
        raise ConfigError(f"{where} ({arn}): give policy or policy_file, not both")
    if inline is not None:
        if not isinstance(inline, dict):
            raise ConfigError(f"{where}.policy ({arn}): must be a mapping (the policy document)")
        document: object = inline
    else:
        assert file is not None
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{where}.policy_file ({arn}): cannot read {file}: {exc.strerror}") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"{where}.policy_file ({arn}): {file} is not valid JSON: {exc}") from None
    try:
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}.policy ({arn}): not a JSON document: {exc}") from None

    from hsmkeys.authz import compile_policy  # lazily: only configs with policies need it

    try:
        compile_policy(text, kind="identity")
    except MalformedPolicyDocumentException as exc:
        field_name = "policy" if inline is not None else "policy_file"
        raise ConfigError(f"{where}.{field_name} ({arn}): {exc.message or exc.code}") from None
    return text


def _catalog(reader: _Reader, value: object, base_dir: Path) -> tuple[Path, str | None]:
    """(SQLite path, None) or (host-local anchor path, PostgreSQL URL) from ``catalog``."""
    url = reader.optional_text("catalog", value)
    if url is None or not url.startswith(("postgresql://", "postgres://")):
        return reader.path("catalog", value), None
    try:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        password = parts.password
    except ValueError as exc:
        raise ConfigError(f"catalog: {exc}") from None
    if password is not None or "password" in query:
        raise ConfigError(
            "catalog: put no password in the URL; set $HSMKEYS_CATALOG_PASSWORD or catalog_password_file"
        )
    if not parts.hostname and "host" not in query:
        raise ConfigError("catalog: a postgresql:// URL needs a host (postgresql://user@host:port/db)")
    return base_dir / "var" / "catalog.postgresql", url


def _server(value: object, reader: _Reader) -> ServerSettings:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError("server: must be a mapping (host, port, tls_cert, tls_key, access_log)")
    _no_unknown("server.", value, _SERVER_FIELDS)
    host = reader.text("server.host", value.get("host", DEFAULT_HOST))
    port = reader.integer("server.port", value.get("port", DEFAULT_PORT))
    if not 0 <= port <= 65535:
        raise ConfigError(f"server.port: must be 0-65535, got {port}")
    tls_cert = reader.optional_path("server.tls_cert", value.get("tls_cert"))
    tls_key = reader.optional_path("server.tls_key", value.get("tls_key"))
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("server: give both tls_cert and tls_key, or neither")
    access_log = reader.flag("server.access_log", value.get("access_log", False))
    return ServerSettings(host, port, tls_cert, tls_key, access_log)


def _pricing(value: object, reader: _Reader) -> Pricing:
    if value is None:
        return Pricing()
    if not isinstance(value, dict):
        raise ConfigError("pricing: must be a mapping (key_month, per_10k_requests)")
    _no_unknown("pricing.", value, _PRICING_FIELDS)
    default = Pricing()
    prices = {}
    for name in sorted(_PRICING_FIELDS):
        raw, _ = reader._raw(f"pricing.{name}", value.get(name, str(getattr(default, name))))
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ConfigError(f"pricing.{name}: must be a number, got {raw!r}")
        try:
            price = Decimal(str(raw))
        except ArithmeticError:
            raise ConfigError(f"pricing.{name}: must be a number, got {raw!r}") from None
        if not price.is_finite() or price < 0:
            raise ConfigError(f"pricing.{name}: must be a number >= 0, got {raw!r}")
        prices[name] = price
    return Pricing(**prices)


class _ConfigLoader(yaml.SafeLoader):
    """safe_load without implicit timestamps: ``Version: 2012-10-17`` stays a string."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
