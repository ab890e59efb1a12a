"""The provisioning file: read with YAML's node API and validated whole before anything runs.

Every problem is reported with the file, the LINE, the entry (its alias, else
``keys[N]``) and the field: ``keys.yaml:12: alias/payments: rotation.period_days: must
be an integer from 90 to 2560, got 'often'``. All problems are collected and raised
together as one :class:`ProvisionError`; unknown fields are problems too.

A field left out of an entry is not managed (whatever the key has is kept), except
``enabled`` (default true) and ``key_spec``/``key_usage``/``origin`` (defaults, checked
against the existing key). ``tags: {}``, ``grants: []`` and ``extra_aliases: []``
therefore mean "none", while leaving them out means "leave as they are".
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from hsmkeys.provision.keymaterial import KeyMaterial, load_key_material

__all__ = [
    "PROVISION_TAG",
    "DesiredFile",
    "GrantSpec",
    "KeyEntry",
    "ProvisionError",
    "RotationSpec",
    "State",
    "load_file",
    "one_line",
    "parse_text",
]

#: Tag put on every key provision creates, so a run interrupted between CreateKey and
#: CreateAlias finds ("adopts") its key instead of creating a second one.
PROVISION_TAG = "hsmkeys:provision-alias"

# From the botocore KMS model (service-2.json); repeated here so that validating a file
# does not need the model loaded, and checked against it in the tests.
KEY_SPECS = (
    "RSA_2048", "RSA_3072", "RSA_4096", "ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521",
    "ECC_SECG_P256K1", "SYMMETRIC_DEFAULT", "HMAC_224", "HMAC_256", "HMAC_384", "HMAC_512",
    "SM2", "ML_DSA_44", "ML_DSA_65", "ML_DSA_87", "ECC_NIST_EDWARDS25519",
    "ML_KEM_512", "ML_KEM_768", "ML_KEM_1024",
)  # fmt: skip
KEY_USAGES = (
    "SIGN_VERIFY", "ENCRYPT_DECRYPT", "GENERATE_VERIFY_MAC", "KEY_AGREEMENT", "ENCAPSULATE_DECAPSULATE",
)  # fmt: skip
ORIGINS = ("AWS_KMS", "EXTERNAL")  # CloudHSM and external key stores are not provisioned here
GRANT_OPERATIONS = (
    "Decrypt", "Encrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "ReEncryptFrom",
    "ReEncryptTo", "Sign", "Verify", "GetPublicKey", "CreateGrant", "RetireGrant", "DescribeKey",
    "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext", "GenerateMac", "VerifyMac",
    "DeriveSharedSecret", "Encapsulate", "Decapsulate",
)  # fmt: skip
_NAME_PATTERN = re.compile(r"[a-zA-Z0-9:/_-]+")  # AliasNameType and GrantNameType
_MAX_NAME = 256
_MAX_DESCRIPTION = 8192
_MAX_POLICY = 32768  # KMS's documented key policy size limit
_MAX_TAG_KEY, _MAX_TAG_VALUE = 128, 256
ROTATION_DAYS = (90, 2560)
DELETION_DAYS = (7, 30)
DEFAULT_DELETION_DAYS = 30

# YAML tags whose scalars are taken as constructed; any other scalar is its source text
# (so an unquoted policy "Version: 2012-10-17" stays the string, not a date).
_STR, _INT, _BOOL, _NULL, _FLOAT = (
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:float",
)


class ProvisionError(Exception):
    """The file, the current state or a KMS call makes provisioning impossible.

    ``problems`` holds one line per problem, each naming file:line, entry and field.
    """

    def __init__(self, problems: str | list[str] | tuple[str, ...]) -> None:
        found = (problems,) if isinstance(problems, str) else tuple(problems)
        self.problems = tuple(one_line(p) for p in found)
        super().__init__("\n".join(self.problems))


def one_line(text: str) -> str:
    """``text`` with control characters escaped (a file name or value may hold a newline)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class State(StrEnum):
    PRESENT = "present"
    ABSENT = "absent"


@dataclass(frozen=True, slots=True)
class RotationSpec:
    enabled: bool
    period_days: int | None  # None: the KMS default (365) when enabled


@dataclass(frozen=True, slots=True)
class GrantSpec:
    name: str
    grantee: str
    operations: tuple[str, ...]  # sorted
    retiring_principal: str | None
    context_equals: Mapping[str, str] | None
    context_subset: Mapping[str, str] | None
    line: int


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One ``keys:`` entry; ``None`` means "not managed" (see the module docstring)."""

    alias: str
    file: str  # the file's name as given, for messages
    lines: Mapping[str, int]  # field -> line of its value (the entry's line under "")
    state: State = State.PRESENT
    description: str | None = None
    key_spec: str = "SYMMETRIC_DEFAULT"
    key_usage: str = "ENCRYPT_DECRYPT"
    origin: str = "AWS_KMS"
    rotation: RotationSpec | None = None
    tags: Mapping[str, str] | None = None
    policy: Mapping[str, Any] | None = None  # parsed JSON document
    grants: tuple[GrantSpec, ...] | None = None
    extra_aliases: tuple[str, ...] | None = None
    enabled: bool = True
    key_material: KeyMaterial | None = field(default=None, repr=False)
    pending_window_days: int = DEFAULT_DELETION_DAYS

    def where(self, field_name: str) -> str:
        """``keys.yaml:7: alias/x: field`` for a message about ``field_name``."""
        line = self.lines.get(field_name.split(".")[0], self.lines[""])
        return f"{self.file}:{line}: {self.alias}: {field_name}"


@dataclass(frozen=True, slots=True)
class DesiredFile:
    path: Path
    entries: tuple[KeyEntry, ...]


# ==================================================================== node reading


_T = TypeVar("_T")


class _Reader:
    """Walks the composed node tree, collecting problems instead of stopping at the first."""

    def __init__(self, name: str, base_dir: Path) -> None:
        self.name = name
        self.base_dir = base_dir
        self.problems: list[str] = []
        self._constructor = SafeConstructor()

    def problem(self, node: Node, entry: str, field_name: str, message: str) -> None:
        self.problems.append(f"{self.name}:{node.start_mark.line + 1}: {entry}: {field_name}: {message}")

    # -------------------------------------------------------------- scalars

    def plain(self, node: Node) -> Any:
        """A scalar's Python value (str/int/bool/None/float; any other tag: its text)."""
        assert isinstance(node, ScalarNode)
        if node.tag in (_STR, _INT, _BOOL, _NULL, _FLOAT):
            try:
                return self._constructor.construct_object(node, deep=True)
            except (ConstructorError, ValueError):
                return node.value
        return node.value

    def string(self, node: Node, entry: str, field_name: str) -> str | None:
        value = self.plain(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, str):
            self.problem(node, entry, field_name, f"must be a string, got {_describe(self, node)}")
            return None
        return value

    def integer(self, node: Node, entry: str, field_name: str, low: int, high: int) -> int | None:
        value = self.plain(node) if isinstance(node, ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.problem(
                node, entry, field_name, f"must be an integer from {low} to {high}, got {_describe(self, node)}"
            )
            return None
        return value

    def boolean(self, node: Node, entry: str, field_name: str) -> bool | None:
        value = self.plain(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, bool):
            self.problem(node, entry, field_name, f"must be true or false, got {_describe(self, node)}")
            return None
        return value

    def choice(self, node: Node, entry: str, field_name: str, allowed: tuple[str, ...]) -> str | None:
        value = self.string(node, entry, field_name)
        if value is not None and value not in allowed:
            self.problem(node, entry, field_name, f"must be one of {', '.join(allowed)}, got {value!r}")
            return None
        return value

    def identifier(self, node: Node, entry: str, field_name: str, *, alias: bool) -> str | None:
        value = self.string(node, entry, field_name)
        if value is None:
            return None
        if alias and not value.startswith("alias/"):
            self.problem(node, entry, field_name, f"must start with 'alias/', got {value!r}")
        elif alias and value.startswith("alias/aws/"):
            self.problem(node, entry, field_name, f"'alias/aws/' is reserved for AWS managed keys, got {value!r}")
        elif alias and len(value) == len("alias/"):
            self.problem(node, entry, field_name, "the alias needs a name after 'alias/'")
        elif not 1 <= len(value) <= _MAX_NAME or not _NAME_PATTERN.fullmatch(value):
            self.problem(
                node,
                entry,
                field_name,
                f"must be 1-{_MAX_NAME} characters of a-z A-Z 0-9 : / _ -, got {_show(value)}",
            )
        else:
            return value
        return None

    # -------------------------------------------------------------- collections

    def mapping(self, node: Node, entry: str, field_name: str) -> dict[str, tuple[Node, Node]] | None:
        """Field name -> (key node, value node); non-string and duplicate keys are problems."""
        if not isinstance(node, MappingNode):
            self.problem(node, entry, field_name, f"must be a mapping, got {_describe(self, node)}")
            return None
        out: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            key = self.plain(key_node) if isinstance(key_node, ScalarNode) else None
            if not isinstance(key, str):
                self.problem(key_node, entry, field_name, f"keys must be strings, got {_describe(self, key_node)}")
                continue
            if key in out:
                first = out[key][0].start_mark.line + 1
                self.problem(key_node, entry, _join(field_name, key), f"given twice (first on line {first})")
                continue
            out[key] = (key_node, value_node)
        return out

    def fields(
        self, node: Node, entry: str, field_name: str, allowed: tuple[str, ...]
    ) -> dict[str, Node] | None:
        """A mapping with only ``allowed`` keys; each unknown key is a problem."""
        found = self.mapping(node, entry, field_name)
        if found is None:
            return None
        out: dict[str, Node] = {}
        for key, (key_node, value_node) in found.items():
            if key not in allowed:
                self.problem(
                    key_node, entry, _join(field_name, key), f"unknown field (allowed: {', '.join(allowed)})"
                )
            else:
                out[key] = value_node
        return out

    def sequence(self, node: Node, entry: str, field_name: str) -> list[Node] | None:
        if not isinstance(node, SequenceNode):
            self.problem(node, entry, field_name, f"must be a list, got {_describe(self, node)}")
            return None
        return list(node.value)

    def string_map(
        self, node: Node, entry: str, field_name: str, *, max_key: int = 256, max_value: int = 256
    ) -> dict[str, str] | None:
        found = self.mapping(node, entry, field_name)
        if found is None:
            return None
        out: dict[str, str] = {}
        ok = True
        for key, (key_node, value_node) in found.items():
            path = _join(field_name, key)
            value = self.string(value_node, entry, path)
            if not 1 <= len(key) <= max_key:
                self.problem(key_node, entry, path, f"a key must be 1-{max_key} characters")
                ok = False
            elif value is not None and len(value) > max_value:
                self.problem(value_node, entry, path, f"a value must be at most {max_value} characters")
                ok = False
            elif value is None:
                ok = False
            else:
                out[key] = value
        return out if ok else None

    def json_value(self, node: Node, entry: str, field_name: str) -> Any:
        """A JSON value from an inline YAML mapping/list/scalar (for ``policy``)."""
        if isinstance(node, MappingNode):
            found = self.mapping(node, entry, field_name)
            if found is None:
                return None
            return {k: self.json_value(v, entry, _join(field_name, k)) for k, (_, v) in found.items()}
        if isinstance(node, SequenceNode):
            return [self.json_value(v, entry, f"{field_name}[{i}]") for i, v in enumerate(node.value)]
        value = self.plain(node)
        if (isinstance(value, float) and value != value) or value in (float("inf"), float("-inf")):
            self.problem(node, entry, field_name, "is not a JSON number")
            return None
        return value


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(reader: _Reader, node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    value = reader.plain(node)
    if value is None:
        return "nothing (null)"
    kind = {bool: "boolean", int: "integer", float: "number", str: "string"}.get(type(value), "value")
    return f"{kind} {_show(value)}"


# ==================================================================== the file


_ENTRY_FIELDS = (
    "alias",
    "state",
    "description",
    "key_spec",
    "key_usage",
    "origin",
    "rotation",
    "tags",
    "policy",
    "policy_file",
    "grants",
    "extra_aliases",
    "enabled",
    "key_material_file",
    "pending_window_days",
)
_ABSENT_FIELDS = ("alias", "state", "pending_window_days")
_GRANT_FIELDS = ("name", "grantee", "operations", "retiring_principal", "constraints")
_CONSTRAINT_FIELDS = ("encryption_context_equals", "encryption_context_subset")


def default_usage(spec: str) -> str | None:
    """KeyUsage when the entry gives none; None when the spec has no obvious one (RSA)."""
    if spec == "SYMMETRIC_DEFAULT":
        return "ENCRYPT_DECRYPT"
    if spec.startswith("HMAC_"):
        return "GENERATE_VERIFY_MAC"
    if spec.startswith("ECC_") or spec in ("SM2", "ML_DSA_44", "ML_DSA_65", "ML_DSA_87"):
        return "SIGN_VERIFY"
    if spec.startswith("ML_KEM_"):
        return "ENCAPSULATE_DECAPSULATE"
    return None


def _allowed_usages(spec: str) -> tuple[str, ...] | None:
    from hsmkeys import keyspecs
    from hsmkeys.models import KeySpec

    try:
        return tuple(str(u) for u in keyspecs.ALLOWED_USAGES[KeySpec(spec)])
    except (ValueError, KeyError):
        return None


def _grantable(spec: str, usage: str) -> frozenset[str] | None:
    """The grant operations a key of this spec and usage supports (None: not a served pair)."""
    from hsmkeys import keyspecs
    from hsmkeys.models import KeySpec, KeyUsage

    try:
        return keyspecs.grant_operations(KeySpec(spec), KeyUsage(usage))
    except ValueError:  # a spec or usage hsmkeys does not serve (reported elsewhere)
        return None


def load_file(path: str | Path) -> DesiredFile:
    """Read and validate a provisioning file. Raises ProvisionError listing every problem."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ProvisionError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ProvisionError(f"{path}: not UTF-8 text") from None
    return parse_text(text, name=str(path), base_dir=path.parent)


def parse_text(text: str, *, name: str, base_dir: Path) -> DesiredFile:
    """Validate a provisioning document; files it names are relative to ``base_dir``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"{mark.line + 1}:" if mark is not None else ""
        raise ProvisionError(f"{name}:{line} not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ProvisionError(f"{name}: not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ProvisionError(f"{name}: not valid YAML: nested too deeply") from None
    if root is None:
        raise ProvisionError(f"{name}:1: the file is empty; expected a mapping with 'keys:'")
    reader = _Reader(name, base_dir)
    try:
        entries = _read_root(reader, root)
    except RecursionError:
        raise ProvisionError(f"{name}: the document is nested too deeply") from None
    if reader.problems:
        raise ProvisionError(reader.problems)
    return DesiredFile(Path(name), tuple(entries))


def _read_root(reader: _Reader, root: Node) -> list[KeyEntry]:
    top = reader.fields(root, "file", "", ("keys",))
    if top is None:
        return []
    keys_node = top.get("keys")
    if keys_node is None:
        reader.problem(root, "file", "keys", "required (a list of key entries)")
        return []
    items = reader.sequence(keys_node, "file", "keys")
    if items is None:
        return []
    entries = [_read_entry(reader, item, index) for index, item in enumerate(items)]
    found = [e for e in entries if e is not None]
    _check_unique_aliases(reader, found)
    return found


def _check_unique_aliases(reader: _Reader, entries: list[KeyEntry]) -> None:
    seen: dict[str, str] = {}
    for entry in entries:
        names = [("alias", entry.alias, entry.lines["alias"])]
        names += [("extra_aliases", a, entry.lines["extra_aliases"]) for a in entry.extra_aliases or ()]
        for field_name, alias, line in names:
            if alias in seen:
                reader.problems.append(
                    f"{reader.name}:{line}: {entry.alias}: {field_name}: {alias} is already used by {seen[alias]}"
                )
            else:
                seen[alias] = f"the entry on line {entry.lines['']}"


def _peek_alias(node: Node) -> str | None:
    """The entry's alias as written, to name the entry in problems found before it is read."""
    if isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.value == "alias" and isinstance(value_node, ScalarNode):
                return value_node.value if value_node.value.startswith("alias/") else None
    return None


def _read_entry(reader: _Reader, node: Node, index: int) -> KeyEntry | None:
    label = f"keys[{index}]"
    before = len(reader.problems)
    found = reader.mapping(node, _peek_alias(node) or label, "")
    if found is None:
        return None
    alias = None
    if "alias" not in found:
        reader.problem(node, label, "alias", "required")
    else:
        alias = reader.identifier(found["alias"][1], label, "alias", alias=True)
    entry = alias or label  # later problems name the entry by its alias when it has one
    fields: dict[str, Node] = {}
    for key, (key_node, value_node) in found.items():
        if key in _ENTRY_FIELDS:
            fields[key] = value_node
        else:
            reader.problem(key_node, entry, key, f"unknown field (allowed: {', '.join(_ENTRY_FIELDS)})")
    lines = {"": node.start_mark.line + 1} | {k: v.start_mark.line + 1 for k, v in fields.items()}
    values: dict[str, Any] = {}

    def get(name: str, read: Callable[[Node, str], _T | None]) -> None:
        if name in fields:
            value = read(fields[name], name)
            if value is not None:
                values[name] = value

    get("state", lambda n, f: reader.choice(n, entry, f, tuple(s.value for s in State)))
    state = State(values.get("state", State.PRESENT))
    if state is State.ABSENT:
        for name in fields:
            if name not in _ABSENT_FIELDS:
                reader.problem(fields[name], entry, name, "not allowed with state: absent")
        get("pending_window_days", lambda n, f: reader.integer(n, entry, f, *DELETION_DAYS))
        if alias is None or len(reader.problems) > before:
            return None
        return KeyEntry(
            alias=alias,
            file=reader.name,
            lines=MappingProxyType(lines),
            state=state,
            pending_window_days=values.get("pending_window_days", DEFAULT_DELETION_DAYS),
        )
    if "pending_window_days" in fields:
        reader.problem(fields["pending_window_days"], entry, "pending_window_days", "only allowed with state: absent")

    get("description", lambda n, f: _description(reader, n, entry, f))
    get("key_spec", lambda n, f: reader.choice(n, entry, f, KEY_SPECS))
    get("key_usage", lambda n, f: reader.choice(n, entry, f, KEY_USAGES))
    get("origin", lambda n, f: reader.choice(n, entry, f, ORIGINS))
    get("enabled", lambda n, f: reader.boolean(n, entry, f))
    get("rotation", lambda n, f: _rotation(reader, n, entry, f))
    get("tags", lambda n, f: _tags(reader, n, entry, f))
    get("policy", lambda n, f: _inline_policy(reader, n, entry, f))
    get("policy_file", lambda n, f: _policy_file(reader, n, entry, f))
    get("grants", lambda n, f: _grants(reader, n, entry, f))
    get("extra_aliases", lambda n, f: _extra_aliases(reader, n, entry, f, alias))

    spec = values.get("key_spec", "SYMMETRIC_DEFAULT")
    usage = values.get("key_usage") or default_usage(spec)
    origin = values.get("origin", "AWS_KMS")
    spec_known = "key_spec" not in fields or "key_spec" in values
    if spec_known and usage is None:
        reader.problem(fields["key_spec"], entry, "key_usage", f"required for {spec} (e.g. ENCRYPT_DECRYPT or SIGN_VERIFY)")
    allowed = _allowed_usages(spec)
    if spec_known and usage is not None and allowed is not None and usage not in allowed:
        where = fields.get("key_usage", fields.get("key_spec", node))
        reader.problem(where, entry, "key_usage", f"{usage} is not allowed for {spec} (allowed: {', '.join(allowed)})")
    grantable = None  # checked only against a spec and usage that fit each other
    if spec_known and usage is not None and (allowed is None or usage in allowed):
        grantable = _grantable(spec, usage)
    if grantable is not None:
        for grant in values.get("grants") or ():
            unsupported = [op for op in grant.operations if op not in grantable]
            if unsupported:
                reader.problem(
                    fields["grants"], entry, f"grants ({grant.name})",
                    f"{', '.join(unsupported)} not supported by a key with key_spec {spec} and key_usage {usage}",
                )  # fmt: skip
    if "policy" in fields and "policy_file" in fields:
        reader.problem(fields["policy_file"], entry, "policy_file", "give policy or policy_file, not both")
    rotation: RotationSpec | None = values.get("rotation")
    if rotation is not None and (spec != "SYMMETRIC_DEFAULT" or origin != "AWS_KMS"):
        reader.problem(
            fields["rotation"], entry, "rotation", "automatic rotation is only for SYMMETRIC_DEFAULT keys with origin AWS_KMS"
        )
    material: KeyMaterial | None = None
    if origin == "EXTERNAL":
        if "key_material_file" not in fields:
            reader.problem(fields.get("origin", node), entry, "key_material_file", "required with origin: EXTERNAL")
        else:
            material = _key_material(reader, fields["key_material_file"], entry, spec, usage)
    elif "key_material_file" in fields:
        reader.problem(fields["key_material_file"], entry, "key_material_file", "only allowed with origin: EXTERNAL")

    if alias is None or usage is None or len(reader.problems) > before:
        return None
    policy = values.get("policy", values.get("policy_file"))
    return KeyEntry(
        alias=alias,
        file=reader.name,
        lines=MappingProxyType(lines),
        state=state,
        description=values.get("description"),
        key_spec=spec,
        key_usage=usage,
        origin=origin,
        rotation=rotation,
        tags=MappingProxyType(values["tags"]) if "tags" in values else None,
        policy=policy,
        grants=values.get("grants"),
        extra_aliases=values.get("extra_aliases"),
        enabled=values.get("enabled", True),
        key_material=material,
    )


def _description(reader: _Reader, node: Node, entry: str, field_name: str) -> str | None:
    value = reader.string(node, entry, field_name)
    if value is not None and len(value) > _MAX_DESCRIPTION:
        reader.problem(node, entry, field_name, f"must be at most {_MAX_DESCRIPTION} characters")
        return None
    return value


def _rotation(reader: _Reader, node: Node, entry: str, field_name: str) -> RotationSpec | None:
    fields = reader.fields(node, entry, field_name, ("enabled", "period_days"))
    if fields is None:
        return None
    if "enabled" not in fields:
        reader.problem(node, entry, f"{field_name}.enabled", "required (true or false)")
        return None
    enabled = reader.boolean(fields["enabled"], entry, f"{field_name}.enabled")
    period = None
    if "period_days" in fields:
        period = reader.integer(fields["period_days"], entry, f"{field_name}.period_days", *ROTATION_DAYS)
        if period is None:
            return None
        if enabled is False:
            reader.problem(fields["period_days"], entry, f"{field_name}.period_days", "only allowed with enabled: true")
            return None
    return None if enabled is None else RotationSpec(enabled, period)


def _tags(reader: _Reader, node: Node, entry: str, field_name: str) -> dict[str, str] | None:
    tags = reader.string_map(node, entry, field_name, max_key=_MAX_TAG_KEY, max_value=_MAX_TAG_VALUE)
    if tags is None:
        return None
    for key in tags:
        if key == PROVISION_TAG or key.startswith("aws:"):
            reader.problem(node, entry, f"{field_name}.{key}", "this tag key is reserved")
            return None
    return tags


def _check_policy_document(
    reader: _Reader, node: Node, entry: str, field_name: str, document: Any, size: int
) -> Mapping[str, Any] | None:
    if not isinstance(document, dict):
        reader.problem(node, entry, field_name, "a key policy must be a JSON object")
        return None
    if "Statement" not in document:
        reader.problem(node, entry, field_name, "a key policy needs a Statement")
        return None
    if size > _MAX_POLICY:
        reader.problem(node, entry, field_name, f"a key policy must be at most {_MAX_POLICY} characters")
        return None
    return document


def _inline_policy(reader: _Reader, node: Node, entry: str, field_name: str) -> Mapping[str, Any] | None:
    before = len(reader.problems)
    document = reader.json_value(node, entry, field_name)
    if len(reader.problems) > before:
        return None
    size = len(json.dumps(document))
    return _check_policy_document(reader, node, entry, field_name, document, size)


def _policy_file(reader: _Reader, node: Node, entry: str, field_name: str) -> Mapping[str, Any] | None:
    name = reader.string(node, entry, field_name)
    if name is None:
        return None
    path = reader.base_dir / name
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        reader.problem(node, entry, field_name, f"cannot read {path}: {exc.strerror}")
        return None
    except UnicodeDecodeError:
        reader.problem(node, entry, field_name, f"{path} is not UTF-8 text")
        return None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        reader.problem(node, entry, field_name, f"{path} is not valid JSON: {exc}")
        return None
    return _check_policy_document(reader, node, entry, field_name, document, len(text))


def _grants(reader: _Reader, node: Node, entry: str, field_name: str) -> tuple[GrantSpec, ...] | None:
    items = reader.sequence(node, entry, field_name)
    if items is None:
        return None
    grants: list[GrantSpec] = []
    first_line: dict[str, int] = {}
    ok = True
    for i, item in enumerate(items):
        grant = _grant(reader, item, entry, f"{field_name}[{i}]")
        if grant is None:
            ok = False
        elif grant.name in first_line:
            reader.problem(item, entry, f"{field_name}[{i}].name", f"{grant.name!r} is already used on line {first_line[grant.name]}")
            ok = False
        else:
            first_line[grant.name] = grant.line
            grants.append(grant)
    return tuple(grants) if ok else None


def _grant(reader: _Reader, node: Node, entry: str, path: str) -> GrantSpec | None:
    before = len(reader.problems)
    fields = reader.fields(node, entry, path, _GRANT_FIELDS)
    if fields is None:
        return None
    for required in ("name", "grantee", "operations"):
        if required not in fields:
            reader.problem(node, entry, f"{path}.{required}", "required")
    name = reader.identifier(fields["name"], entry, f"{path}.name", alias=False) if "name" in fields else None
    grantee = reader.string(fields["grantee"], entry, f"{path}.grantee") if "grantee" in fields else None
    if grantee is not None and not 1 <= len(grantee) <= _MAX_NAME:
        reader.problem(fields["grantee"], entry, f"{path}.grantee", f"must be 1-{_MAX_NAME} characters")
    retiring = None
    if "retiring_principal" in fields:
        retiring = reader.string(fields["retiring_principal"], entry, f"{path}.retiring_principal")
    operations: list[str] = []
    if "operations" in fields:
        items = reader.sequence(fields["operations"], entry, f"{path}.operations")
        if items is not None and not items:
            reader.problem(fields["operations"], entry, f"{path}.operations", "needs at least one operation")
        for i, item in enumerate(items or ()):
            op = reader.choice(item, entry, f"{path}.operations[{i}]", GRANT_OPERATIONS)
            if op is not None and op in operations:
                reader.problem(item, entry, f"{path}.operations[{i}]", f"{op} is listed twice")
            elif op is not None:
                operations.append(op)
    equals = subset = None
    if "constraints" in fields:
        cpath = f"{path}.constraints"
        constraints = reader.fields(fields["constraints"], entry, cpath, _CONSTRAINT_FIELDS)
        if constraints is not None and not constraints:
            reader.problem(fields["constraints"], entry, cpath, "give encryption_context_equals or encryption_context_subset")
        for key, value_node in (constraints or {}).items():
            context = reader.string_map(value_node, entry, f"{cpath}.{key}", max_value=_MAX_DESCRIPTION)
            if context is not None and key == "encryption_context_equals":
                equals = MappingProxyType(context)
            elif context is not None:
                subset = MappingProxyType(context)
    if name is None or grantee is None or len(reader.problems) > before:
        return None
    return GrantSpec(
        name=name,
        grantee=grantee,
        operations=tuple(sorted(operations)),
        retiring_principal=retiring,
        context_equals=equals,
        context_subset=subset,
        line=node.start_mark.line + 1,
    )


def _extra_aliases(
    reader: _Reader, node: Node, entry: str, field_name: str, alias: str | None
) -> tuple[str, ...] | None:
    items = reader.sequence(node, entry, field_name)
    if items is None:
        return None
    out: list[str] = []
    for i, item in enumerate(items):
        name = reader.identifier(item, entry, f"{field_name}[{i}]", alias=True)
        if name is None:
            return None
        if name == alias or name in out:
            reader.problem(item, entry, f"{field_name}[{i}]", f"{name} is listed twice")
            return None
        out.append(name)
    return tuple(out)


def _key_material(
    reader: _Reader, node: Node, entry: str, spec: str, usage: str | None
) -> KeyMaterial | None:
    name = reader.string(node, entry, "key_material_file")
    if name is None:
        return None
    try:
        return load_key_material(reader.base_dir / name, spec)
    except ValueError as exc:
        reader.problem(node, entry, "key_material_file", str(exc))
        return None
