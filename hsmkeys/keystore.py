"""KeyStore: every AWS KMS operation, the state rules, and nothing about the wire.

One public method per KMS operation (``create_key`` for CreateKey, ...), keyword
arguments named as the KMS request members in snake_case, results as the frozen
dataclasses of :mod:`hsmkeys.models`, errors as :mod:`hsmkeys.errors`.

Crash-safe ordering: HSM object first, then the catalog row (a crash in between
leaves an orphan object that :meth:`KeyStore.doctor` finds); purge marks the row
Purging, destroys the objects, then deletes the row.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from hsmkeys import ciphertext, keyspecs
from hsmkeys.arns import ArnScope, parse_uuid
from hsmkeys.asymmetric import AsymmetricOperations
from hsmkeys.audit import AuditEvent, AuditLog
from hsmkeys.catalog.base import AliasRecord, Catalog, KeyRecord, VersionRecord
from hsmkeys.clock import Clock, SystemClock
from hsmkeys.config import Settings
from hsmkeys.context import current_call
from hsmkeys.errors import (
    AlreadyExistsException,
    DisabledException,
    DryRunOperationException,
    IncorrectKeyException,
    InvalidAliasNameException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    InvalidMarkerException,
    KMSError,
    KMSInternalException,
    KMSInvalidStateException,
    LimitExceededException,
    MalformedPolicyDocumentException,
    NotFoundException,
    TagException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkeys.hsm.base import AUDIT_KEY_REF, RESERVED_UUID, Hsm
from hsmkeys.ivs import IvPool
from hsmkeys.models import (
    AliasListEntry,
    CancelKeyDeletionResult,
    CreateKeyResult,
    DataKeySpec,
    DecryptResult,
    DescribeKeyResult,
    EncryptionAlgorithm,
    EncryptResult,
    GenerateDataKeyResult,
    GenerateDataKeyWithoutPlaintextResult,
    GenerateRandomResult,
    GetKeyRotationStatusResult,
    KeyListEntry,
    KeyMetadata,
    KeySpec,
    KeyState,
    KeyUsage,
    KeyVersionRef,
    ListAliasesResult,
    ListKeyRotationsResult,
    ListKeysResult,
    ListResourceTagsResult,
    MacAlgorithm,
    MaintenanceReport,
    Origin,
    ReEncryptResult,
    RotateKeyOnDemandResult,
    RotationsListEntry,
    RotationType,
    ScheduleKeyDeletionResult,
    Tag,
)
from hsmkeys.validation import (
    check_bytes,
    check_context,
    check_enum,
    check_grant_tokens,
    check_int,
    check_str,
)

P = ParamSpec("P")
R = TypeVar("R")

MAX_PLAINTEXT = 4096
MAX_CIPHERTEXT = 6144
MAX_DESCRIPTION = 8192
MAX_POLICY = 32768
MAX_TAGS = 50
MAX_ALIASES_PER_KEY = 50
MAX_ON_DEMAND_ROTATIONS = 25
ROTATION_PERIOD_DAYS = (90, 2560)
DEFAULT_ROTATION_PERIOD_DAYS = 365
DELETION_WINDOW_DAYS = (7, 30)
# KMS's OriginType values hsmkeys does not implement: valid parameters, unsupported operations.
_KMS_ONLY_ORIGINS = frozenset({"EXTERNAL", "AWS_CLOUDHSM", "EXTERNAL_KEY_STORE"})
ALIAS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/_-")


@dataclass(frozen=True, slots=True)
class DoctorReport:
    """Drift between the HSM and the catalog."""

    orphan_objects: tuple[KeyVersionRef, ...]  # HSM objects no catalog row references
    missing_objects: tuple[KeyVersionRef, ...]  # catalog versions with no HSM object
    unfinished_purges: tuple[str, ...]  # key ids left in state Purging
    fixed: bool = False

    @property
    def consistent(self) -> bool:
        return not (self.orphan_objects or self.missing_objects or self.unfinished_purges)


@dataclass(frozen=True, slots=True)
class StoreStatus:
    module: str
    token_label: str
    manufacturer: str
    model: str
    keys: int


@dataclass(slots=True)
class _CallRecord:
    """What the current call touched, for its audit line."""

    key_arn: str | None = None
    key_version: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_current_record: contextvars.ContextVar[_CallRecord | None] = contextvars.ContextVar(
    "hsmkeys_call_record", default=None
)


def _operation(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Mark a KeyStore method as the KMS operation ``name``: audited once per outermost call."""

    def wrap(method: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(method)
        def audited(*args: P.args, **kwargs: P.kwargs) -> R:
            store = args[0]
            assert isinstance(store, KeyStore)
            if store._audit is None or _current_record.get() is not None:
                return method(*args, **kwargs)
            record = _CallRecord()
            token = _current_record.set(record)
            outcome = "Success"
            try:
                return method(*args, **kwargs)
            except KMSError as exc:
                outcome = exc.code
                raise
            except Exception:
                outcome = KMSInternalException.code
                raise
            finally:
                _current_record.reset(token)
                store._write_audit(name, outcome, record)

        audited.kms_operation = name  # type: ignore[attr-defined]
        return audited

    return wrap


def default_key_policy(account_id: str) -> str:
    """AWS KMS's default key policy: the account (its root principal) may do everything."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Id": "key-default-1",
            "Statement": [
                {
                    "Sid": "Enable IAM User Permissions",
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{account_id}:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ],
        },
        indent=2,
    )


class KeyStore(AsymmetricOperations):
    """The key service. ``KeyStore.open(config)`` for real use; inject parts for tests."""

    def __init__(
        self,
        *,
        hsm: Hsm,
        catalog: Catalog,
        clock: Clock | None = None,
        region: str = "us-east-1",
        account_id: str = "111122223333",
        audit: AuditLog | None = None,
    ) -> None:
        self._hsm = hsm
        self._ivs = IvPool(hsm.random)
        self._catalog = catalog
        self._clock = clock or SystemClock()
        self._scope = ArnScope(region, account_id)
        self._audit = audit

    @classmethod
    def open(cls, settings: Settings | str | Path | None = None, *, clock: Clock | None = None) -> KeyStore:
        """Open the HSM token and catalog a config file (or Settings) names."""
        from hsmkeys.catalog.sqlite import SqliteCatalog
        from hsmkeys.hsm.pkcs11 import Pkcs11Hsm

        if not isinstance(settings, Settings):
            settings = Settings.load(settings)
        settings.hsm.apply_softhsm2_conf()
        hsm = Pkcs11Hsm.open(
            module=settings.hsm.module, token_label=settings.hsm.token_label, pin=settings.hsm.pin()
        )
        catalog = SqliteCatalog(settings.catalog)
        store = cls(
            hsm=hsm,
            catalog=catalog,
            clock=clock,
            region=settings.region,
            account_id=settings.account_id,
        )
        if settings.audit_log is not None:
            store._audit = AuditLog(settings.audit_log, mac=store.audit_mac)
        return store

    def close(self) -> None:
        if self._audit is not None:
            self._audit.close()
        self._catalog.close()
        self._hsm.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ================================================================ internals

    def _arn(self, key_uuid: uuid.UUID) -> str:
        return self._scope.key_arn(key_uuid)

    def _now(self) -> datetime:
        return self._clock.now()

    def _used(self, key: KeyRecord, version: int) -> None:
        record = _current_record.get()
        if record is not None:
            record.key_arn = self._arn(key.key_uuid)
            record.key_version = version

    def _write_audit(self, operation: str, outcome: str, record: _CallRecord) -> None:
        assert self._audit is not None
        ctx = current_call()
        self._audit.record(
            AuditEvent(
                time=self._now(),
                request_id=ctx.request_id or str(uuid.uuid4()),
                principal=ctx.principal,
                operation=operation,
                key_arn=record.key_arn,
                key_version=record.key_version,
                outcome=outcome,
                source=ctx.source,
            )
        )

    def audit_rejected(self, operation: str, outcome: str) -> None:
        """Audit a request the server refused before it reached an operation."""
        if self._audit is not None:
            self._write_audit(operation, outcome, _CallRecord())

    def audit_mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 with the HSM's audit key (created on first use, never extractable)."""
        try:
            return self._hsm.mac(AUDIT_KEY_REF, MacAlgorithm.HMAC_SHA_256, data)
        except NotFoundException:
            with contextlib.suppress(AlreadyExistsException):  # another process created it first
                self._hsm.create_key(AUDIT_KEY_REF, KeySpec.HMAC_256, KeyUsage.GENERATE_VERIFY_MAC)
            return self._hsm.mac(AUDIT_KEY_REF, MacAlgorithm.HMAC_SHA_256, data)

    def _lookup(self, key_id: object) -> KeyRecord:
        """Resolve a key id, key ARN, alias name or alias ARN to its record (any state)."""
        text = check_str("keyId", key_id, min_len=1, max_len=2048)
        if text.startswith("arn:"):
            resource = self._scope.resource(text)
            if resource is None:
                raise NotFoundException(f"Invalid arn {text}")
            text = resource
            if text.startswith("key/"):
                text = text[4:]
        if text.startswith("alias/"):
            alias = self._catalog.get_alias(text)
            if alias is None:
                raise NotFoundException(f"Alias {self._scope.alias_arn(text)} is not found.")
            key_uuid = alias.key_uuid
        else:
            parsed = parse_uuid(text)
            if parsed is None:
                raise NotFoundException(f"Invalid keyId '{text}'")
            key_uuid = parsed
        key = self._catalog.get_key(key_uuid)
        if key is None or key.state is KeyState.PURGING:
            raise NotFoundException(f"Key '{self._arn(key_uuid)}' does not exist")
        return key

    def _lookup_key_not_alias(self, key_id: object) -> KeyRecord:
        """For operations that KMS lets name a key only by key id or key ARN."""
        text = check_str("keyId", key_id, min_len=1, max_len=2048)
        if text.startswith("alias/") or ":alias/" in text:
            raise NotFoundException(f"Invalid keyId '{text}': use a key id or key ARN, not an alias")
        return self._lookup(text)

    def _usable(self, key_id: str) -> KeyRecord:
        key = self._lookup(key_id)
        self._require_enabled(key)
        return key

    def _require_enabled(self, key: KeyRecord) -> None:
        if key.state is KeyState.ENABLED:
            return
        arn = self._arn(key.key_uuid)
        if key.state is KeyState.DISABLED:
            raise DisabledException(f"{arn} is disabled.")
        raise KMSInvalidStateException(f"{arn} is pending deletion.")

    def _require_not_pending_deletion(self, key: KeyRecord) -> None:
        if key.state is KeyState.PENDING_DELETION:
            raise KMSInvalidStateException(f"{self._arn(key.key_uuid)} is pending deletion.")

    def _require_usage(self, key: KeyRecord, usage: KeyUsage) -> None:
        if key.usage is not usage:
            raise InvalidKeyUsageException(
                f"{self._arn(key.key_uuid)} key usage is {key.usage} which is not valid for this operation."
            )

    def _require_rotatable(self, key: KeyRecord) -> None:
        if not keyspecs.is_rotatable(key.spec):
            raise UnsupportedOperationException(
                f"{self._arn(key.key_uuid)} key spec {key.spec} does not support key rotation."
            )

    def _metadata(self, key: KeyRecord) -> KeyMetadata:
        return KeyMetadata(
            aws_account_id=self._scope.account_id,
            key_id=str(key.key_uuid),
            arn=self._arn(key.key_uuid),
            creation_date=key.created_at,
            enabled=key.state is KeyState.ENABLED,
            description=key.description,
            key_usage=key.usage,
            key_state=key.state,
            origin=key.origin,
            key_manager="CUSTOMER",
            customer_master_key_spec=key.spec,
            key_spec=key.spec,
            deletion_date=key.deletion_date,
            pending_deletion_window_in_days=key.pending_window_days,
            encryption_algorithms=keyspecs.encryption_algorithms(key.spec, key.usage),
            signing_algorithms=keyspecs.signing_algorithms(key.spec, key.usage),
            mac_algorithms=keyspecs.mac_algorithms(key.spec, key.usage),
            key_agreement_algorithms=keyspecs.key_agreement_algorithms(key.spec, key.usage),
            current_version=key.current_version,
        )

    def _seal(self, key: KeyRecord, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        """Encrypt under the key's current version into a blob."""
        version = key.current_version
        iv = self._ivs.take()
        header = ciphertext.header(key.key_uuid, version, iv)
        body = self._hsm.encrypt_aes_gcm(
            KeyVersionRef(key.key_uuid, version), iv, header + ciphertext.canonical_context(context), plaintext
        )
        self._used(key, version)
        return header + body

    def _open(
        self, blob_bytes: bytes, context: Mapping[str, str], expected: KeyRecord | None
    ) -> tuple[KeyRecord, int, bytes]:
        """Decrypt a symmetric blob: (key, version, plaintext)."""
        blob = ciphertext.unpack(blob_bytes)
        key = expected if expected is not None else self._catalog.get_key(blob.key_uuid)
        if expected is not None and blob.key_uuid != expected.key_uuid:
            raise IncorrectKeyException(
                "The key ID in the request does not identify a KMS key that can perform this operation."
            )
        if (
            key is None
            or key.state is KeyState.PURGING
            or key.spec is not KeySpec.SYMMETRIC_DEFAULT
            or blob.version > key.current_version
        ):
            raise InvalidCiphertextException(ciphertext.INVALID_CIPHERTEXT)
        self._require_enabled(key)
        ref = KeyVersionRef(key.key_uuid, blob.version)
        try:
            plaintext = self._hsm.decrypt_aes_gcm(
                ref, blob.iv, blob.header + ciphertext.canonical_context(context), blob.body
            )
        except NotFoundException:
            raise KMSInternalException(f"key material of {ref.label} is missing from the HSM") from None
        self._used(key, blob.version)
        return key, blob.version, plaintext

    @staticmethod
    def _dry_run(dry_run: bool) -> None:
        if dry_run:
            raise DryRunOperationException("The request would have succeeded, but the DryRun option is set.")

    # ================================================================ keys

    @_operation("CreateKey")
    def create_key(
        self,
        *,
        policy: str | None = None,
        description: str = "",
        key_usage: str | KeyUsage | None = None,
        customer_master_key_spec: str | KeySpec | None = None,
        key_spec: str | KeySpec | None = None,
        origin: str | Origin | None = None,
        custom_key_store_id: str | None = None,
        bypass_policy_lockout_safety_check: bool = False,
        tags: Sequence[Tag | Mapping[str, str]] | None = None,
        multi_region: bool = False,
        xks_key_id: str | None = None,
    ) -> CreateKeyResult:
        check_str("description", description, min_len=0, max_len=MAX_DESCRIPTION)
        if key_spec is not None and customer_master_key_spec is not None and key_spec != customer_master_key_spec:
            raise ValidationException("You cannot specify KeySpec and CustomerMasterKeySpec in the same request.")
        spec = check_enum(KeySpec, "keySpec", key_spec or customer_master_key_spec or KeySpec.SYMMETRIC_DEFAULT)
        usage = check_enum(KeyUsage, "keyUsage", key_usage or KeyUsage.ENCRYPT_DECRYPT)
        if usage not in keyspecs.ALLOWED_USAGES[spec]:
            raise ValidationException(f"KeyUsage {usage} is not compatible with KeySpec {spec}")
        if origin is not None and (origin in _KMS_ONLY_ORIGINS or check_enum(Origin, "origin", origin) is not Origin.AWS_KMS):
            raise UnsupportedOperationException(f"Origin {origin} is not supported")
        if custom_key_store_id or xks_key_id:
            raise UnsupportedOperationException("Custom key stores are not supported")
        if multi_region:
            raise UnsupportedOperationException("Multi-Region keys are not supported")
        policy_doc = self._check_policy(policy) if policy is not None else default_key_policy(self._scope.account_id)
        tag_map = _tag_map(tags)
        now = self._now()
        key = KeyRecord(
            key_uuid=uuid.uuid4(),
            spec=spec,
            usage=usage,
            origin=Origin.AWS_KMS,
            state=KeyState.ENABLED,
            description=description,
            created_at=now,
            current_version=1,
            policy=policy_doc,
        )
        first = VersionRecord(key.key_uuid, 1, now)
        self._hsm.create_key(first.ref, spec, usage)  # HSM first: a crash leaves an orphan, never a dangling row
        with self._catalog.transaction():
            self._catalog.insert_key(key, first)
            if tag_map:
                self._catalog.put_tags(key.key_uuid, tag_map)
        self._used(key, 1)
        return CreateKeyResult(self._metadata(key))

    @staticmethod
    def _check_policy(policy: object) -> str:
        text = check_str("policy", policy, min_len=1, max_len=MAX_POLICY)
        try:
            doc = json.loads(text)
        except ValueError:
            raise MalformedPolicyDocumentException("The policy is not valid JSON.") from None
        if not isinstance(doc, dict) or "Statement" not in doc:
            raise MalformedPolicyDocumentException("The policy must be a JSON object with a Statement.")
        return text

    @_operation("DescribeKey")
    def describe_key(self, *, key_id: str, grant_tokens: Sequence[str] | None = None) -> DescribeKeyResult:
        check_grant_tokens(grant_tokens)
        key = self._lookup(key_id)
        self._used(key, key.current_version)
        return DescribeKeyResult(self._metadata(key))

    @_operation("ListKeys")
    def list_keys(self, *, limit: int | None = None, marker: str | None = None) -> ListKeysResult:
        size = _page_limit(limit)
        after = _uuid_marker(marker)
        rows = self._catalog.list_keys(limit=size + 1, after=after)
        rows = [r for r in rows if r.state is not KeyState.PURGING]
        page, truncated = rows[:size], len(rows) > size
        entries = tuple(KeyListEntry(str(r.key_uuid), self._arn(r.key_uuid)) for r in page)
        return ListKeysResult(entries, truncated, str(page[-1].key_uuid) if truncated else None)

    @_operation("UpdateKeyDescription")
    def update_key_description(self, *, key_id: str, description: str) -> None:
        check_str("description", description, min_len=0, max_len=MAX_DESCRIPTION)
        with self._catalog.transaction():
            key = self._lookup(key_id)
            self._require_not_pending_deletion(key)
            self._catalog.update_key(replace(key, description=description))
        self._used(key, key.current_version)

    @_operation("EnableKey")
    def enable_key(self, *, key_id: str) -> None:
        self._set_enabled(key_id, True)

    @_operation("DisableKey")
    def disable_key(self, *, key_id: str) -> None:
        self._set_enabled(key_id, False)

    def _set_enabled(self, key_id: str, enabled: bool) -> None:
        with self._catalog.transaction():
            key = self._lookup(key_id)
            self._require_not_pending_deletion(key)
            state = KeyState.ENABLED if enabled else KeyState.DISABLED
            if key.state is not state:
                self._catalog.update_key(replace(key, state=state))
        self._used(key, key.current_version)

    # ================================================================ aliases

    def _check_alias_name(self, alias_name: object) -> str:
        name = check_str("aliasName", alias_name, min_len=1, max_len=256)
        if not name.startswith("alias/") or len(name) == 6 or not set(name) <= ALIAS_CHARS:
            raise ValidationException(
                "1 validation error detected: Value at 'aliasName' failed to satisfy constraint: "
                "Member must satisfy regular expression pattern: ^alias/[a-zA-Z0-9/_-]+$"
            )
        if name.startswith("alias/aws/"):
            raise InvalidAliasNameException("Alias names starting with alias/aws/ are reserved.")
        return name

    def _alias_target(self, target_key_id: object) -> KeyRecord:
        key = self._lookup_key_not_alias(target_key_id)
        self._require_not_pending_deletion(key)
        return key

    @_operation("CreateAlias")
    def create_alias(self, *, alias_name: str, target_key_id: str) -> None:
        name = self._check_alias_name(alias_name)
        now = self._now()
        with self._catalog.transaction():
            key = self._alias_target(target_key_id)
            if self._catalog.count_aliases(key.key_uuid) >= MAX_ALIASES_PER_KEY:
                raise LimitExceededException(f"A key may have at most {MAX_ALIASES_PER_KEY} aliases.")
            if self._catalog.get_alias(name) is not None:
                raise AlreadyExistsException(f"An alias with the name {self._scope.alias_arn(name)} already exists")
            self._catalog.insert_alias(AliasRecord(name, key.key_uuid, now, now))
        self._used(key, key.current_version)

    @_operation("UpdateAlias")
    def update_alias(self, *, alias_name: str, target_key_id: str) -> None:
        name = self._check_alias_name(alias_name)
        with self._catalog.transaction():
            alias = self._catalog.get_alias(name)
            if alias is None:
                raise NotFoundException(f"Alias {self._scope.alias_arn(name)} is not found.")
            key = self._alias_target(target_key_id)
            current = self._catalog.get_key(alias.key_uuid)
            if current is not None and (current.usage is not key.usage or _key_type(current) != _key_type(key)):
                raise ValidationException(
                    "The new target key must have the same key type and key usage as the current one."
                )
            self._catalog.update_alias(replace(alias, key_uuid=key.key_uuid, updated_at=self._now()))
        self._used(key, key.current_version)

    @_operation("DeleteAlias")
    def delete_alias(self, *, alias_name: str) -> None:
        name = self._check_alias_name(alias_name)
        with self._catalog.transaction():
            if self._catalog.get_alias(name) is None:
                raise NotFoundException(f"Alias {self._scope.alias_arn(name)} is not found.")
            self._catalog.delete_alias(name)

    @_operation("ListAliases")
    def list_aliases(
        self, *, key_id: str | None = None, limit: int | None = None, marker: str | None = None
    ) -> ListAliasesResult:
        size = _page_limit(limit)
        if marker is not None:
            check_str("marker", marker, min_len=1, max_len=320)
            if not marker.startswith("alias/"):
                raise InvalidMarkerException("The marker is not valid.")
        key_uuid = self._lookup_key_not_alias(key_id).key_uuid if key_id is not None else None
        rows = self._catalog.list_aliases(limit=size + 1, after=marker, key_uuid=key_uuid)
        page, truncated = rows[:size], len(rows) > size
        entries = tuple(
            AliasListEntry(
                alias_name=a.name,
                alias_arn=self._scope.alias_arn(a.name),
                target_key_id=str(a.key_uuid),
                creation_date=a.created_at,
                last_updated_date=a.updated_at,
            )
            for a in page
        )
        return ListAliasesResult(entries, truncated, page[-1].name if truncated else None)

    # ================================================================ tags

    @_operation("TagResource")
    def tag_resource(self, *, key_id: str, tags: Sequence[Tag | Mapping[str, str]]) -> None:
        tag_map = _tag_map(tags)
        with self._catalog.transaction():
            key = self._lookup_key_not_alias(key_id)
            self._require_not_pending_deletion(key)
            merged = self._catalog.get_tags(key.key_uuid) | tag_map
            if len(merged) > MAX_TAGS:
                raise TagException(f"A key may have at most {MAX_TAGS} tags.")
            self._catalog.put_tags(key.key_uuid, tag_map)
        self._used(key, key.current_version)

    @_operation("UntagResource")
    def untag_resource(self, *, key_id: str, tag_keys: Sequence[str]) -> None:
        if isinstance(tag_keys, str) or not isinstance(tag_keys, Sequence):
            raise ValidationException("tagKeys must be a list of strings")
        for tag_key in tag_keys:
            check_str("tagKeys", tag_key, min_len=1, max_len=128)
        with self._catalog.transaction():
            key = self._lookup_key_not_alias(key_id)
            self._require_not_pending_deletion(key)
            self._catalog.delete_tags(key.key_uuid, tag_keys)
        self._used(key, key.current_version)

    @_operation("ListResourceTags")
    def list_resource_tags(
        self, *, key_id: str, limit: int | None = None, marker: str | None = None
    ) -> ListResourceTagsResult:
        size = check_int("limit", limit, low=1, high=50) if limit is not None else 50
        key = self._lookup_key_not_alias(key_id)
        items = sorted(self._catalog.get_tags(key.key_uuid).items())
        if marker is not None:
            check_str("marker", marker, min_len=1, max_len=1024)
            items = [kv for kv in items if kv[0] > marker]
        page, truncated = items[:size], len(items) > size
        return ListResourceTagsResult(
            tuple(Tag(k, v) for k, v in page), truncated, page[-1][0] if truncated else None
        )

    # ================================================================ symmetric crypto

    @_operation("Encrypt")
    def encrypt(
        self,
        *,
        key_id: str,
        plaintext: bytes,
        encryption_context: Mapping[str, str] | None = None,
        grant_tokens: Sequence[str] | None = None,
        encryption_algorithm: str | EncryptionAlgorithm | None = None,
        dry_run: bool = False,
    ) -> EncryptResult:
        data = check_bytes("plaintext", plaintext, min_len=1, max_len=MAX_PLAINTEXT)
        context = check_context("encryptionContext", encryption_context)
        check_grant_tokens(grant_tokens)
        key = self._usable(key_id)
        self._require_usage(key, KeyUsage.ENCRYPT_DECRYPT)
        if key.spec is not KeySpec.SYMMETRIC_DEFAULT:
            return self._encrypt_rsa(key, data, encryption_algorithm, encryption_context, dry_run=dry_run)
        _require_symmetric_algorithm(encryption_algorithm)
        self._dry_run(dry_run)
        blob = self._seal(key, data, context)
        return EncryptResult(blob, self._arn(key.key_uuid), EncryptionAlgorithm.SYMMETRIC_DEFAULT)

    @_operation("Decrypt")
    def decrypt(
        self,
        *,
        ciphertext_blob: bytes,
        encryption_context: Mapping[str, str] | None = None,
        grant_tokens: Sequence[str] | None = None,
        key_id: str | None = None,
        encryption_algorithm: str | EncryptionAlgorithm | None = None,
        dry_run: bool = False,
    ) -> DecryptResult:
        """Decrypt a blob from encrypt/generate_data_key. Any tampering: InvalidCiphertextException."""
        data = check_bytes("ciphertextBlob", ciphertext_blob, min_len=1, max_len=MAX_CIPHERTEXT)
        context = check_context("encryptionContext", encryption_context)
        check_grant_tokens(grant_tokens)
        expected = self._usable(key_id) if key_id is not None else None
        if expected is not None:
            self._require_usage(expected, KeyUsage.ENCRYPT_DECRYPT)
            if expected.spec is not KeySpec.SYMMETRIC_DEFAULT:
                return self._decrypt_rsa(expected, data, encryption_algorithm, encryption_context, dry_run=dry_run)
        _require_symmetric_algorithm(encryption_algorithm)
        key, version, plaintext = self._open(data, context, expected)
        self._dry_run(dry_run)
        return DecryptResult(
            self._arn(key.key_uuid), plaintext, EncryptionAlgorithm.SYMMETRIC_DEFAULT, key_version=version
        )

    @_operation("ReEncrypt")
    def re_encrypt(
        self,
        *,
        ciphertext_blob: bytes,
        destination_key_id: str,
        source_encryption_context: Mapping[str, str] | None = None,
        source_key_id: str | None = None,
        destination_encryption_context: Mapping[str, str] | None = None,
        source_encryption_algorithm: str | EncryptionAlgorithm | None = None,
        destination_encryption_algorithm: str | EncryptionAlgorithm | None = None,
        grant_tokens: Sequence[str] | None = None,
        dry_run: bool = False,
    ) -> ReEncryptResult:
        """Decrypt and encrypt again in one call; the plaintext never leaves the KeyStore."""
        check_str("destinationKeyId", destination_key_id, min_len=1, max_len=2048)
        source = self.decrypt(
            ciphertext_blob=ciphertext_blob,
            encryption_context=source_encryption_context,
            grant_tokens=grant_tokens,
            key_id=source_key_id,
            encryption_algorithm=source_encryption_algorithm,
        )
        target = self.encrypt(
            key_id=destination_key_id,
            plaintext=source.plaintext,
            encryption_context=destination_encryption_context,
            grant_tokens=grant_tokens,
            encryption_algorithm=destination_encryption_algorithm,
            dry_run=dry_run,
        )
        return ReEncryptResult(
            ciphertext_blob=target.ciphertext_blob,
            source_key_id=source.key_id,
            key_id=target.key_id,
            source_encryption_algorithm=source.encryption_algorithm,
            destination_encryption_algorithm=target.encryption_algorithm,
        )

    def _data_key(
        self,
        key_id: str,
        key_spec: str | DataKeySpec | None,
        number_of_bytes: int | None,
        encryption_context: Mapping[str, str] | None,
        grant_tokens: Sequence[str] | None,
        dry_run: bool,
    ) -> tuple[bytes, bytes, str]:
        if (key_spec is None) == (number_of_bytes is None):
            raise ValidationException("Specify either KeySpec or NumberOfBytes, but not both.")
        if key_spec is not None:
            size = 16 if check_enum(DataKeySpec, "keySpec", key_spec) is DataKeySpec.AES_128 else 32
        else:
            size = check_int("numberOfBytes", number_of_bytes, low=1, high=1024)
        context = check_context("encryptionContext", encryption_context)
        check_grant_tokens(grant_tokens)
        key = self._usable(key_id)
        self._require_usage(key, KeyUsage.ENCRYPT_DECRYPT)
        if key.spec is not KeySpec.SYMMETRIC_DEFAULT:
            raise InvalidKeyUsageException(
                f"{self._arn(key.key_uuid)} is not a symmetric encryption key; data keys need one."
            )
        self._dry_run(dry_run)
        data_key = self._hsm.random(size)
        return data_key, self._seal(key, data_key, context), self._arn(key.key_uuid)

    @_operation("GenerateDataKey")
    def generate_data_key(
        self,
        *,
        key_id: str,
        encryption_context: Mapping[str, str] | None = None,
        number_of_bytes: int | None = None,
        key_spec: str | DataKeySpec | None = None,
        grant_tokens: Sequence[str] | None = None,
        dry_run: bool = False,
    ) -> GenerateDataKeyResult:
        """A fresh data key from the HSM RNG, returned in plaintext once and encrypted under the key."""
        plain, blob, arn = self._data_key(
            key_id, key_spec, number_of_bytes, encryption_context, grant_tokens, dry_run
        )
        return GenerateDataKeyResult(blob, plain, arn)

    @_operation("GenerateDataKeyWithoutPlaintext")
    def generate_data_key_without_plaintext(
        self,
        *,
        key_id: str,
        encryption_context: Mapping[str, str] | None = None,
        key_spec: str | DataKeySpec | None = None,
        number_of_bytes: int | None = None,
        grant_tokens: Sequence[str] | None = None,
        dry_run: bool = False,
    ) -> GenerateDataKeyWithoutPlaintextResult:
        _, blob, arn = self._data_key(key_id, key_spec, number_of_bytes, encryption_context, grant_tokens, dry_run)
        return GenerateDataKeyWithoutPlaintextResult(blob, arn)

    @_operation("GenerateRandom")
    def generate_random(
        self, *, number_of_bytes: int | None = None, custom_key_store_id: str | None = None
    ) -> GenerateRandomResult:
        if number_of_bytes is None:
            raise ValidationException("NumberOfBytes is required.")
        size = check_int("numberOfBytes", number_of_bytes, low=1, high=1024)
        if custom_key_store_id is not None:
            raise UnsupportedOperationException("Custom key stores are not supported")
        return GenerateRandomResult(self._hsm.random(size))

    # ================================================================ rotation

    @_operation("EnableKeyRotation")
    def enable_key_rotation(self, *, key_id: str, rotation_period_in_days: int | None = None) -> None:
        period = DEFAULT_ROTATION_PERIOD_DAYS
        if rotation_period_in_days is not None:
            period = check_int("rotationPeriodInDays", rotation_period_in_days, low=ROTATION_PERIOD_DAYS[0], high=ROTATION_PERIOD_DAYS[1])
        with self._catalog.transaction():
            key = self._lookup(key_id)
            self._require_enabled(key)
            self._require_rotatable(key)
            self._catalog.update_key(
                replace(key, rotation_period_days=period, next_rotation_at=self._now() + timedelta(days=period))
            )
        self._used(key, key.current_version)

    @_operation("DisableKeyRotation")
    def disable_key_rotation(self, *, key_id: str) -> None:
        with self._catalog.transaction():
            key = self._lookup(key_id)
            self._require_enabled(key)
            self._require_rotatable(key)
            self._catalog.update_key(replace(key, rotation_period_days=None, next_rotation_at=None))
        self._used(key, key.current_version)

    @_operation("GetKeyRotationStatus")
    def get_key_rotation_status(self, *, key_id: str) -> GetKeyRotationStatusResult:
        key = self._lookup(key_id)
        self._require_not_pending_deletion(key)
        self._require_rotatable(key)
        self._used(key, key.current_version)
        return GetKeyRotationStatusResult(
            key_rotation_enabled=key.rotation_period_days is not None,
            key_id=self._arn(key.key_uuid),
            rotation_period_in_days=key.rotation_period_days,
            next_rotation_date=key.next_rotation_at,
        )

    @_operation("RotateKeyOnDemand")
    def rotate_key_on_demand(self, *, key_id: str) -> RotateKeyOnDemandResult:
        key = self._lookup(key_id)
        self._require_enabled(key)
        self._require_rotatable(key)
        self._rotate(key, RotationType.ON_DEMAND)
        return RotateKeyOnDemandResult(self._arn(key.key_uuid))

    def _rotate(self, key: KeyRecord, rotation_type: RotationType) -> KeyRecord | None:
        """Add version n+1 and make it current; the older versions stay for decryption.

        An automatic rotation that is no longer due when the write lock is held (another
        maintainer did it, or the key changed) returns None and changes nothing.
        """
        with self._catalog.transaction():
            fresh = self._catalog.get_key(key.key_uuid)
            if fresh is None:
                raise NotFoundException(f"Key '{self._arn(key.key_uuid)}' does not exist")
            if rotation_type is RotationType.AUTOMATIC and not _rotation_due(fresh, self._now()):
                return None
            if rotation_type is RotationType.ON_DEMAND:
                done = sum(
                    v.rotation_type is RotationType.ON_DEMAND for v in self._catalog.list_versions(key.key_uuid)
                )
                if done >= MAX_ON_DEMAND_ROTATIONS:
                    raise LimitExceededException(
                        f"A key may be rotated on demand at most {MAX_ON_DEMAND_ROTATIONS} times."
                    )
            now = self._now()
            version = VersionRecord(key.key_uuid, fresh.current_version + 1, now, rotation_type)
            self._hsm.create_key(version.ref, fresh.spec, fresh.usage)
            self._catalog.add_version(version)
            updated = replace(fresh, current_version=version.version)
            if rotation_type is RotationType.AUTOMATIC and fresh.rotation_period_days is not None:
                updated = replace(updated, next_rotation_at=now + timedelta(days=fresh.rotation_period_days))
                self._catalog.update_key(updated)
        self._used(updated, version.version)
        return updated

    @_operation("ListKeyRotations")
    def list_key_rotations(
        self,
        *,
        key_id: str,
        include_key_material: str | None = None,
        limit: int | None = None,
        marker: str | None = None,
    ) -> ListKeyRotationsResult:
        size = _page_limit(limit)
        after = 0
        if marker is not None:
            if not marker.isdigit():
                raise InvalidMarkerException("The marker is not valid.")
            after = int(marker)
        key = self._lookup(key_id)
        self._require_rotatable(key)
        arn = self._arn(key.key_uuid)
        rotations = [
            v for v in self._catalog.list_versions(key.key_uuid) if v.rotation_type is not None and v.version > after
        ]
        page, truncated = rotations[:size], len(rotations) > size
        entries = tuple(
            RotationsListEntry(arn, v.created_at, v.rotation_type, _key_material_id(v.ref))
            for v in page
            if v.rotation_type is not None
        )
        return ListKeyRotationsResult(entries, truncated, str(page[-1].version) if truncated else None)

    # ================================================================ deletion

    @_operation("ScheduleKeyDeletion")
    def schedule_key_deletion(
        self, *, key_id: str, pending_window_in_days: int | None = None
    ) -> ScheduleKeyDeletionResult:
        days = 30
        if pending_window_in_days is not None:
            days = check_int("pendingWindowInDays", pending_window_in_days, low=DELETION_WINDOW_DAYS[0], high=DELETION_WINDOW_DAYS[1])
        with self._catalog.transaction():
            key = self._lookup_key_not_alias(key_id)
            self._require_not_pending_deletion(key)
            when = self._now() + timedelta(days=days)
            self._catalog.update_key(
                replace(key, state=KeyState.PENDING_DELETION, deletion_date=when, pending_window_days=days)
            )
        self._used(key, key.current_version)
        return ScheduleKeyDeletionResult(self._arn(key.key_uuid), when, KeyState.PENDING_DELETION, days)

    @_operation("CancelKeyDeletion")
    def cancel_key_deletion(self, *, key_id: str) -> CancelKeyDeletionResult:
        with self._catalog.transaction():
            key = self._lookup_key_not_alias(key_id)
            if key.state is not KeyState.PENDING_DELETION:
                raise KMSInvalidStateException(f"{self._arn(key.key_uuid)} is not pending deletion.")
            self._catalog.update_key(
                replace(key, state=KeyState.DISABLED, deletion_date=None, pending_window_days=None)
            )
        self._used(key, key.current_version)
        return CancelKeyDeletionResult(self._arn(key.key_uuid))

    # ================================================================ maintenance

    def run_maintenance(self) -> MaintenanceReport:
        """Perform due automatic rotations and purge keys whose deletion date has passed. Idempotent."""
        now = self._now()
        rotated = []
        for key in self._catalog.keys_due_rotation(now):
            if self._rotate(key, RotationType.AUTOMATIC) is not None:
                rotated.append(str(key.key_uuid))
        purged = [str(key.key_uuid) for key in self._catalog.keys_due_purge(now) if self._purge(key)]
        return MaintenanceReport(tuple(rotated), tuple(purged))

    def _purge(self, key: KeyRecord) -> bool:
        """Mark Purging, destroy every HSM object of the key, then delete its rows."""
        with self._catalog.transaction():
            fresh = self._catalog.get_key(key.key_uuid)
            if fresh is None:
                return False
            due = fresh.state is KeyState.PURGING or (
                fresh.state is KeyState.PENDING_DELETION
                and fresh.deletion_date is not None
                and fresh.deletion_date <= self._now()
            )
            if not due:
                return False  # cancelled meanwhile
            if fresh.state is not KeyState.PURGING:
                self._catalog.update_key(replace(fresh, state=KeyState.PURGING))
        for version in self._catalog.list_versions(key.key_uuid):
            self._hsm.destroy_key(version.ref)
        self._catalog.delete_key(key.key_uuid)
        return True

    def doctor(self, *, fix: bool = False) -> DoctorReport:
        """Compare the HSM with the catalog; with ``fix``, destroy orphans and finish purges."""
        in_hsm = {ref for ref in self._hsm.list_key_refs() if ref.key_uuid != RESERVED_UUID}
        in_catalog = self._catalog.all_version_refs()
        purging = [k for k in self._catalog.keys_due_purge(self._now()) if k.state is KeyState.PURGING]
        purging_uuids = {k.key_uuid for k in purging}
        orphans = tuple(sorted(in_hsm - in_catalog, key=_ref_order))
        missing = tuple(
            sorted((r for r in in_catalog - in_hsm if r.key_uuid not in purging_uuids), key=_ref_order)
        )
        report = DoctorReport(orphans, missing, tuple(str(k.key_uuid) for k in purging))
        if not fix:
            return report
        for ref in orphans:
            if ref not in self._catalog.all_version_refs():  # re-check: a create may have committed since
                self._hsm.destroy_key(ref)
        for key in purging:
            self._purge(key)
        return replace(report, fixed=True)

    def preload(self) -> int:
        """Index this process's HSM objects now, in one pass over the token.

        Otherwise the first call that misses pays for it (about 3 s at 10,000 keys on
        SoftHSM2); a server worker calls this before it accepts requests. Returns the
        number of key versions found.
        """
        return len(self._hsm.list_key_refs())

    def status(self) -> StoreStatus:
        hsm = self._hsm.status()
        return StoreStatus(hsm.module, hsm.token_label, hsm.manufacturer, hsm.model, self._catalog.count_keys())

    def check_health(self) -> None:
        """Raise KMSInternalException unless the HSM session and the catalog answer."""
        try:
            self._catalog.count_keys()
            self._hsm.random(1)
        except KMSError:
            raise
        except Exception as exc:
            raise KMSInternalException(f"health check failed: {type(exc).__name__}") from None


# ==================================================================== helpers


def _rotation_due(key: KeyRecord, now: datetime) -> bool:
    return (
        key.state is KeyState.ENABLED
        and keyspecs.is_rotatable(key.spec)
        and key.next_rotation_at is not None
        and key.next_rotation_at <= now
    )


def _require_symmetric_algorithm(algorithm: str | EncryptionAlgorithm | None) -> None:
    if algorithm is None:
        return
    if check_enum(EncryptionAlgorithm, "encryptionAlgorithm", algorithm) is not EncryptionAlgorithm.SYMMETRIC_DEFAULT:
        raise InvalidKeyUsageException(f"The encryption algorithm {algorithm} is not valid for this key.")


def _key_type(key: KeyRecord) -> str:
    if key.spec is KeySpec.SYMMETRIC_DEFAULT:
        return "symmetric"
    return "hmac" if key.spec.startswith("HMAC") else "asymmetric"


def _page_limit(limit: int | None) -> int:
    return check_int("limit", limit, low=1, high=1000) if limit is not None else 100


def _uuid_marker(marker: str | None) -> uuid.UUID | None:
    if marker is None:
        return None
    check_str("marker", marker, min_len=1, max_len=1024)
    value = parse_uuid(marker)
    if value is None:
        raise InvalidMarkerException("The marker is not valid.")
    return value


def _tag_map(tags: Iterable[Tag | Mapping[str, str]] | None) -> dict[str, str]:
    """Validate tags (KMS limits) given as Tag objects or {TagKey, TagValue} mappings."""
    if tags is None:
        return {}
    if isinstance(tags, str | bytes | Mapping):
        raise ValidationException("tags must be a list of {TagKey, TagValue}")
    out: dict[str, str] = {}
    for tag in tags:
        raw_key: object
        raw_value: object
        if isinstance(tag, Tag):
            raw_key, raw_value = tag.tag_key, tag.tag_value
        elif isinstance(tag, Mapping):
            raw_key = tag["TagKey"] if "TagKey" in tag else tag.get("tag_key")
            raw_value = tag["TagValue"] if "TagValue" in tag else tag.get("tag_value")
        else:
            raise ValidationException("tags must be a list of {TagKey, TagValue}")
        key = check_str("tagKey", raw_key, min_len=1, max_len=128)
        value = check_str("tagValue", raw_value, min_len=0, max_len=256)
        if key.startswith("aws:"):
            raise TagException("Tag keys beginning with aws: are reserved.")
        out[key] = value
    if len(out) > MAX_TAGS:
        raise TagException(f"A key may have at most {MAX_TAGS} tags.")
    return out


def _key_material_id(ref: KeyVersionRef) -> str:
    return hashlib.sha256(ref.object_id).hexdigest()


def _ref_order(ref: KeyVersionRef) -> tuple[str, int]:
    return (str(ref.key_uuid), ref.version)
