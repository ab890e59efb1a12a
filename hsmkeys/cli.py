"""The ``hsmkeys`` console script: set up, inspect and use a key store from the shell.

``hsmkeys [--config F] [--json] <command>``; ``--config`` and ``--json`` may also
follow the command. Output is for people by default; ``--json`` prints JSON, and for
commands that are KMS operations that JSON is the AWS KMS response shape (the same
serializer as the server, :mod:`hsmkeys.server.wire`), so ``hsmkeys keys describe K
--json`` prints what ``aws kms describe-key`` would.

Exit status: 0 success; 1 a check said no (``verify``, ``verify-mac``, ``doctor``
found drift, ``audit verify`` found a bad line); 2 an error. Every error is one line
on stderr, ``error: <Code>: <message>`` (a KMS error name, ``ConfigError`` or
``InputError``), never a traceback. PINs and secrets are never printed.

Tests inject the key store: ``main(argv, open_store=lambda: contextlib.nullcontext(store))``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import json
import os
import secrets
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from hsmkeys.config import (
    DEFAULT_CONFIG,
    DEFAULT_HOST,
    DEFAULT_PORT,
    ENV_PREFIX,
    PrincipalSettings,
    ServerSettings,
    Settings,
    new_secret_access_key,
    read_secret_file,
)
from hsmkeys.context import CallContext, call_context
from hsmkeys.errors import (
    ConfigError,
    KMSError,
    KMSInvalidMacException,
    KMSInvalidSignatureException,
)
from hsmkeys.keystore import KeyStore
from hsmkeys.models import (
    AliasListEntry,
    GetKeyRotationStatusResult,
    GrantListEntry,
    KeyListEntry,
    KeyMetadata,
    KeySpec,
    KeyState,
    ListAliasesResult,
    ListGrantsResult,
    ListKeysResult,
    ListResourceTagsResult,
    Tag,
)

__all__ = ["StoreOpener", "main"]

#: Returns the key store for one command; the CLI leaves the context manager when done.
StoreOpener = Callable[[], AbstractContextManager[KeyStore]]

EXIT_OK = 0
EXIT_NO = 1  # a verification or check answered "no"
EXIT_ERROR = 2

_PIN_BYTES = 16  # 32 hex characters; SoftHSM2 accepts 4-255
_PROBE_TIMEOUT_S = 2.0  # status: how long a server may take to answer /healthz
_SYSTEM_SOFTHSM_CONF = Path("/etc/softhsm/softhsm2.conf")
_SYSTEM_TOKEN_DIR = Path("/var/lib/softhsm")


class InputError(Exception):
    """The command's own input (a file, stdin, an argument value) is unusable."""

    code = "InputError"


# ==================================================================== output


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _out_bytes(data: bytes) -> None:
    sys.stdout.flush()  # text written before must come first
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _out_json(value: object) -> None:
    _out(json.dumps(value, indent=2))


def _kms_json(operation: str, result: object) -> Any:
    """``result`` as the KMS response JSON of ``operation``, by the server's serializer."""
    from hsmkeys.server.wire import KmsWire  # botocore's model: loaded only when needed

    return json.loads(KmsWire.load().operations[operation].write(result))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _pem(der: bytes) -> str:
    body = _b64(der)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join(["-----BEGIN PUBLIC KEY-----", *lines, "-----END PUBLIC KEY-----"])


def _table(rows: Sequence[tuple[str, object]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        _out(f"{name:<{width}}  {value}")


# ==================================================================== input


def _read_input(args: argparse.Namespace) -> bytes:
    """The bytes of ``--in FILE``, else all of stdin."""
    if args.in_file is None:
        return sys.stdin.buffer.read()
    try:
        return Path(args.in_file).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read --in {args.in_file}: {exc.strerror}") from None


def _base64_arg(value: str) -> bytes:
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise argparse.ArgumentTypeError("not valid base64") from None


def _pair_arg(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, val


def _context_arg(value: str) -> list[tuple[str, str]]:
    """One ``--context`` value: ``K=V``, the aws CLI's ``K=V,K2=V2``, or a JSON object."""
    if value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise argparse.ArgumentTypeError(f"not a JSON object: {value!r}") from None
        if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
            raise argparse.ArgumentTypeError("a JSON context must map strings to strings")
        return list(parsed.items())
    pairs = []
    for piece in value.split(","):
        key, sep, val = piece.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(
                f"expected KEY=VALUE[,KEY=VALUE...] or a JSON object, got {piece!r} in {value!r}"
            )
        pairs.append((key, val))
    return pairs


def _context(pairs: Sequence[tuple[str, str]] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    context: dict[str, str] = {}
    for key, value in pairs:
        if key in context:
            raise InputError(f"--context {key} is given twice")
        context[key] = value
    return context


def _alias_name(name: str) -> str:
    return name if name.startswith("alias/") else f"alias/{name}"


# ==================================================================== the command runner


@dataclass
class _Cli:
    args: argparse.Namespace
    opener: StoreOpener | None
    _settings: Settings | None = None

    @property
    def as_json(self) -> bool:
        return bool(self.args.json)

    def settings(self) -> Settings:
        if self._settings is None:
            file = Path(self.args.config or os.environ.get(f"{ENV_PREFIX}CONFIG") or DEFAULT_CONFIG)
            if not file.exists():
                raise ConfigError(
                    f"config file {file} not found (looked at --config, else ${ENV_PREFIX}CONFIG, "
                    f"else ./{DEFAULT_CONFIG}); pass --config F or set {ENV_PREFIX}CONFIG=F"
                )
            self._settings = Settings.load(self.args.config)
        return self._settings

    @contextlib.contextmanager
    def store(self) -> Iterator[KeyStore]:
        opened = self.opener() if self.opener is not None else KeyStore.open(self.settings())
        # Local CLI calls are trusted (the caller holds the PIN) and audited as such.
        with opened as store, call_context(CallContext(source="cli")):
            yield store


Handler = Callable[[_Cli], int]


# ------------------------------------------------------------------ keys


def _print_metadata(
    md: KeyMetadata, *, aliases: Sequence[str] = (), tags: Sequence[Tag] = (), rotation: str | None = None
) -> None:
    rows: list[tuple[str, object]] = [
        ("KeyId", md.key_id),
        ("Arn", md.arn),
        ("Description", md.description or "-"),
        ("KeySpec", md.key_spec),
        ("KeyUsage", md.key_usage),
        ("KeyState", md.key_state),
        ("CreationDate", md.creation_date.isoformat()),
        ("Version", md.current_version),
    ]
    if md.deletion_date is not None:
        rows.append(("DeletionDate", md.deletion_date.isoformat()))
    algorithms: Sequence[str] = (
        md.encryption_algorithms or md.signing_algorithms or md.mac_algorithms or md.key_agreement_algorithms
    )
    if algorithms:
        rows.append(("Algorithms", ", ".join(algorithms)))
    if aliases:
        rows.append(("Aliases", ", ".join(aliases)))
    if tags:
        rows.append(("Tags", ", ".join(f"{t.tag_key}={t.tag_value}" for t in tags)))
    if rotation is not None:
        rows.append(("Rotation", rotation))
    _table(rows)


def _all_keys(store: KeyStore) -> tuple[KeyListEntry, ...]:
    entries: list[KeyListEntry] = []
    marker: str | None = None
    while True:
        page = store.list_keys(limit=1000, marker=marker)
        entries.extend(page.keys)
        if not page.truncated:
            return tuple(entries)
        marker = page.next_marker


def _all_aliases(store: KeyStore, key_id: str | None = None) -> ListAliasesResult:
    found: list[AliasListEntry] = []
    marker: str | None = None
    while True:
        page = store.list_aliases(key_id=key_id, limit=100, marker=marker)
        found.extend(page.aliases)
        if not page.truncated:
            return ListAliasesResult(tuple(found), False)
        marker = page.next_marker


def _cmd_keys_create(cli: _Cli) -> int:
    a = cli.args
    tags = [Tag(k, v) for k, v in a.tag] if a.tag else None
    with cli.store() as store:
        result = store.create_key(
            description=a.description, key_spec=a.key_spec, key_usage=a.key_usage, tags=tags, origin=a.origin
        )
    if cli.as_json:
        _out_json(_kms_json("CreateKey", result))
    else:
        _print_metadata(result.key_metadata, tags=tags or ())
    return EXIT_OK


def _cmd_keys_describe(cli: _Cli) -> int:
    with cli.store() as store:
        result = store.describe_key(key_id=cli.args.key)
        if cli.as_json:
            _out_json(_kms_json("DescribeKey", result))
            return EXIT_OK
        md = result.key_metadata
        aliases = [a.alias_name for a in _all_aliases(store, md.key_id).aliases]
        tags = _all_tags(store, md.key_id).tags
        rotation = None
        # GetKeyRotationStatus refuses other specs and keys pending deletion.
        if md.key_spec is KeySpec.SYMMETRIC_DEFAULT and md.key_state is not KeyState.PENDING_DELETION:
            rotation = _rotation_text(store.get_key_rotation_status(key_id=md.key_id))
    _print_metadata(md, aliases=aliases, tags=tags, rotation=rotation)
    return EXIT_OK


def _cmd_keys_list(cli: _Cli) -> int:
    with cli.store() as store:
        keys = _all_keys(store)
        if cli.as_json:
            _out_json(_kms_json("ListKeys", ListKeysResult(keys, False)))
            return EXIT_OK
        by_key: dict[str, list[str]] = {}
        for alias in _all_aliases(store).aliases:
            if alias.target_key_id is not None:
                by_key.setdefault(alias.target_key_id, []).append(alias.alias_name)
        rows = []
        for entry in keys:
            md = store.describe_key(key_id=entry.key_id).key_metadata
            names = ",".join(by_key.get(md.key_id, [])) or "-"
            rows.append((md.key_id, str(md.key_state), str(md.key_spec), names, md.description))
    if not rows:
        _out("no keys (create one with: hsmkeys keys create)")
        return EXIT_OK
    header = ("KeyId", "State", "Spec", "Aliases", "Description")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        _out(("  ".join(f"{row[i]:<{widths[i]}}" for i in range(4)) + "  " + row[4]).rstrip())
    return EXIT_OK


def _cmd_keys_set_enabled(enabled: bool) -> Handler:
    def run(cli: _Cli) -> int:
        with cli.store() as store:
            if enabled:
                store.enable_key(key_id=cli.args.key)
            else:
                store.disable_key(key_id=cli.args.key)
            md = store.describe_key(key_id=cli.args.key).key_metadata
        if cli.as_json:
            _out_json({})
        else:
            _out(f"{md.key_id}: {md.key_state}")
        return EXIT_OK

    return run


def _cmd_keys_rotate(cli: _Cli) -> int:
    with cli.store() as store:
        result = store.rotate_key_on_demand(key_id=cli.args.key)
        md = store.describe_key(key_id=result.key_id).key_metadata
    if cli.as_json:
        _out_json(_kms_json("RotateKeyOnDemand", result))
    else:
        _out(f"{md.key_id}: rotated, current version {md.current_version}")
    return EXIT_OK


def _cmd_keys_schedule_deletion(cli: _Cli) -> int:
    with cli.store() as store:
        result = store.schedule_key_deletion(key_id=cli.args.key, pending_window_in_days=cli.args.days)
    if cli.as_json:
        _out_json(_kms_json("ScheduleKeyDeletion", result))
    else:
        _out(
            f"{result.key_id}: {result.key_state}, purged by `hsmkeys maintain` after "
            f"{result.deletion_date.isoformat()} ({result.pending_window_in_days} days)"
        )
    return EXIT_OK


def _cmd_keys_cancel_deletion(cli: _Cli) -> int:
    with cli.store() as store:
        result = store.cancel_key_deletion(key_id=cli.args.key)
    if cli.as_json:
        _out_json(_kms_json("CancelKeyDeletion", result))
    else:
        _out(f"{result.key_id}: deletion cancelled; the key is Disabled until `hsmkeys keys enable`")
    return EXIT_OK


def _rotation_text(status: GetKeyRotationStatusResult) -> str:
    if not status.key_rotation_enabled:
        return "disabled (enable: hsmkeys keys rotation enable KEY)"
    text = f"enabled, every {status.rotation_period_in_days} days"
    if status.next_rotation_date is not None:
        text += f", next {status.next_rotation_date.isoformat()}"
    return text


def _cmd_keys_rotation(cli: _Cli) -> int:
    a = cli.args
    with cli.store() as store:
        if a.rotation_command == "enable":
            store.enable_key_rotation(key_id=a.key, rotation_period_in_days=a.period_days)
        elif a.rotation_command == "disable":
            store.disable_key_rotation(key_id=a.key)
        status = store.get_key_rotation_status(key_id=a.key)
    if cli.as_json:
        _out_json(_kms_json("GetKeyRotationStatus", status) if a.rotation_command == "status" else {})
    else:
        _out(f"{status.key_id}: rotation {_rotation_text(status)}")
    return EXIT_OK


def _all_tags(store: KeyStore, key_id: str) -> ListResourceTagsResult:
    found: list[Tag] = []
    marker: str | None = None
    while True:
        page = store.list_resource_tags(key_id=key_id, limit=50, marker=marker)
        found.extend(page.tags)
        if not page.truncated:
            return ListResourceTagsResult(tuple(found), False)
        marker = page.next_marker


def _cmd_keys_import(cli: _Cli) -> int:
    """BYOK: wrap the material here under the HSM's wrapping key and import it."""
    from hsmkeys.kmsclient import LocalKms
    from hsmkeys.provision.apply import import_key_material
    from hsmkeys.provision.keymaterial import load_key_material

    with cli.store() as store:
        key = store.describe_key(key_id=cli.args.key).key_metadata
        try:
            material = load_key_material(Path(cli.args.material_file), key.key_spec)
        except ValueError as exc:
            raise ConfigError(f"--material-file: {exc}") from None
        import_key_material(LocalKms(store), key.arn, material)
        md = store.describe_key(key_id=key.arn).key_metadata
    if cli.as_json:
        _out_json({"KeyId": md.arn, "KeyState": md.key_state})
    else:
        _out(f"{md.key_id}: key material imported; {md.key_state}")
    return EXIT_OK


def _cmd_keys_tag(cli: _Cli) -> int:
    a = cli.args
    tags = [Tag(k, v) for k, v in a.tags]
    if len({t.tag_key for t in tags}) != len(tags):
        raise InputError("a tag key is given twice")
    with cli.store() as store:
        store.tag_resource(key_id=a.key, tags=tags)
    if cli.as_json:
        _out_json({})
    else:
        _out(f"{a.key}: tagged " + ", ".join(f"{t.tag_key}={t.tag_value}" for t in tags))
    return EXIT_OK


def _cmd_keys_untag(cli: _Cli) -> int:
    a = cli.args
    with cli.store() as store:
        store.untag_resource(key_id=a.key, tag_keys=list(a.tag_keys))
    if cli.as_json:
        _out_json({})
    else:
        _out(f"{a.key}: untagged " + ", ".join(a.tag_keys))
    return EXIT_OK


def _cmd_keys_tags(cli: _Cli) -> int:
    with cli.store() as store:
        result = _all_tags(store, cli.args.key)
    if cli.as_json:
        _out_json(_kms_json("ListResourceTags", result))
    elif not result.tags:
        _out("no tags (add some with: hsmkeys keys tag KEY k=v)")
    else:
        for tag in result.tags:
            _out(f"{tag.tag_key}={tag.tag_value}")
    return EXIT_OK


def _cmd_keys_policy_get(cli: _Cli) -> int:
    with cli.store() as store:
        result = store.get_key_policy(key_id=cli.args.key)
    if cli.as_json:
        _out_json(_kms_json("GetKeyPolicy", result))
    else:
        _out(result.policy)
    return EXIT_OK


def _cmd_keys_policy_put(cli: _Cli) -> int:
    a = cli.args
    if a.file == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(a.file).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read policy file {a.file}: {exc.strerror}") from None
    try:
        policy = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"policy {a.file} is not UTF-8 text") from None
    with cli.store() as store:
        store.put_key_policy(
            key_id=a.key, policy=policy, bypass_policy_lockout_safety_check=a.bypass_policy_lockout_safety_check
        )
    if cli.as_json:
        _out_json({})
    else:
        _out(f"{a.key}: key policy replaced")
    return EXIT_OK


def _cmd_data_key(cli: _Cli) -> int:
    a = cli.args
    with cli.store() as store:
        result = store.generate_data_key(
            key_id=a.key_id, key_spec=a.key_spec, encryption_context=_context(a.context)
        )
    if cli.as_json:
        _out_json(_kms_json("GenerateDataKey", result))
    else:
        _table(
            [
                ("Plaintext", _b64(result.plaintext)),
                ("CiphertextBlob", _b64(result.ciphertext_blob)),
                ("KeyId", result.key_id),
            ]
        )
    return EXIT_OK


# ------------------------------------------------------------------ grants


def _operations_arg(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected OPERATION[,OPERATION...], got {value!r}")
    return names


def _cmd_grants_create(cli: _Cli) -> int:
    a = cli.args
    with cli.store() as store:
        result = store.create_grant(
            key_id=a.key,
            grantee_principal=a.grantee,
            operations=a.operations,
            retiring_principal=a.retiring_principal,
            name=a.name,
        )
    if cli.as_json:
        _out_json(_kms_json("CreateGrant", result))
    else:
        _table([("GrantId", result.grant_id), ("GrantToken", result.grant_token)])
    return EXIT_OK


def _all_grants(store: KeyStore, key_id: str) -> ListGrantsResult:
    found: list[GrantListEntry] = []
    marker: str | None = None
    while True:
        page = store.list_grants(key_id=key_id, limit=100, marker=marker)
        found.extend(page.grants)
        if not page.truncated:
            return ListGrantsResult(tuple(found), False)
        marker = page.next_marker


def _cmd_grants_list(cli: _Cli) -> int:
    with cli.store() as store:
        result = _all_grants(store, cli.args.key)
    if cli.as_json:
        _out_json(_kms_json("ListGrants", result))
        return EXIT_OK
    if not result.grants:
        _out("no grants (create one with: hsmkeys grants create KEY --grantee ARN --operations Encrypt)")
        return EXIT_OK
    rows = [("GrantId", "Grantee", "Operations", "Name")] + [
        (g.grant_id, g.grantee_principal, ",".join(g.operations), g.name or "-") for g in result.grants
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        _out(("  ".join(f"{row[i]:<{widths[i]}}" for i in range(3)) + "  " + row[3]).rstrip())
    return EXIT_OK


def _cmd_grants_revoke(cli: _Cli) -> int:
    a = cli.args
    with cli.store() as store:
        store.revoke_grant(key_id=a.key, grant_id=a.grant_id)
    if cli.as_json:
        _out_json({})
    else:
        _out(f"grant {a.grant_id} revoked")
    return EXIT_OK


# ------------------------------------------------------------------ aliases


def _cmd_alias_create(cli: _Cli) -> int:
    name = _alias_name(cli.args.name)
    with cli.store() as store:
        store.create_alias(alias_name=name, target_key_id=cli.args.key)
        target = store.describe_key(key_id=name).key_metadata.key_id
    if cli.as_json:
        _out_json({})
    else:
        _out(f"{name} -> {target}")
    return EXIT_OK


def _cmd_alias_delete(cli: _Cli) -> int:
    name = _alias_name(cli.args.name)
    with cli.store() as store:
        store.delete_alias(alias_name=name)
    if cli.as_json:
        _out_json({})
    else:
        _out(f"{name} deleted")
    return EXIT_OK


def _cmd_alias_list(cli: _Cli) -> int:
    with cli.store() as store:
        result = _all_aliases(store)
    if cli.as_json:
        _out_json(_kms_json("ListAliases", result))
    elif not result.aliases:
        _out("no aliases")
    else:
        for alias in result.aliases:
            _out(f"{alias.alias_name} -> {alias.target_key_id or '-'}")
    return EXIT_OK


# ------------------------------------------------------------------ cryptography


def _cmd_encrypt(cli: _Cli) -> int:
    a = cli.args
    plaintext = _read_input(a)
    with cli.store() as store:
        result = store.encrypt(key_id=a.key_id, plaintext=plaintext, encryption_context=_context(a.context))
    if cli.as_json:
        _out_json(_kms_json("Encrypt", result))
    else:
        _out(_b64(result.ciphertext_blob))
    return EXIT_OK


def _cmd_decrypt(cli: _Cli) -> int:
    a = cli.args
    text = _read_input(a)
    try:
        blob = base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError("decrypt reads the base64 text that encrypt prints; this is not base64") from None
    with cli.store() as store:
        result = store.decrypt(ciphertext_blob=blob, key_id=a.key_id, encryption_context=_context(a.context))
    if cli.as_json:
        _out_json(_kms_json("Decrypt", result))
    else:
        _out_bytes(result.plaintext)
    return EXIT_OK


def _cmd_sign(cli: _Cli) -> int:
    a = cli.args
    message = _read_input(a)
    with cli.store() as store:
        result = store.sign(
            key_id=a.key_id, message=message, signing_algorithm=a.algorithm, message_type=a.message_type
        )
    if cli.as_json:
        _out_json(_kms_json("Sign", result))
    else:
        _out(_b64(result.signature))
    return EXIT_OK


def _cmd_verify(cli: _Cli) -> int:
    a = cli.args
    message = _read_input(a)
    with cli.store() as store:
        try:
            result = store.verify(
                key_id=a.key_id,
                message=message,
                signature=a.signature,
                signing_algorithm=a.algorithm,
                message_type=a.message_type,
            )
        except KMSInvalidSignatureException:
            if cli.as_json:
                _out_json({"SignatureValid": False, "SigningAlgorithm": a.algorithm})
            else:
                _out("signature invalid")
            return EXIT_NO
    if cli.as_json:
        _out_json(_kms_json("Verify", result))
    else:
        _out("signature valid")
    return EXIT_OK


def _cmd_public_key(cli: _Cli) -> int:
    with cli.store() as store:
        result = store.get_public_key(key_id=cli.args.key)
    if cli.as_json:
        _out_json(_kms_json("GetPublicKey", result))
    elif cli.args.der:
        _out_bytes(result.public_key)
    else:
        _out(_pem(result.public_key))
    return EXIT_OK


def _cmd_mac(cli: _Cli) -> int:
    a = cli.args
    message = _read_input(a)
    with cli.store() as store:
        result = store.generate_mac(key_id=a.key_id, message=message, mac_algorithm=a.algorithm)
    if cli.as_json:
        _out_json(_kms_json("GenerateMac", result))
    else:
        _out(_b64(result.mac))
    return EXIT_OK


def _cmd_verify_mac(cli: _Cli) -> int:
    a = cli.args
    message = _read_input(a)
    with cli.store() as store:
        try:
            result = store.verify_mac(key_id=a.key_id, message=message, mac_algorithm=a.algorithm, mac=a.mac)
        except KMSInvalidMacException:
            if cli.as_json:
                _out_json({"MacValid": False, "MacAlgorithm": a.algorithm})
            else:
                _out("mac invalid")
            return EXIT_NO
    if cli.as_json:
        _out_json(_kms_json("VerifyMac", result))
    else:
        _out("mac valid")
    return EXIT_OK


# ------------------------------------------------------------------ envelope files (Encryption SDK messages)

_PROGRESS_MIN_BYTES = 16 << 20  # on a TTY, smaller files finish before a bar helps


class _ProgressBar:
    """``label  42%  27.0/64.0 MiB`` on stderr, redrawn at most 10 times a second."""

    def __init__(self, label: str, total: int | None) -> None:
        self._label, self._total, self._shown, self._done = label, total, 0.0, 0

    def __call__(self, done: int) -> None:
        import time

        self._done = done
        if time.monotonic() - self._shown >= 0.1:
            self._shown = time.monotonic()
            self._draw()

    def _draw(self) -> None:
        mib = self._done / (1 << 20)
        if self._total:
            text = f"{self._label}  {100 * self._done // self._total:3d}%  {mib:.1f}/{self._total / (1 << 20):.1f} MiB"
        else:
            text = f"{self._label}  {mib:.1f} MiB"
        sys.stderr.write(f"\r{text}")
        sys.stderr.flush()

    def finish(self) -> None:
        """End the line (also after a failure, so that the error starts on its own line)."""
        if self._shown or self._done:
            self._draw()
            sys.stderr.write("\n")


@contextlib.contextmanager
def _envelope_files(cli: _Cli, verb: str) -> Iterator[tuple[Any, Any, int | None, _ProgressBar | None]]:
    """(source, destination, source size if known, progress bar or None) for IN and OUT.

    OUT is written to a private (0600) temporary file beside it and renamed into place
    only when the command succeeds, so a failed or refused message leaves no OUT (a
    device or FIFO is written directly).
    """
    import tempfile

    a = cli.args
    if a.output == "-" and cli.as_json:
        raise InputError("--json prints to stdout; give OUT a file name, not -")
    with contextlib.ExitStack() as stack:
        if a.input == "-":
            source: Any = sys.stdin.buffer
        else:
            try:
                source = stack.enter_context(open(a.input, "rb"))
            except OSError as exc:
                raise InputError(f"cannot read {a.input}: {exc.strerror}") from None
        size: int | None = None
        with contextlib.suppress(OSError, ValueError):  # a pipe or a test's stdin has no size
            stat = os.fstat(source.fileno())
            size = stat.st_size if (stat.st_mode & 0o170000) == 0o100000 else None
        show = a.progress or (sys.stderr.isatty() and (size is None or size >= _PROGRESS_MIN_BYTES))
        bar = _ProgressBar(f"{verb} {a.input}", size) if show else None
        if bar is not None:
            stack.callback(bar.finish)
        out = Path(a.output).resolve()  # a symlink's target is replaced, not the link
        if a.output == "-":
            sys.stdout.flush()
            yield source, sys.stdout.buffer, size, bar
            sys.stdout.buffer.flush()
        elif out.exists() and not out.is_file():  # a device or FIFO: written as it is, nothing to rename
            try:
                destination = stack.enter_context(open(out, "wb"))
            except OSError as exc:
                raise InputError(f"cannot write {a.output}: {exc.strerror}") from None
            yield source, destination, size, bar
        else:
            try:
                fd, temp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
            except OSError as exc:
                raise InputError(f"cannot write {a.output}: {exc.strerror}") from None
            try:
                with os.fdopen(fd, "wb") as destination:
                    yield source, destination, size, bar
                os.replace(temp, out)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise


def _envelope_module() -> Any:
    try:
        from hsmkeys import envelope
    except ImportError as exc:
        raise ConfigError(f"needs the AWS Encryption SDK ({exc}): pip install 'hsmkeys[envelope]'") from None
    return envelope


def _cmd_encrypt_file(cli: _Cli) -> int:
    envelope = _envelope_module()
    a = cli.args
    context = _context(a.context) or {}
    with cli.store() as store, _envelope_files(cli, "encrypt") as (source, destination, size, bar):
        provider = envelope.KeyStoreMasterKeyProvider(store, key_ids=a.key_id)
        keys = provider if a.no_cache else envelope.caching_materials_manager(provider)
        header = envelope.encrypt_stream(source, destination, keys, context, source_length=size, progress=bar)
    if cli.as_json:
        _out_json(_envelope_summary(header))
    return EXIT_OK


def _cmd_decrypt_file(cli: _Cli) -> int:
    envelope = _envelope_module()
    a = cli.args
    expected = _context(a.context) or {}
    with cli.store() as store:
        # --key-id: only those keys (strict); none: any key of this store (the CLI holds the PIN).
        keys = (
            envelope.KeyStoreMasterKeyProvider(store, key_ids=a.key_id)
            if a.key_id
            else envelope.KeyStoreDiscoveryMasterKeyProvider(store)
        )
        try:
            with _envelope_files(cli, "decrypt") as (source, destination, _, bar):
                header = envelope.decrypt_stream(source, destination, keys, expected_context=expected, progress=bar)
        except envelope.EncryptionContextMismatchError as exc:
            _error(exc.code, f"encryption context mismatch: {exc.message}")
            return EXIT_NO
    if cli.as_json:
        _out_json(_envelope_summary(header))
    return EXIT_OK


def _envelope_summary(header: Any) -> dict[str, object]:
    return {
        "KeyIds": [edk.key_provider.key_info.decode("utf-8") for edk in header.encrypted_data_keys],
        "EncryptionContext": {k: v for k, v in header.encryption_context.items() if not k.startswith("aws-crypto-")},
        "Algorithm": header.algorithm.name,
        "FrameLength": header.frame_length,
    }


# ------------------------------------------------------------------ operations


@dataclass(frozen=True)
class _ServerProbe:
    url: str | None  # None: no address known (no config and no --endpoint)
    state: str  # up | unhealthy | down | unknown
    detail: str


def _server_endpoint(cli: _Cli) -> tuple[str, str | None] | None:
    """The URL a server should answer at and the CA file to trust for it, if known."""
    if cli.args.endpoint is not None:
        return cli.args.endpoint.rstrip("/"), os.environ.get("AWS_CA_BUNDLE")
    try:
        server = cli.settings().server
    except ConfigError:
        if cli.opener is None:
            raise
        return None  # an injected store may come without a config
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(server.host, server.host)
    if ":" in host:
        host = f"[{host}]"
    if server.tls_cert is not None:
        return f"https://{host}:{server.port}", str(server.tls_cert)
    return f"http://{host}:{server.port}", None


def _probe_server(cli: _Cli) -> _ServerProbe:
    """GET /healthz at the configured (or ``--endpoint``) address."""
    import ssl
    import urllib.error
    import urllib.request

    endpoint = _server_endpoint(cli)
    if endpoint is None:
        return _ServerProbe(None, "unknown", "no config: pass --endpoint URL to check a server")
    url, cafile = endpoint
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if url.startswith("https:"):
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cafile)))
    try:
        with urllib.request.build_opener(*handlers).open(f"{url}/healthz", timeout=_PROBE_TIMEOUT_S) as reply:
            return _ServerProbe(url, "up", f"answers (GET /healthz {reply.status})")
    except urllib.error.HTTPError as exc:
        return _ServerProbe(url, "unhealthy", f"answers GET /healthz with {exc.code}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return _ServerProbe(
            url, "down", f"not answering ({reason}); start one with: hsmkeys serve (or make run)"
        )


def _cmd_status(cli: _Cli) -> int:
    with cli.store() as store:
        status = store.status()
    probe = _probe_server(cli)
    if cli.as_json:
        _out_json(
            {
                "token_label": status.token_label,
                "module": status.module,
                "manufacturer": status.manufacturer,
                "model": status.model,
                "keys": status.keys,
                "server": {"url": probe.url, "state": probe.state, "detail": probe.detail},
            }
        )
        return EXIT_OK
    _table(
        [
            ("token", f"{status.token_label} ({status.manufacturer} {status.model})"),
            ("module", status.module),
            ("keys", status.keys),
            ("server", f"{probe.url} {probe.detail}" if probe.url is not None else probe.detail),
        ]
    )
    cmd = "hsmkeys" if cli.args.config is None else f"hsmkeys --config {cli.args.config}"
    _out()
    _out("try:")
    _out(f"  {cmd} keys create --description demo   # prints its KeyId")
    _out(f"  printf hello | {cmd} encrypt --key-id KEY_ID --context app=demo > hello.b64")
    _out(f"  {cmd} decrypt --context app=demo < hello.b64")
    return EXIT_OK


_MAINTAIN_LEASE_SECONDS = 300.0  # longer than any one run; released at the end


def _cmd_maintain(cli: _Cli) -> int:
    """One maintenance run, under the catalog's maintenance lease like a server's loop, so
    it never runs beside the instance (or host) that holds it."""
    holder = f"cli:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    with cli.store() as store:
        if not store.hold_maintenance_lease(holder, _MAINTAIN_LEASE_SECONDS):
            _out("another instance holds the maintenance lease; it does the due work (nothing done)")
            return EXIT_OK
        try:
            report = store.run_maintenance()
        finally:
            store.release_maintenance_lease(holder)
    if cli.as_json:
        _out_json({"rotated": list(report.rotated), "purged": list(report.purged), "swept": list(report.swept)})
        return EXIT_OK
    for key_id in report.rotated:
        _out(f"rotated {key_id}")
    for key_id in report.purged:
        _out(f"purged  {key_id}")
    for label in report.swept:
        _out(f"swept   {label} (orphan object of a crashed create or rotation)")
    if not (report.rotated or report.purged or report.swept):
        _out("nothing due")
    return EXIT_OK


def _cmd_doctor(cli: _Cli) -> int:
    with cli.store() as store:
        report = store.doctor(fix=cli.args.fix)
    if cli.as_json:
        _out_json(
            {
                "consistent": report.consistent,
                "orphan_objects": [ref.label for ref in report.orphan_objects],
                "missing_objects": [ref.label for ref in report.missing_objects],
                "unfinished_purges": list(report.unfinished_purges),
                "young_orphans": [ref.label for ref in report.young_orphans],
                "stale_wrapping_keys": [str(ref.key_uuid) for ref in report.stale_wrapping_keys],
                "destroyed": [ref.label for ref in report.destroyed],
                "fixed": report.fixed,
            }
        )
        return EXIT_OK if report.consistent else EXIT_NO
    if report.consistent:
        _out("consistent: every catalog version has its HSM object and no HSM object is orphaned")
        return EXIT_OK
    for ref in report.orphan_objects:
        _out(f"orphan HSM object {ref.label}: no catalog row (a create that crashed before commit)")
    for ref in report.missing_objects:
        _out(f"missing HSM object {ref.label}: the catalog references it but the token lacks it")
    for key_id in report.unfinished_purges:
        _out(f"unfinished purge of key {key_id}")
    for ref in report.stale_wrapping_keys:
        _out(f"stale import wrapping key of {ref.key_uuid}: older than its 24 h import token")
    if report.young_orphans:
        _out(
            f"{len(report.young_orphans)} orphan(s) first seen less than doctor_grace_seconds ago "
            "(maybe a create in flight): --fix leaves them until a later scan"
        )
    if report.fixed:
        _out(
            f"fixed: destroyed {len(report.destroyed)} orphan object(s) and "
            f"{len(report.stale_wrapping_keys)} wrapping key(s), "
            f"finished {len(report.unfinished_purges)} purge(s)"
        )
        if report.missing_objects:
            _out("not fixable: missing objects (restore the token from a backup)")
    else:
        fixable = len(report.orphan_objects) + len(report.unfinished_purges)
        if fixable:
            _out(f"run `hsmkeys doctor --fix` to repair {fixable} of these")
    return EXIT_NO


def _configured_audit_log(cli: _Cli) -> Path | None:
    """The config's audit_log; None without one (an injected store may come without config)."""
    try:
        return cli.settings().audit_log
    except ConfigError:
        if cli.opener is None:
            raise
        return None


def _cmd_audit_verify(cli: _Cli) -> int:
    """Check the given FILEs as one chain, or every chain of the configured log (the file
    and its workers' ``<audit_log>.w<n>`` chains, with their rotated files), each against
    the catalog's checkpoint for it. Exit 1 if any chain is damaged."""
    from hsmkeys.audit import (
        AuditVerification,
        audit_log_chains,
        audit_log_files,
        verify_audit_logs,
    )
    from hsmkeys.catalog.base import AuditCheckpoint

    configured = _configured_audit_log(cli)
    given = [Path(f) for f in cli.args.files]
    if not given and configured is None:
        raise InputError("give the audit log FILEs, or set audit_log in the config")
    # Without the audit writer: verifying must not append to (or create) the log it checks.
    opened = cli.opener() if cli.opener is not None else KeyStore.open(cli.settings(), audit=False)
    checked: list[tuple[Path | None, AuditVerification, AuditCheckpoint | None]] = []
    with opened as store:
        known = set(store.catalog_checkpoint_ids())

        def mac(data: bytes) -> bytes:
            return store.audit_mac(data, create=False)  # a missing key fails, never made

        if given:
            # The catalog's checkpoint of the chain whose live file is among those given.
            log_id = next((str(f.resolve()) for f in given if str(f.resolve()) in known), None)
            checkpoint = store.catalog_checkpoint(log_id) if log_id is not None else None
            checked.append((None, verify_audit_logs(given, mac, checkpoint=checkpoint), checkpoint))
        else:
            assert configured is not None
            for live in audit_log_chains(configured, sorted(known)):
                log_id = str(live.resolve())
                checkpoint = store.catalog_checkpoint(log_id) if log_id in known else None
                result = verify_audit_logs(audit_log_files(live), mac, checkpoint=checkpoint)
                checked.append((live, result, checkpoint))
    several = len(checked) > 1
    if cli.as_json:
        entries = [
            {
                "log": str(chain) if chain is not None else None,
                "ok": result.ok,
                "lines": result.lines,
                "first_bad_line": result.first_bad_line,
                "reason": result.reason,
                "file": str(result.file) if result.file is not None else None,
                "last_checkpoint": result.last_checkpoint,
                "catalog_checkpoint": checkpoint.sequence if checkpoint is not None else None,
            }
            for chain, result, checkpoint in checked
        ]
        # The first damaged chain (else the first chain) at the top, as for one chain.
        top = next((e for e in entries if not e["ok"]), entries[0])
        _out_json({**top, "ok": all(e["ok"] for e in entries), "chains": entries})
    for chain, result, _ in [] if cli.as_json else checked:
        prefix = f"{chain}: " if several else ""
        if result.ok:
            _out(f"{prefix}intact: {result.lines} line(s), last checkpoint seq {result.last_checkpoint}")
            if result.reason != "intact":
                _out(f"{prefix}{result.reason}")
        else:
            where = f"line {result.first_bad_line}" if result.first_bad_line is not None else "file"
            _out(f"{prefix}damaged: {result.file} {where}: {result.reason}")
    return EXIT_OK if all(result.ok for _, result, _ in checked) else EXIT_NO


def _cmd_audit_rotate(cli: _Cli) -> int:
    with cli.store() as store:
        rotated = store.rotate_audit_logs()
    if cli.as_json:
        _out_json({"rotated": str(rotated[0]), "chains": [str(path) for path in rotated]})
    else:
        for path in rotated:
            _out(f"rotated: {path}; new lines continue its chain in the live file")
    return EXIT_OK


def _serve_options(a: argparse.Namespace, configured: ServerSettings) -> ServerSettings:
    """``configured`` with the serve command's flags applied over it."""
    if (a.tls_cert is None) != (a.tls_key is None):
        raise ConfigError("serve: give both --tls-cert and --tls-key, or neither")
    tls_cert, tls_key = configured.tls_cert, configured.tls_key
    if a.tls_cert is not None:
        tls_cert, tls_key = Path(a.tls_cert).resolve(), Path(a.tls_key).resolve()
    return ServerSettings(
        host=configured.host if a.host is None else a.host,
        port=configured.port if a.port is None else a.port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        access_log=configured.access_log or a.access_log,
    )


def _cmd_serve(cli: _Cli) -> int:
    a = cli.args
    if not a.ephemeral and a.workers == 1 and cli.opener is None:
        # This process will open the HSM: load its module while the server is imported.
        KeyStore.start_loading_hsm(cli.settings())
    from hsmkeys.server import runner  # uvicorn and the app only for this command

    try:
        if a.ephemeral:
            server = _serve_options(a, ServerSettings())
            runner.run_ephemeral(
                host=server.host,
                port=server.port,
                workers=a.workers,
                region=a.region,
                account_id=a.account_id,
                server=server,
                insecure_http=a.insecure_http,
                no_audit=a.no_audit,
            )
        else:
            if a.region is not None or a.account_id is not None:
                raise ConfigError(
                    "serve: --region and --account-id are for --ephemeral; "
                    "set region and account_id in the config file"
                )
            settings = cli.settings()
            settings = dataclasses.replace(settings, server=_serve_options(a, settings.server))
            runner.run_server(
                settings, workers=a.workers, insecure_http=a.insecure_http, no_audit=a.no_audit
            )
    except runner.ServerError as exc:
        return _error("ServerError", str(exc))
    return EXIT_OK


# ------------------------------------------------------------------ init


@dataclass(frozen=True)
class _Step:
    item: str
    where: str
    action: str  # created | reused | updated


def _write_private(path: Path, text: str) -> None:
    """Write a new 0600 file, refusing to replace one that exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def _replace_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    _write_private(tmp, text)
    os.replace(tmp, path)


def _secret_file(path: Path, make: Callable[[], str], what: str, steps: list[_Step]) -> str:
    """The secret in ``path``, generated (0600) if the file does not exist yet."""
    if path.exists():
        if path.stat().st_size == 0:
            raise ConfigError(f"{what}: {path} is empty; delete it to have init generate one")
        value = read_secret_file(what, path)  # refuses a file group or others can read
        steps.append(_Step(what, str(path), "reused"))
        return value
    value = make()
    _write_private(path, value + "\n")
    steps.append(_Step(what, str(path), "created"))
    return value


def _softhsm_conf(settings: Settings, steps: list[_Step]) -> Path:
    from hsmkeys.hsm import softhsm

    if "softhsm" not in Path(settings.hsm.module).name.lower():
        raise ConfigError(
            f"hsm.module: init --create-token makes SoftHSM2 tokens only, not {settings.hsm.module}"
        )
    settings.hsm.apply_softhsm2_conf()
    value = os.environ.get("SOFTHSM2_CONF")
    if not value:
        raise ConfigError(
            "SOFTHSM2_CONF is not set (nor hsm.softhsm2_conf): init --create-token writes the token "
            "where it points and never into the system token directory "
            "(try SOFTHSM2_CONF=$PWD/var/softhsm2.conf)"
        )
    conf = Path(value).resolve()
    if conf == _SYSTEM_SOFTHSM_CONF:
        raise ConfigError(f"SOFTHSM2_CONF is the system config {conf}; point it at a project file")
    if conf.exists():
        steps.append(_Step("softhsm2.conf", str(conf), "reused"))
    else:
        softhsm.write_conf(conf.parent, conf.name)
        steps.append(_Step("softhsm2.conf", str(conf), "created"))
    token_dir = _conf_token_dir(conf)
    if token_dir is not None and token_dir.resolve().is_relative_to(_SYSTEM_TOKEN_DIR):
        raise ConfigError(f"{conf} keeps tokens in the system directory {token_dir}; use a project directory")
    return conf


def _conf_token_dir(conf: Path) -> Path | None:
    try:
        lines = conf.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"SOFTHSM2_CONF {conf}: {exc.strerror}") from None
    for line in lines:
        name, sep, value = line.partition("=")
        if sep and name.strip() == "directories.tokendir":
            return Path(value.strip())
    return None


def _create_token(settings: Settings, steps: list[_Step]) -> None:
    from hsmkeys.hsm import softhsm

    conf = _softhsm_conf(settings, steps)
    pin_file = settings.hsm.pin_file
    if pin_file is None:
        raise ConfigError("hsm.pin_file: init --create-token needs it, to store the PIN it generates")
    label = settings.hsm.token_label
    exists = softhsm.token_exists(conf, label)
    if exists and not pin_file.exists():
        raise ConfigError(
            f"hsm.pin_file: token {label!r} already exists in {conf} but {pin_file} does not, "
            "so its PIN is unknown; restore the file or remove the token"
        )
    pin = _secret_file(pin_file, lambda: secrets.token_hex(_PIN_BYTES), "user PIN", steps)
    so_pin = _secret_file(
        pin_file.with_name(pin_file.name + ".so"), lambda: secrets.token_hex(_PIN_BYTES), "SO PIN", steps
    )
    if exists:
        steps.append(_Step("token", label, "reused"))
    else:
        softhsm.init_token(conf, label, pin, so_pin)
        steps.append(_Step("token", label, "created"))


def _principal_secrets(settings: Settings, steps: list[_Step]) -> None:
    for principal in settings.principals:
        if principal.secret_access_key_file is not None:
            _secret_file(
                principal.secret_access_key_file,
                new_secret_access_key,
                f"secret of {principal.access_key_id}",
                steps,
            )
    if settings.principals:
        _credentials_file(settings, settings.principals[0], steps)


def _credentials_file(settings: Settings, principal: PrincipalSettings, steps: list[_Step]) -> None:
    """``credentials`` (AWS shared-credentials format, profile default) for the first principal."""
    folder = (
        principal.secret_access_key_file.parent
        if principal.secret_access_key_file is not None
        else settings.catalog.parent
    )
    path = folder / "credentials"
    text = (
        "# Written by hsmkeys init for " + principal.arn + "\n"
        "[default]\n"
        f"aws_access_key_id = {principal.access_key_id}\n"
        f"aws_secret_access_key = {principal.secret_access_key()}\n"
    )
    if path.exists():
        try:
            same = path.read_text(encoding="utf-8") == text
        except OSError:
            same = False
        if same:
            steps.append(_Step("credentials", str(path), "reused"))
            return
        _replace_private(path, text)
        steps.append(_Step("credentials", str(path), "updated"))
        return
    _write_private(path, text)
    steps.append(_Step("credentials", str(path), "created"))


def _self_signed_cert(settings: Settings, steps: list[_Step]) -> tuple[Path, Path, bool]:
    """The server's TLS pair (where the config puts it, else beside the catalog), made
    self-signed for localhost if neither file exists; and whether the config names it."""
    from hsmkeys.server.tls import write_self_signed_cert

    configured = settings.server.tls_cert is not None and settings.server.tls_key is not None
    folder = settings.catalog.parent
    cert = settings.server.tls_cert or folder / "tls-cert.pem"
    key = settings.server.tls_key or folder / "tls-key.pem"
    if cert.exists() and key.exists():
        read_secret_file("server.tls_key", key)  # refuses a key group or others can read
        steps += [_Step("tls cert", str(cert), "reused"), _Step("tls key", str(key), "reused")]
    elif cert.exists() or key.exists():
        present, missing = (cert, key) if cert.exists() else (key, cert)
        raise ConfigError(
            f"server.tls_cert/tls_key: {present} exists but {missing} does not; "
            "restore it, or delete both to have init make a new pair"
        )
    else:
        write_self_signed_cert(cert, key)
        steps += [_Step("tls cert", str(cert), "created"), _Step("tls key", str(key), "created")]
    return cert, key, configured


def _cmd_init(cli: _Cli) -> int:
    settings = cli.settings()
    steps: list[_Step] = []
    if cli.args.create_token:
        _create_token(settings, steps)
        _principal_secrets(settings, steps)
    tls = _self_signed_cert(settings, steps) if cli.args.self_signed_cert else None
    catalog_existed = settings.catalog.exists()
    with cli.store() as store:  # opening creates the catalog and proves the PIN works
        status = store.status()
    steps.append(_Step("catalog", str(settings.catalog), "reused" if catalog_existed else "created"))
    if cli.as_json:
        report: dict[str, object] = {
            "steps": [{"item": s.item, "where": s.where, "action": s.action} for s in steps],
            "token_label": status.token_label,
            "keys": status.keys,
        }
        if tls is not None:
            report["ca_bundle"] = str(tls[0])
        _out_json(report)
        return EXIT_OK
    width = max(len(s.item) for s in steps)
    for s in steps:
        _out(f"{s.item:<{width}}  {s.action:<7}  {s.where}")
    reused = all(s.action == "reused" for s in steps)
    _out(
        ("already initialised; reused everything. " if reused else "")
        + f"ready: token {status.token_label}, {status.keys} key(s)"
    )
    if tls is not None:
        cert, key, configured = tls
        if not configured:
            _out(f"serve over TLS: add to the config  server: {{tls_cert: {cert}, tls_key: {key}}}")
        _out(f"trust it (boto3, aws CLI): export AWS_CA_BUNDLE={cert}")
    return EXIT_OK


def _cmd_migrate_catalog(cli: _Cli) -> int:
    from hsmkeys.catalog.migrate import migrate_catalog

    password = os.environ.get(f"{ENV_PREFIX}CATALOG_PASSWORD") or None
    if cli.args.to_password_file is not None:
        password = read_secret_file("--to-password-file", Path(cli.args.to_password_file))
    summary = migrate_catalog(cli.args.source, cli.args.target, password=password)
    if cli.as_json:
        _out_json(dataclasses.asdict(summary))
        return EXIT_OK
    _table([(field.name, getattr(summary, field.name)) for field in dataclasses.fields(summary)])
    _out("copied and verified (counts and digest match)")
    return EXIT_OK


def _cmd_provision(cli: _Cli) -> int:
    # Its own exit codes (0 no changes, 2 changes pending, 1 error), as scripts/provision.py.
    from hsmkeys.provision.command import run

    return run(cli.args, open_store=cli.store)


# ==================================================================== parser


def _money(value: Decimal) -> str:
    return str(value.quantize(Decimal("0.000001")))


def _cmd_usage(cli: _Cli) -> int:
    from hsmkeys.usage import Pricing, parse_day

    a = cli.args
    try:
        since = parse_day(a.since) if a.since else None
        until = parse_day(a.until) if a.until else None
    except ValueError as exc:
        raise InputError(f"--since/--until: {exc} (use YYYY-MM-DD or an ISO date-time)") from None
    pricing = cli.settings().pricing if cli.opener is None or a.config else Pricing()
    with cli.store() as store:
        try:
            report = store.usage_report(since, until, by=a.by, pricing=pricing)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    groups = [*report.groups, report.total]
    if cli.as_json:
        _out_json(
            {
                "since": report.since.isoformat(),
                "until": report.until.isoformat(),
                "by": report.by,
                "pricing": {"key_month": str(pricing.key_month), "per_10k_requests": str(pricing.per_10k_requests)},
                "groups": [
                    {
                        "group": g.name,
                        "key_months": _money(g.key_months),
                        "requests": g.total_requests,
                        "requests_by_operation": dict(g.requests),
                        "key_cost": _money(g.key_cost),
                        "request_cost": _money(g.request_cost),
                        "cost": _money(g.cost),
                    }
                    for g in report.groups
                ],
                "total": {
                    "key_months": _money(report.total.key_months),
                    "requests": report.total.total_requests,
                    "requests_by_operation": dict(report.total.requests),
                    "key_cost": _money(report.total.key_cost),
                    "request_cost": _money(report.total.request_cost),
                    "cost": _money(report.total.cost),
                },
            }
        )
        return EXIT_OK
    operations = sorted({op for g in groups for op in g.requests})
    if a.csv:
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([report.by, "key_months", "requests", *operations, "key_cost", "request_cost", "cost"])
        for g in groups:
            writer.writerow(
                [g.name, _money(g.key_months), g.total_requests, *(g.requests.get(op, 0) for op in operations),
                 _money(g.key_cost), _money(g.request_cost), _money(g.cost)]
            )  # fmt: skip
        return EXIT_OK
    _out(f"usage {report.since.isoformat()} .. {report.until.isoformat()} by {report.by}")
    width = max(len(g.name) for g in groups)
    _out(f"{report.by:<{width}}  {'key-months':>12}  {'requests':>10}  {'cost':>12}  by operation")
    for g in groups:
        per_op = ", ".join(f"{op}={n}" for op, n in g.requests.items())
        _out(f"{g.name:<{width}}  {_money(g.key_months):>12}  {g.total_requests:>10}  {_money(g.cost):>12}  {per_op}")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    # --config and --json work before or after the command; SUPPRESS keeps a
    # sub-command from resetting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="F", default=argparse.SUPPRESS, help="config file")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")

    parser = argparse.ArgumentParser(
        prog="hsmkeys",
        description="An AWS KMS-compatible key service whose keys live in a PKCS#11 HSM.",
        epilog="Exit status: 0 ok, 1 a check or verification said no, 2 error.",
    )
    parser.add_argument(
        "--config", metavar="F", default=None, help="config file (default $HSMKEYS_CONFIG, else ./hsmkeys.yaml)"
    )
    parser.add_argument("--json", action="store_true", default=False, help="print machine-readable JSON")
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    def command(
        group: argparse._SubParsersAction[argparse.ArgumentParser], name: str, handler: Handler, text: str
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, parents=[common], help=text, description=text)
        sub.set_defaults(handler=handler, command_parser=sub)
        return sub

    def command_group(
        group: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str, metavar: str
    ) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        return group.add_parser(name, help=text, description=text).add_subparsers(
            dest=f"{name}_command", required=True, metavar=metavar
        )

    def input_file(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--in", dest="in_file", metavar="FILE", help="read the input from FILE, not stdin")

    def context(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--context",
            action="extend",
            type=_context_arg,
            metavar="K=V[,K=V]",
            help='encryption context: K=V pairs, comma-separated as in the aws CLI, or a JSON object; repeatable',
        )

    sub = command(commands, "init", _cmd_init, "create the catalog (and, for SoftHSM2, the token)")
    sub.add_argument(
        "--create-token",
        action="store_true",
        help="SoftHSM2 only, under $SOFTHSM2_CONF: generate PINs and principal secrets, init the token",
    )
    sub.add_argument(
        "--self-signed-cert",
        action="store_true",
        help="write a self-signed TLS certificate and key (0600) for localhost/127.0.0.1 at "
        "server.tls_cert/tls_key, else beside the catalog; prints the AWS_CA_BUNDLE to trust it",
    )
    sub = command(
        commands, "status", _cmd_status, "show the token, module, number of keys and whether a server answers"
    )
    sub.add_argument(
        "--endpoint",
        metavar="URL",
        default=None,
        help="check the server at URL (GET /healthz; default: the config's server.host and port)",
    )

    keys = commands.add_parser("keys", help="create and manage keys").add_subparsers(
        dest="keys_command", required=True, metavar="<keys command>"
    )
    sub = command(keys, "create", _cmd_keys_create, "create a key")
    sub.add_argument("--description", default="", help="free text shown by describe and list")
    sub.add_argument("--key-spec", default=None, metavar="S", help="e.g. SYMMETRIC_DEFAULT, ECC_NIST_P256, HMAC_256")
    sub.add_argument("--key-usage", default=None, metavar="U", help="ENCRYPT_DECRYPT, SIGN_VERIFY, GENERATE_VERIFY_MAC")
    sub.add_argument("--tag", action="append", type=_pair_arg, metavar="K=V", help="tag (repeat)")
    sub.add_argument(
        "--origin",
        default=None,
        choices=("AWS_KMS", "EXTERNAL"),
        help="EXTERNAL: no material until `hsmkeys keys import` (default AWS_KMS: made in the HSM)",
    )
    command(keys, "list", _cmd_keys_list, "list keys")
    for name, handler, text in (
        ("describe", _cmd_keys_describe, "show a key's metadata"),
        ("enable", _cmd_keys_set_enabled(True), "enable a key"),
        ("disable", _cmd_keys_set_enabled(False), "disable a key"),
        ("rotate", _cmd_keys_rotate, "rotate a symmetric key now (new version)"),
        ("cancel-deletion", _cmd_keys_cancel_deletion, "cancel a scheduled deletion (key becomes Disabled)"),
    ):
        command(keys, name, handler, text).add_argument("key", metavar="KEY", help="key id, ARN or alias")
    sub = command(keys, "import", _cmd_keys_import, "import key material into an Origin EXTERNAL key (BYOK)")
    sub.add_argument("key", metavar="KEY", help="key id or ARN of a key created with --origin EXTERNAL")
    sub.add_argument(
        "--material-file",
        required=True,
        metavar="F",
        help="raw key bytes (symmetric, HMAC) or a PKCS#8 PEM/DER private key (RSA, ECC)",
    )
    sub = command(keys, "schedule-deletion", _cmd_keys_schedule_deletion, "schedule a key's deletion")
    sub.add_argument("key", metavar="KEY", help="key id or ARN")
    sub.add_argument("--days", type=int, default=None, help="pending window, 7-30 (default 30)")

    rotation = command_group(keys, "rotation", "automatic rotation of a symmetric key", "<rotation command>")
    for name, text in (
        ("enable", "rotate the key automatically (maintenance makes the new version when due)"),
        ("disable", "stop rotating the key automatically"),
        ("status", "show whether the key rotates, how often and when next"),
    ):
        sub = command(rotation, name, _cmd_keys_rotation, text)
        sub.add_argument("key", metavar="KEY", help="key id or ARN")
        if name == "enable":
            sub.add_argument(
                "--period-days", type=int, default=None, metavar="N", help="rotate every N days, 90-2560 (default 365)"
            )
    sub = command(keys, "tag", _cmd_keys_tag, "add or replace tags on a key")
    sub.add_argument("key", metavar="KEY", help="key id or ARN")
    sub.add_argument("tags", nargs="+", type=_pair_arg, metavar="K=V", help="tags to set")
    sub = command(keys, "untag", _cmd_keys_untag, "remove tags from a key")
    sub.add_argument("key", metavar="KEY", help="key id or ARN")
    sub.add_argument("tag_keys", nargs="+", metavar="K", help="tag keys to remove")
    command(keys, "tags", _cmd_keys_tags, "list a key's tags").add_argument("key", metavar="KEY", help="key id or ARN")
    policy = command_group(keys, "policy", "read or replace a key's key policy", "<policy command>")
    command(policy, "get", _cmd_keys_policy_get, "print the key policy (JSON)").add_argument(
        "key", metavar="KEY", help="key id or ARN"
    )
    sub = command(policy, "put", _cmd_keys_policy_put, "replace the key policy with a JSON document")
    sub.add_argument("key", metavar="KEY", help="key id or ARN")
    sub.add_argument("file", metavar="FILE", help="the policy document; - reads stdin")
    sub.add_argument(
        "--bypass-policy-lockout-safety-check",
        action="store_true",
        help="accept a policy that would lock you out of PutKeyPolicy (as KMS's flag)",
    )

    grants = command_group(commands, "grants", "create, list and revoke grants on a key", "<grants command>")
    sub = command(grants, "create", _cmd_grants_create, "let a principal use a key; print the grant id and token")
    sub.add_argument("key", metavar="KEY", help="key id or ARN")
    sub.add_argument("--grantee", required=True, metavar="ARN", help="the principal the grant is for")
    sub.add_argument(
        "--operations",
        required=True,
        type=_operations_arg,
        metavar="OPS",
        help="comma-separated KMS operations, e.g. Encrypt,Decrypt,GenerateDataKey",
    )
    sub.add_argument("--name", default=None, metavar="N", help="a name for the grant (retries reuse it)")
    sub.add_argument(
        "--retiring-principal", default=None, metavar="ARN", help="a principal that may retire the grant"
    )
    command(grants, "list", _cmd_grants_list, "list a key's grants").add_argument(
        "key", metavar="KEY", help="key id or ARN"
    )
    sub = command(grants, "revoke", _cmd_grants_revoke, "revoke a grant")
    sub.add_argument("key", metavar="KEY", help="key id or ARN")
    sub.add_argument("grant_id", metavar="GRANT_ID", help="as printed by grants create or grants list")

    alias = commands.add_parser("alias", help="manage aliases").add_subparsers(
        dest="alias_command", required=True, metavar="<alias command>"
    )
    sub = command(alias, "create", _cmd_alias_create, "point a new alias at a key")
    sub.add_argument("name", metavar="NAME", help="alias/NAME (the prefix is added if missing)")
    sub.add_argument("key", metavar="KEY", help="key id or ARN")
    command(alias, "delete", _cmd_alias_delete, "delete an alias").add_argument(
        "name", metavar="NAME", help="alias/NAME (the prefix is added if missing)"
    )
    command(alias, "list", _cmd_alias_list, "list aliases")

    sub = command(commands, "encrypt", _cmd_encrypt, "encrypt stdin; print the base64 ciphertext blob")
    sub.add_argument("--key-id", required=True, metavar="ID", help="key id, ARN or alias")
    context(sub)
    input_file(sub)
    sub = command(commands, "decrypt", _cmd_decrypt, "decrypt a base64 blob from stdin; write the plaintext")
    sub.add_argument("--key-id", default=None, metavar="ID", help="optional: must match the blob's key")
    context(sub)
    input_file(sub)

    sub = command(
        commands, "data-key", _cmd_data_key, "GenerateDataKey: print a new data key and its encrypted copy (base64)"
    )
    sub.add_argument("--key-id", required=True, metavar="ID", help="key id, ARN or alias of a symmetric key")
    sub.add_argument(
        "--key-spec", default="AES_256", choices=["AES_256", "AES_128"], help="data key length (default AES_256)"
    )
    context(sub)

    for name, handler, text in (
        ("sign", _cmd_sign, "sign stdin; print the base64 signature"),
        ("verify", _cmd_verify, "verify a signature of stdin (exit 0 valid, 1 invalid)"),
    ):
        sub = command(commands, name, handler, text)
        sub.add_argument("--key-id", required=True, metavar="ID", help="key id, ARN or alias")
        sub.add_argument("--algorithm", required=True, metavar="A", help="e.g. ECDSA_SHA_256")
        sub.add_argument(
            "--message-type",
            default="RAW",
            choices=["RAW", "DIGEST"],
            help="RAW: the input is the message; DIGEST: it is already hashed (default RAW)",
        )
        if name == "verify":
            sub.add_argument(
                "--signature", required=True, type=_base64_arg, metavar="B64", help="the signature, base64"
            )
        input_file(sub)

    sub = command(commands, "public-key", _cmd_public_key, "print a key's public key (PEM)")
    sub.add_argument("key", metavar="KEY", help="key id, ARN or alias")
    sub.add_argument("--der", action="store_true", help="write DER bytes instead of PEM")

    for name, handler, text in (
        ("mac", _cmd_mac, "HMAC stdin; print the base64 MAC"),
        ("verify-mac", _cmd_verify_mac, "verify a MAC of stdin (exit 0 valid, 1 invalid)"),
    ):
        sub = command(commands, name, handler, text)
        sub.add_argument("--key-id", required=True, metavar="ID", help="key id, ARN or alias")
        sub.add_argument("--algorithm", required=True, metavar="A", help="e.g. HMAC_SHA_256")
        if name == "verify-mac":
            sub.add_argument("--mac", required=True, type=_base64_arg, metavar="B64", help="the MAC, base64")
        input_file(sub)

    for name, handler, text in (
        ("encrypt-file", _cmd_encrypt_file, "encrypt IN to OUT as an AWS Encryption SDK message (streamed)"),
        (
            "decrypt-file",
            _cmd_decrypt_file,
            "decrypt an AWS Encryption SDK message IN to OUT (streamed); with --context, exit 1 "
            "unless the message's encryption context has those pairs",
        ),
    ):
        sub = command(commands, name, handler, text)
        sub.add_argument("input", metavar="IN", help="input file, - for stdin")
        sub.add_argument("output", metavar="OUT", help="output file (written 0600, in place on success), - for stdout")
        if name == "encrypt-file":
            sub.add_argument(
                "--key-id", required=True, action="append", metavar="ID", help="key id, ARN or alias (repeat: each wraps the data key)"
            )
            sub.add_argument("--no-cache", action="store_true", help="no data key cache (one GenerateDataKey per message)")
        else:
            sub.add_argument(
                "--key-id", action="append", metavar="ID", help="decrypt only with these keys (default: any key of this store)"
            )
        context(sub)  # decrypt-file: exit 1 unless the message's encryption context has these pairs
        sub.add_argument("--progress", action="store_true", help="progress on stderr (default: only on a TTY, large files)")

    command(commands, "maintain", _cmd_maintain, "do due rotations and purges now")
    sub = command(
        commands,
        "migrate-catalog",
        _cmd_migrate_catalog,
        "copy a SQLite catalog into an empty PostgreSQL one and verify the copy (stop writers first)",
    )
    sub.add_argument(
        "--from", dest="source", required=True, metavar="sqlite:PATH", help="the SQLite catalog to copy"
    )
    sub.add_argument(
        "--to", dest="target", required=True, metavar="URL",
        help="postgresql://user@host:port/db; password from $HSMKEYS_CATALOG_PASSWORD or --to-password-file",
    )  # fmt: skip
    sub.add_argument("--to-password-file", default=None, metavar="F", help="file (mode 0600) holding the password")
    sub = command(
        commands,
        "usage",
        _cmd_usage,
        "key-months, requests and cost per key, alias, account, operation or tag (pricing: in the config)",
    )
    sub.add_argument("--since", metavar="D", default=None, help="start, YYYY-MM-DD (UTC; default: this month's 1st)")
    sub.add_argument("--until", metavar="D", default=None, help="end, exclusive (default: now)")
    sub.add_argument(
        "--by", default="key", metavar="key|alias|account|operation|tag:<name>", help="grouping (default key)"
    )
    sub.add_argument("--csv", action="store_true", help="print CSV")
    sub = command(commands, "doctor", _cmd_doctor, "compare HSM and catalog (exit 1 if they drifted)")
    sub.add_argument("--fix", action="store_true", help="destroy orphan objects and finish purges")

    audit = commands.add_parser("audit", help="audit log tools").add_subparsers(
        dest="audit_command", required=True, metavar="<audit command>"
    )
    sub = command(audit, "verify", _cmd_audit_verify, "check audit log files, oldest first (exit 1 if damaged)")
    sub.add_argument(
        "files", nargs="*", metavar="FILE", help="default: the config's audit_log and its rotated files"
    )
    command(audit, "rotate", _cmd_audit_rotate, "rename the audit log aside and start a linked one")

    from hsmkeys.provision.command import add_arguments as provision_arguments

    provision = commands.add_parser(
        "provision", help="plan/apply keys from a YAML file (exit 0 no changes, 2 pending, 1 error)"
    ).add_subparsers(dest="provision_command", required=True, metavar="plan|apply")
    for name, text in (("plan", "show what apply would change"), ("apply", "make the planned changes")):
        provision_arguments(command(provision, name, _cmd_provision, text), name)

    sub = command(commands, "serve", _cmd_serve, "serve the KMS API over HTTP(S)")
    sub.add_argument("--host", default=None, help=f"listen address (default server.host, else {DEFAULT_HOST})")
    sub.add_argument("--port", type=int, default=None, help=f"(default server.port, else {DEFAULT_PORT})")
    sub.add_argument(
        "--workers", type=int, default=1, metavar="N", help="server processes on the same token and catalog"
    )
    sub.add_argument("--ephemeral", action="store_true", help="throwaway token and catalog; no config needed")
    sub.add_argument("--tls-cert", metavar="F", default=None, help="PEM certificate (chain): serve HTTPS")
    sub.add_argument("--tls-key", metavar="F", default=None, help="PEM private key of --tls-cert")
    sub.add_argument(
        "--insecure-http",
        action="store_true",
        help="allow plain HTTP on a non-loopback address (only behind a TLS-terminating proxy)",
    )
    sub.add_argument(
        "--no-audit",
        action="store_true",
        help="serve although audit_log is not set; with --ephemeral, make no audit log (nothing is audited)",
    )
    sub.add_argument(
        "--access-log", action="store_true", help="log one line per request to stderr (also server.access_log)"
    )
    sub.add_argument("--region", default=None, help="--ephemeral: region (default $HSMKEYS_REGION, else us-east-1)")
    sub.add_argument(
        "--account-id", default=None, help="--ephemeral: account id (default $HSMKEYS_ACCOUNT_ID, else 111122223333)"
    )
    return parser


# ==================================================================== entry point


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _require_single_positionals(args: argparse.Namespace) -> None:
    """A usage error (SystemExit 2) for a one-value positional argparse left as a list:
    Python 3.11's argparse gives ``[]`` for ``FILE`` in ``keys policy put KEY -- -h --``."""
    parser: argparse.ArgumentParser = args.command_parser
    for action in parser._actions:
        one_value = not action.option_strings and action.nargs is None and action.type is None
        if one_value and isinstance(getattr(args, action.dest), list):
            parser.error(f"argument {action.metavar or action.dest}: expected one argument")


def main(argv: Sequence[str] | None = None, *, open_store: StoreOpener | None = None) -> int:
    """Run one command; return the exit status (0 ok, 1 a check said no, 2 error).

    ``open_store`` replaces opening the configured key store (tests pass an in-memory one).
    """
    try:
        args = _parser().parse_args(argv)
        _require_single_positionals(args)
    except SystemExit as exc:  # --help or a usage error; argparse has printed it
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    cli = _Cli(args, open_store)
    handler: Handler = args.handler
    try:
        status = handler(cli)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except KMSError as exc:
        code, message = exc.code, exc.message
    except ConfigError as exc:
        code, message = "ConfigError", str(exc)
    except InputError as exc:
        code, message = InputError.code, str(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `hsmkeys keys list | head`: the reader left, not an error
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return _error(code, message)


def _error(code: str, message: str) -> int:
    """Print the one-line error report and return the error exit status."""
    sys.stdout.flush()
    print(f"error: {code}: {_one_line(message)}" if message else f"error: {code}", file=sys.stderr)
    return EXIT_ERROR
