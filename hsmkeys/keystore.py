"""KeyStore: the key service object. Every KMS operation, the state rules, no wire.

The operations themselves are declared once, in :mod:`hsmkeys.operations` (name,
implementation, the request members that name keys, the ``kms:`` action, whether it
changes state), and implemented as plain functions in :mod:`hsmkeys.ops`. Each public
operation method of the KeyStore (``create_key`` for CreateKey, ...) is the table's
entry: calling it runs :meth:`KeyStore.invoke`, which authorizes, audits and calls the
implementation. Nothing can be served around that path.

Keyword arguments are named as the KMS request members in snake_case; results are
the frozen dataclasses of :mod:`hsmkeys.models`; errors are :mod:`hsmkeys.errors`.

Authorization: a call with a caller (every server call; library code inside
``call_context``) is decided by :mod:`hsmkeys.authz` against the key policy, the
caller's identity policy and the key's grants. A call without a caller is trusted, as
holding the HSM PIN already is.

Crash-safe ordering: HSM object first, then the catalog row (a crash in between
leaves an orphan object that :meth:`KeyStore.doctor` finds); purge marks the row
Purging, destroys the objects, then deletes the row.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsmkeys import ciphertext, faultpoints, keyspecs, operations
from hsmkeys.arns import ArnScope, parse_uuid
from hsmkeys.audit import AuditEvent, AuditLog, audit_log_chains
from hsmkeys.authz import access_denied, compile_policy, decide
from hsmkeys.authz.model import AuthzRequest, ConditionValue, Principal
from hsmkeys.call import Call
from hsmkeys.catalog.base import AuditCheckpoint, Catalog, GrantRecord, KeyRecord
from hsmkeys.clock import Clock, SystemClock
from hsmkeys.config import Settings
from hsmkeys.context import current_call
from hsmkeys.errors import (
    AccessDeniedException,
    AlreadyExistsException,
    DisabledException,
    IncorrectKeyException,
    InvalidCiphertextException,
    InvalidKeyUsageException,
    KMSError,
    KMSInternalException,
    KMSInvalidStateException,
    NotFoundException,
    UnsupportedOperationException,
)
from hsmkeys.gcmlimit import DEFAULT_BLOCK, RETIRE_AT, EncryptionBudget
from hsmkeys.hsm.base import AUDIT_KEY_REF, RESERVED_UUID, Hsm, wrapping_label
from hsmkeys.ivs import IvPool
from hsmkeys.models import (
    KeyMetadata,
    KeySpec,
    KeyState,
    KeyUsage,
    KeyVersionRef,
    MacAlgorithm,
    MaintenanceReport,
    Origin,
    RotationType,
    Tag,
)
from hsmkeys.operations import CONDITION_DEFAULTS, KeyRole, Operation
from hsmkeys.ops import managed
from hsmkeys.ops.common import current_key_material_id
from hsmkeys.ops.grants import check_tokens
from hsmkeys.usage import (
    COUNTED_OPERATIONS,
    Pricing,
    UsageRecorder,
    UsageReport,
    month_start,
    usage_report,
)
from hsmkeys.validation import check_str

if TYPE_CHECKING:
    from hsmkeys.authz.policy import CompiledPolicy
    from hsmkeys.ops.asymmetric import CachedPublicKey

log = logging.getLogger("hsmkeys.keystore")

_POLICY_CACHE_MAX = 4096
_DECISION_MEMO_MAX = 16384
_KEY_IDS_MAX = 65536
# Condition keys whose value changes between identical requests: decisions reading them are not memoised.
_VOLATILE_KEYS = ("aws:currenttime", "aws:epochtime", "kms:resourcealiases", "aws:requesttag", "aws:tagkeys")
_REJECTION_WINDOW_SECONDS = 1.0
#: doctor destroys an orphan object only after two sightings at least this far apart.
DEFAULT_DOCTOR_GRACE_SECONDS = 600.0
#: Operations whose retry must not repeat the effect: the SDK's invocation id names the
#: logical request, and its first committed attempt's result is answered again.
NON_IDEMPOTENT = frozenset({"CreateKey", "CreateGrant", "ScheduleKeyDeletion"})


@dataclass(frozen=True, slots=True)
class DoctorReport:
    """Drift between the HSM and the catalog."""

    orphan_objects: tuple[KeyVersionRef, ...]  # HSM objects no catalog row references
    missing_objects: tuple[KeyVersionRef, ...]  # catalog versions with no HSM object
    unfinished_purges: tuple[str, ...]  # key ids left in state Purging
    fixed: bool = False
    # Orphans first seen less than the grace period ago (a create may be in flight):
    # reported, never destroyed yet.
    young_orphans: tuple[KeyVersionRef, ...] = ()
    # Import wrapping pairs seen for longer than an import token lives (24 h).
    stale_wrapping_keys: tuple[KeyVersionRef, ...] = ()
    destroyed: tuple[KeyVersionRef, ...] = ()  # with fix: the orphans destroyed

    @property
    def consistent(self) -> bool:
        return not (
            self.orphan_objects or self.missing_objects or self.unfinished_purges or self.stale_wrapping_keys
        )


@dataclass(frozen=True, slots=True)
class StoreStatus:
    module: str
    token_label: str
    manufacturer: str
    model: str
    keys: int


def default_key_policy(account_id: str) -> str:
    """AWS KMS's default key policy: the account (its root principal) may do everything."""
    from hsmkeys.authz import default_key_policy as _default

    return _default(account_id)


class KeyStore:
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
        principals: Mapping[str, Principal] | None = None,
        doctor_grace_seconds: float = DEFAULT_DOCTOR_GRACE_SECONDS,
        gcm_encryption_limit: int = RETIRE_AT,
        gcm_reservation_block: int = DEFAULT_BLOCK,
    ) -> None:
        """``gcm_encryption_limit``: encryptions per AES-GCM key version before it is
        retired (NIST SP 800-38D, see :mod:`hsmkeys.gcmlimit`); tests inject small ones."""
        self._hsm = hsm
        self._doctor_grace = timedelta(seconds=doctor_grace_seconds)
        self._next_sweep: datetime | None = None  # run_maintenance's next orphan sweep
        self._gcm_budget = EncryptionBudget(
            catalog.reserve_encryptions, limit=gcm_encryption_limit, block=gcm_reservation_block
        )
        self._ivs = IvPool(hsm.random)
        self._catalog = catalog
        self._clock = clock or SystemClock()
        self._scope = ArnScope(region, account_id)
        self._audit = audit
        self._principals: dict[str, Principal] = dict(principals or {})
        self._policies: dict[str, tuple[CompiledPolicy, bool]] = {}
        self._default_policy = default_key_policy(account_id)
        self._allowed: dict[tuple[object, ...], str] = {}  # policy-based allows, see _memo_key
        self._arns: dict[uuid.UUID, str] = {}
        self._foreign_callers: dict[str, bool] = {}  # principal ARN -> of another account
        self._key_ids: dict[str, uuid.UUID] = {}  # key id / key ARN text -> UUID, see _key
        self._public_keys: dict[KeyVersionRef, CachedPublicKey] = {}
        self._rejections: dict[str | None, tuple[float, int, str, str]] = {}
        self._usage = UsageRecorder()

    @classmethod
    def open(
        cls,
        settings: Settings | str | Path | None = None,
        *,
        clock: Clock | None = None,
        audit: bool = True,
    ) -> KeyStore:
        """Open the HSM token and catalog a config file (or Settings) names.

        ``audit=False`` opens without the audit writer (for ``audit verify``, which must
        change nothing).
        """
        from hsmkeys.catalog import open_catalog
        from hsmkeys.hsm.pkcs11 import Pkcs11Hsm

        if not isinstance(settings, Settings):
            settings = Settings.load(settings)
        settings.hsm.apply_softhsm2_conf()
        hsm = Pkcs11Hsm.open(
            module=settings.hsm.module, token_label=settings.hsm.token_label, pin=settings.hsm.pin()
        )
        catalog = open_catalog(settings)
        store = cls(
            hsm=hsm,
            catalog=catalog,
            clock=clock,
            region=settings.region,
            account_id=settings.account_id,
            principals=principals_from_settings(settings),
            doctor_grace_seconds=settings.doctor_grace_seconds,
        )
        if audit and settings.audit_log is not None:
            store._audit = AuditLog(
                settings.audit_log, mac=store.audit_mac, checkpoints=catalog, fsync_lines=settings.audit_fsync_lines
            )
        return store

    @staticmethod
    def start_loading_hsm(settings: Settings) -> threading.Thread:
        """Load the configured PKCS#11 module in a background thread, for :meth:`open`
        later in this process (``serve`` overlaps it with importing the server: SoftHSM2
        reads every token object at load, ~1 s on a 30,000-object token)."""

        def load() -> None:
            from hsmkeys.hsm.pkcs11 import preload_module

            settings.hsm.apply_softhsm2_conf()
            preload_module(settings.hsm.module, settings.hsm.token_label)

        thread = threading.Thread(target=load, name="hsmkeys-hsm-load", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.flush_rejections()
        try:
            self.flush_usage()
        except KMSError:  # logged; closing must still release the HSM and the catalog
            log.error("event=usage_flush_failed at=close")
        if self._audit is not None:
            self._audit.close()
        self._catalog.close()
        self._hsm.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def region(self) -> str:
        return self._scope.region

    @property
    def account_id(self) -> str:
        return self._scope.account_id

    # ================================================================ the call path

    def invoke(
        self,
        op: Operation[Any, Any],
        /,
        args: Mapping[str, Any],
        *,
        principal: Principal | str | None = None,
        request_id: str | None = None,
        source: str | None = None,
        secure_transport: bool = False,
        invocation_id: str | None = None,
    ) -> Any:
        """Run one operation: authorize, audit (intent before any effect), call it.

        ``invocation_id`` (the SDK's ``amz-sdk-invocation-id``, the same on every retry of
        one logical request) makes the operations in NON_IDEMPOTENT answer a retry with
        the first committed attempt's resource instead of doing it again.

        ``principal`` None (and no :func:`hsmkeys.context.call_context` around the call)
        is a trusted in-process caller. A string is looked up among the configured
        principals (an unknown ARN gets no identity policy).
        """
        if principal is None and request_id is None:
            ctx = current_call()
            principal, request_id, source = ctx.principal, ctx.request_id, ctx.source
            secure_transport = ctx.secure_transport
        if isinstance(principal, str):
            principal = self.principal(principal)
        call = Call(
            op,
            args,
            principal=principal,
            # One id for the call's audit lines and its usage record (GetKeyLastUsage).
            request_id=request_id or _request_ids.next(),
            source=source,
            secure_transport=secure_transport,
        )
        if invocation_id and op.name in NON_IDEMPOTENT:
            call.invocation_id = invocation_id[:128]
        audit = self._audit
        if audit is not None and op.mutating:
            self._write_audit(call, "intent", "Pending")  # fails closed: nothing changed yet
        outcome = "Success"
        try:
            if "grant_tokens" in args:
                check_tokens(args["grant_tokens"])
            if not op.keys:
                named = args.get(op.resource_member) if op.resource_member is not None else None
                self._authorize(call, None, op.keyless_role, resource=named if isinstance(named, str) else None)
            result = op.impl(self, call, **args)
            if not call.authorized:  # an implementation that never asked: a bug, fail closed
                log.error("event=unauthorized_operation operation=%s", op.name)
                raise KMSInternalException("internal error")
            if op.name in COUNTED_OPERATIONS:  # in memory only; flush_usage writes the catalog
                account = principal.account if principal is not None else self._scope.account_id
                self._usage.record(op.name, call.key_arns, account, self._now(), call.request_id or "")
            return result
        except KMSError as exc:
            outcome = exc.code
            raise
        except Exception:
            outcome = KMSInternalException.code
            raise
        finally:
            if audit is not None:
                try:
                    self._write_audit(call, "done", outcome)
                except KMSInternalException:
                    # A state change already has its intent line; a read must not be
                    # answered unaudited (fail closed).
                    if not op.mutating and outcome == "Success":
                        raise
                    log.error("event=audit_outcome_failed operation=%s", op.name)

    def flush_usage(self) -> int:
        """Add the in-memory usage counts to the catalog (the server does this every few
        seconds, close() at the end); returns the number of requests flushed."""
        return self._usage.flush(self._catalog)

    def usage_report(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        *,
        by: str = "key",
        pricing: Pricing | None = None,
    ) -> UsageReport:
        """Key-months, requests and cost per group (``hsmkeys usage``); see hsmkeys.usage.

        Default period: the start of the current UTC month until now. Flushes this
        store's counts first. ValueError for an unknown ``by`` or an empty period.
        """
        until = until or self._now()
        since = since or month_start(until)
        if since >= until:
            raise ValueError(f"the period is empty: --since {since.isoformat()} is not before --until")
        self.flush_usage()
        return usage_report(self._catalog, since, until, by=by, pricing=pricing)

    def _record_managed_creation(self, call: Call, key_arn: str) -> None:
        """Audit the creation of an AWS managed key by a call's first use of its alias."""
        if self._audit is None:
            return
        principal = call.principal
        self._audit.record(
            AuditEvent(
                time=self._now(),
                request_id=call.request_id or str(uuid.uuid4()),
                principal=principal.arn if principal is not None else None,
                operation="CreateKey",
                key_arns=(key_arn,),
                key_version=1,
                decision="aws-managed-key-first-use",
                source=call.source,
            )
        )

    def principal(self, arn: str) -> Principal:
        """The configured principal with that ARN (its identity policy), else a bare one."""
        found = self._principals.get(arn)
        if found is None:
            found = Principal(arn)
        return found

    def _write_audit(self, call: Call, phase: str, outcome: str) -> None:
        assert self._audit is not None
        principal = call.principal
        self._audit.record(
            AuditEvent(
                time=self._now(),
                request_id=call.request_id or str(uuid.uuid4()),
                principal=principal.arn if principal is not None else None,
                operation=call.op.name,
                phase=phase,
                key_arns=tuple(call.key_arns),
                key_version=call.key_version,
                outcome=outcome,
                decision=call.decision,
                source=call.source,
            )
        )

    def audit_rejected(
        self,
        operation: str,
        outcome: str,
        *,
        principal: str | None = None,
        request_id: str | None = None,
        source: str | None = None,
    ) -> None:
        """Audit a request the server refused before it reached an operation.

        An authenticated caller's refusal gets its own line. Unauthenticated refusals
        are counted per source address and summarised in at most one line per source
        per second (with the count), so they can flood neither the log nor the HSM.
        """
        if self._audit is None:
            return
        if principal is not None:
            self._audit.record(
                AuditEvent(
                    time=self._now(),
                    request_id=request_id or _request_ids.next(),
                    principal=principal,
                    operation=operation,
                    outcome=outcome,
                    source=source,
                )
            )
            return
        now = self._now().timestamp()
        window = self._rejections.get(source)
        if window is not None and now - window[0] < _REJECTION_WINDOW_SECONDS:
            self._rejections[source] = (window[0], window[1] + 1, window[2], window[3])
            return
        if window is not None:
            self._write_rejection_summary(source, window)
        self._rejections[source] = (now, 1, operation, outcome)

    def flush_rejections(self, *, older_than: float = 0.0) -> None:
        """Write the pending summaries of unauthenticated refusals (all, or closed windows)."""
        if self._audit is None:
            self._rejections.clear()
            return
        now = self._now().timestamp()
        for source, window in list(self._rejections.items()):
            if now - window[0] >= older_than:
                del self._rejections[source]
                self._write_rejection_summary(source, window)

    def _write_rejection_summary(self, source: str | None, window: tuple[float, int, str, str]) -> None:
        assert self._audit is not None
        _, count, operation, outcome = window
        self._audit.record(
            AuditEvent(
                time=self._now(),
                request_id=str(uuid.uuid4()),
                principal=None,
                operation=operation,
                outcome=outcome,
                source=source,
                count=count,
            )
        )

    def audit_mac(self, data: bytes, *, create: bool = True) -> bytes:
        """HMAC-SHA256 with the HSM's audit key, never extractable.

        With ``create`` (the writer) the key is made on first use; without it (verify)
        a missing key raises NotFoundException and nothing is created.
        """
        try:
            return self._hsm.mac(AUDIT_KEY_REF, MacAlgorithm.HMAC_SHA_256, data)
        except NotFoundException:
            if not create:
                raise
            with contextlib.suppress(AlreadyExistsException):  # another process created it first
                self._hsm.create_key(AUDIT_KEY_REF, KeySpec.HMAC_256, KeyUsage.GENERATE_VERIFY_MAC)
                log.info(
                    "event=audit_key_created label=%s note=%s",
                    AUDIT_KEY_REF.label,
                    "first start on this token: the HMAC key that signs audit checkpoints was made "
                    "in the HSM (never extractable); hsmkeys audit verify needs it, so keep the token",
                )
            return self._hsm.mac(AUDIT_KEY_REF, MacAlgorithm.HMAC_SHA_256, data)

    def rotate_audit_log(self) -> Path:
        """Start a new audit file linked to the current one."""
        if self._audit is None:
            raise KMSInternalException("no audit log is configured (audit_log in the config)")
        return self._audit.rotate()

    def rotate_audit_logs(self) -> list[Path]:
        """``hsmkeys audit rotate``: rotate the configured log and each worker chain file
        beside it (``<audit_log>.w<n>``, see :func:`hsmkeys.audit.writer_log_path`);
        the rotated names, the configured log's first."""
        rotated = [self.rotate_audit_log()]
        assert self._audit is not None
        for chain in audit_log_chains(self._audit.path)[1:]:
            if not chain.exists():  # only rotated files left: nothing live to rotate
                continue
            other = AuditLog(chain, mac=self.audit_mac, checkpoints=self._catalog)
            try:
                rotated.append(other.rotate())
            finally:
                other.close()
        return rotated

    def catalog_checkpoint(self, log_id: str) -> AuditCheckpoint | None:
        """The newest audit checkpoint the catalog holds for a log (its resolved path)."""
        return self._catalog.get_audit_checkpoint(log_id)

    def catalog_checkpoint_ids(self) -> list[str]:
        """The log ids (resolved paths) of every audit chain the catalog holds a checkpoint of."""
        return self._catalog.list_audit_checkpoint_ids()

    # ================================================================ authorization

    def _compiled_policy(self, text: str) -> tuple[CompiledPolicy, bool]:
        """(compiled key policy, whether it reads kms:ResourceAliases), once per revision."""
        found = self._policies.get(text)
        if found is None:
            if len(self._policies) >= _POLICY_CACHE_MAX:
                self._policies.clear()
            found = (compile_policy(text, kind="key"), "resourcealiases" in text.lower())
            self._policies[text] = found
        return found

    def _memo_key(
        self, call: Call, principal: Principal, role: KeyRole, policy_text: str | None, resource: str, alias: str | None
    ) -> tuple[object, ...] | None:
        """What a policy-based allow depends on, when that is all it can depend on: the
        policy revisions, the caller, the action, the resource and every request value a
        condition can read. None (no memo) when a policy reads the time, aliases or tags."""
        if _volatile(policy_text) or _volatile(principal.identity_policy):
            return None
        values: list[object] = []
        for member, _ in call.op.conditions:
            value = call.args.get(member)
            if value is not None and not isinstance(value, str | bool | int):
                return None  # lists (tags, grant operations): not worth a key
            values.append(value)
        context = call.args.get(role.context_member) if role.context_member is not None else None
        return (
            policy_text,
            principal,
            role.action,
            resource,
            alias,
            call.source,
            call.secure_transport,
            tuple(context.items()) if isinstance(context, Mapping) else None,
            tuple(values),
        )

    def _base_conditions(self, call: Call, principal: Principal) -> dict[str, ConditionValue]:
        """The request's own condition keys; the evaluator derives the principal's
        (aws:PrincipalArn, kms:CallerAccount, aws:username, ...) from the Principal."""
        now = self._now()
        cond: dict[str, ConditionValue] = {
            "aws:CurrentTime": now,
            "aws:EpochTime": int(now.timestamp()),
            "aws:SecureTransport": call.secure_transport,
        }
        if call.source is not None:
            cond["aws:SourceIp"] = call.source
        for member, name in call.op.conditions:
            value = call.args.get(member)
            if value is None:
                default = CONDITION_DEFAULTS.get(name)
                if default is not None and name not in cond:  # the parameter's default
                    cond[name] = default
                continue
            if isinstance(value, bool | int | str):
                cond[name] = value
            elif isinstance(value, Mapping):
                cond[name] = tuple(str(k) for k in value)
            elif isinstance(value, list | tuple):
                cond[name] = tuple(_condition_text(v) for v in value)
                for tag in value:
                    if isinstance(tag, Tag):
                        cond["aws:RequestTag/" + tag.tag_key] = tag.tag_value
        return cond

    def _authorize(
        self,
        call: Call,
        key: KeyRecord | None,
        role: KeyRole,
        *,
        request_alias: str | None = None,
        resource: str | None = None,
        extra: Mapping[str, ConditionValue] | None = None,
    ) -> None:
        """Decide ``role.action`` for the call's principal on ``key`` (or ``*``); raise if denied."""
        principal = call.principal
        if principal is None:
            return
        policy_text = (key.policy or self._default_policy) if key is not None else None
        arn = self._arn(key.key_uuid) if key is not None else "*"
        if not call.op.cross_account and self._foreign(principal):
            # "Cross-account use: No": no policy of this account can let another in.
            call.decisions.append("deny cross-account")
            raise AccessDeniedException(
                f"User: {principal.arn} is not authorized to perform: {role.action} on resource: "
                f"{resource or arn} because {call.op.name} cannot be used across accounts"
            )
        memo_key = self._memo_key(call, principal, role, policy_text, resource or arn, request_alias)
        if memo_key is not None:
            remembered = self._allowed.get(memo_key)
            if remembered is not None:
                call.decisions.append(remembered)
                call.authorized = True
                return
        cond = self._base_conditions(call, principal)
        context: Mapping[str, str] | None = None
        if role.context_member is not None:
            raw = call.args.get(role.context_member)
            if isinstance(raw, Mapping) and raw:
                context = raw
                for k, v in raw.items():
                    cond["kms:EncryptionContext:" + k] = v
                cond["kms:EncryptionContextKeys"] = tuple(raw)
        compiled = None
        if key is not None:
            cond["kms:KeySpec"] = key.spec  # StrEnum members are their strings
            cond["kms:KeyUsage"] = key.usage
            cond["kms:KeyOrigin"] = key.origin
            if request_alias is not None:
                cond["kms:RequestAlias"] = request_alias
            assert policy_text is not None
            compiled, wants_aliases = self._compiled_policy(policy_text)
            if wants_aliases:
                cond["kms:ResourceAliases"] = tuple(
                    a.name for a in self._catalog.list_aliases(limit=1000, key_uuid=key.key_uuid)
                )
        if extra:
            cond.update(extra)
        request = AuthzRequest(
            principal,
            role.action,
            resource or arn,
            self._scope.account_id if key is not None else None,
            cond,
            role.grant_operation,
            context,
        )
        decision = decide(request, key_policy=compiled)
        if not decision.allowed and not decision.explicit_deny and key is not None and role.grant_operation:
            # Grants only matter when no policy allows: read them only then.
            grants = self._catalog.grants_for_key(key.key_uuid)
            if grants:
                decision = decide(request, key_policy=compiled, grants=grants)
        recorded = ("allow " if decision.allowed else "deny ") + decision.by
        call.decisions.append(recorded)
        if not decision.allowed:
            raise access_denied(request, decision)
        if memo_key is not None and not decision.by.startswith("grant:"):  # grants change without a policy change
            if len(self._allowed) >= _DECISION_MEMO_MAX:
                self._allowed.clear()
            self._allowed[memo_key] = recorded
        call.authorized = True

    def _authorize_retire(self, call: Call, key: KeyRecord, grant: GrantRecord) -> None:
        """RetireGrant as KMS documents it: allowed to the grant's retiring principal, to its
        grantee when the grant lists RetireGrant, and to principals of the account that
        created the grant (its root, or an identity policy delegating kms:RetireGrant).
        The key policy plays no part ("The kms:RetireGrant permission is not effective in
        a key policy"); an identity policy's Deny of kms:RetireGrant refuses even a party."""
        principal = call.principal
        if principal is None:
            return
        request = AuthzRequest(
            principal,
            "kms:RetireGrant",
            self._arn(key.key_uuid),
            self._scope.account_id,
            self._base_conditions(call, principal),
            None,
            None,
        )
        decision = decide(request, key_policy=None)  # the identity policy (or account root) alone
        party = principal.arn == grant.retiring_principal or (
            principal.arn == grant.grantee_principal and "RetireGrant" in grant.operations
        )
        issuer = decision.allowed and principal.account == grant.issuing_account
        allowed = not decision.explicit_deny and (party or issuer)
        call.decisions.append(
            ("allow " if allowed else "deny ") + ("retiring-party" if party and allowed else decision.by)
        )
        if not allowed:
            raise access_denied(request, decision)
        call.authorized = True

    def _foreign(self, principal: Principal) -> bool:
        """Whether the caller belongs to another account than this store's (remembered per ARN)."""
        foreign = self._foreign_callers.get(principal.arn)
        if foreign is None:
            if len(self._foreign_callers) >= 65536:
                self._foreign_callers.clear()
            foreign = self._foreign_callers[principal.arn] = principal.account != self._scope.account_id
        return foreign

    def _key(
        self, call: Call, key_id: object, role: int | KeyRole = 0, *, alias_ok: bool = True
    ) -> KeyRecord:
        """Resolve a key named in the request and authorize the call's role on it.

        ``alias_ok`` False: KMS lets only a key id or key ARN name the key there
        (NotFoundException for an alias).
        """
        chosen = call.op.keys[role] if isinstance(role, int) else role
        alias = None
        principal = call.principal
        if principal is not None and self._foreign(principal) and not (type(key_id) is str and key_id.startswith("arn:")):
            # Another account names this account's keys by key or alias ARN; a bare id or
            # alias name means a key of its own account, which this store does not hold.
            raise NotFoundException(f"Key '{key_id}' does not exist in the caller's account")
        # A key id or key ARN this store has parsed before (never an alias: those move).
        known = self._key_ids.get(key_id) if type(key_id) is str else None
        if known is not None:
            key = self._catalog.get_key(known)
            if key is None or key.state is KeyState.PURGING:
                raise NotFoundException(f"Key '{self._arn(known)}' does not exist")
        else:
            text = check_str("keyId", key_id, min_len=1, max_len=2048)
            is_alias = text.startswith("alias/") or ":alias/" in text
            if is_alias and not alias_ok:
                raise NotFoundException(f"Invalid keyId '{text}': use a key id or key ARN, not an alias")
            if is_alias:
                alias = text if text.startswith("alias/") else text.split(":", 5)[-1]
                if chosen.creates_aws_managed and (text == alias or self._scope.resource(text) == alias):
                    managed.ensure_key(self, call, alias)  # alias/aws/<service>: created on first use
            key = self._lookup(text)
        managed.refuse_management(self, call, key)  # as AWS refuses it for AWS managed keys
        self._authorize(call, key, chosen, request_alias=alias)
        return key

    # ================================================================ internals

    def _arn(self, key_uuid: uuid.UUID) -> str:
        arn = self._arns.get(key_uuid)
        if arn is None:
            if len(self._arns) >= 65536:
                self._arns.clear()
            arn = self._arns[key_uuid] = self._scope.key_arn(key_uuid)
        return arn

    def _now(self) -> datetime:
        return self._clock.now()

    def _lookup(self, key_id: object) -> KeyRecord:
        """Resolve a key id, key ARN, alias name or alias ARN to its record (any state)."""
        text = given = check_str("keyId", key_id, min_len=1, max_len=2048)
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
            if len(self._key_ids) >= _KEY_IDS_MAX:
                self._key_ids.clear()
            self._key_ids[given] = key_uuid
        key = self._catalog.get_key(key_uuid)
        if key is None or key.state is KeyState.PURGING:
            raise NotFoundException(f"Key '{self._arn(key_uuid)}' does not exist")
        return key

    def _require_enabled(self, key: KeyRecord) -> None:
        if key.state is KeyState.ENABLED:
            return
        arn = self._arn(key.key_uuid)
        if key.state is KeyState.DISABLED:
            raise DisabledException(f"{arn} is disabled.")
        if key.state is KeyState.PENDING_IMPORT:
            raise KMSInvalidStateException(f"{arn} is pending import.")
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
        if key.origin is Origin.EXTERNAL:
            raise UnsupportedOperationException(
                f"{self._arn(key.key_uuid)} has imported key material, which hsmkeys does not rotate."
            )
        if not keyspecs.is_rotatable(key.spec):
            raise UnsupportedOperationException(
                f"{self._arn(key.key_uuid)} key spec {key.spec} does not support key rotation."
            )

    def _metadata(self, key: KeyRecord) -> KeyMetadata:
        # CurrentKeyMaterialId: only a key that has material. An EXTERNAL key has none while
        # PendingImport, nor when scheduled for deletion from there: ImportKeyMaterial sets
        # its ExpirationModel and removing the material clears it.
        has_material = key.state is not KeyState.PENDING_IMPORT and (
            key.origin is not Origin.EXTERNAL or key.expiration_model is not None
        )
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
            key_manager=key.key_manager,
            customer_master_key_spec=key.spec,
            key_spec=key.spec,
            # PendingDeletionWindowInDays is only for PendingReplicaDeletion (multi-Region
            # primaries); a single-Region key shows its DeletionDate alone.
            deletion_date=key.deletion_date,
            encryption_algorithms=keyspecs.encryption_algorithms(key.spec, key.usage),
            signing_algorithms=keyspecs.signing_algorithms(key.spec, key.usage),
            mac_algorithms=keyspecs.mac_algorithms(key.spec, key.usage),
            key_agreement_algorithms=keyspecs.key_agreement_algorithms(key.spec, key.usage),
            valid_to=key.valid_to,
            expiration_model=key.expiration_model,
            current_key_material_id=current_key_material_id(key) if has_material else None,
            current_version=key.current_version,
        )

    def _recall(self, call: Call) -> str | None:
        """The resource an earlier committed attempt of this logical request made (retries)."""
        if call.invocation_id is None:
            return None
        principal = call.principal.arn if call.principal is not None else ""
        return self._catalog.recall_request(principal, call.invocation_id, call.op.name)

    def _remember(self, call: Call, resource: str) -> None:
        """Record the call's resource for its retries; inside the effect's transaction."""
        if call.invocation_id is None:
            return
        principal = call.principal.arn if call.principal is not None else ""
        self._catalog.remember_request(principal, call.invocation_id, call.op.name, resource, self._now())

    def _seal(
        self, call: Call, key: KeyRecord, plaintext: bytes, context: Mapping[str, str]
    ) -> tuple[bytes, KeyVersionRef]:
        """Encrypt under the key's current version into a blob: (blob, the version used).

        Each encryption spends one of the version's AES-GCM budget (a local decrement);
        a spent version is retired and the key rotated first (_retire_spent_version).
        """
        for _ in range(3):
            ref = KeyVersionRef(key.key_uuid, key.current_version)  # one per call: budget and HSM
            if self._gcm_budget.take(ref):
                break
            key = self._retire_spent_version(call, key)
        else:  # rotated, and the new version was spent too: only with absurd limits
            raise KMSInternalException(f"no AES-GCM budget left for {self._arn(key.key_uuid)}")
        iv = self._ivs.take()
        header = ciphertext.header(ref.key_uuid, ref.version, iv)
        body = self._hsm.encrypt_aes_gcm(
            ref, iv, header + ciphertext.canonical_context(context) if context else header, plaintext
        )
        call.used(self._arn(ref.key_uuid), ref.version)
        return header + body, ref

    def _retire_spent_version(self, call: Call, key: KeyRecord) -> KeyRecord:
        """The key after retiring its spent current version from encryption.

        Rotates the key (a new current version, rotation type AUTOMATIC), logged and
        audited as operation ``AutomaticRotation``. A key that cannot rotate (imported
        material) is refused with KMSInvalidStateException: its state no longer allows
        Encrypt (Decrypt still works), it is permanent, and botocore does not retry it
        (it retries LimitExceededException as throttling, which would only repeat it).
        """
        from hsmkeys.ops.rotation import rotate

        arn = self._arn(key.key_uuid)
        spent = key.current_version
        if key.origin is Origin.EXTERNAL or not keyspecs.is_rotatable(key.spec):
            log.error("event=gcm_limit_reached key=%s version=%d rotation=impossible", arn, spent)
            raise KMSInvalidStateException(
                f"{arn} has done the {self._gcm_budget.limit} encryptions AES-GCM allows one key "
                "version and cannot be rotated (imported key material); it can still decrypt. "
                "Encrypt with a new key."
            )
        request_id = call.request_id or str(uuid.uuid4())
        self._record_internal("AutomaticRotation", request_id, arn, spent, "intent", "Pending")
        outcome = "Success"
        try:
            rotated = rotate(self, None, key, RotationType.AUTOMATIC, retiring=spent)
        except KMSError as exc:
            outcome = exc.code
            raise
        finally:
            self._record_internal("AutomaticRotation", request_id, arn, spent, "done", outcome)
        if rotated is None:  # another process or thread rotated it first
            fresh = self._catalog.get_key(key.key_uuid)
            if fresh is None or fresh.state is KeyState.PURGING:
                raise NotFoundException(f"Key '{arn}' does not exist")
            self._require_enabled(fresh)
            return fresh
        log.warning(
            "event=gcm_limit_rotation key=%s retired_version=%d current_version=%d limit=%d",
            arn,
            spent,
            rotated.current_version,
            self._gcm_budget.limit,
        )
        return rotated

    def _record_internal(
        self, operation: str, request_id: str, arn: str, version: int, phase: str, outcome: str
    ) -> None:
        """An audit line for a change hsmkeys makes by itself (no caller of its own)."""
        if self._audit is None:
            return
        self._audit.record(
            AuditEvent(
                time=self._now(),
                request_id=request_id,
                principal=None,
                operation=operation,
                phase=phase,
                key_arns=(arn,),
                key_version=version,
                outcome=outcome,
            )
        )

    def _open(
        self,
        call: Call,
        blob_bytes: bytes,
        context: Mapping[str, str],
        expected: KeyRecord | None,
        role: int = 0,
        *,
        dry_run: bool = False,
    ) -> tuple[KeyRecord, int, bytes]:
        """Decrypt a symmetric blob: (key, version, plaintext).

        The key named by the blob is authorized for the call's ``role`` before any
        material is touched; ``dry_run`` stops after every check, before the HSM.
        """
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
        if expected is None:
            self._authorize(call, key, call.op.keys[role])
        self._require_enabled(key)
        if dry_run:
            from hsmkeys.ops.common import dry_run_error

            raise dry_run_error(call.op.name)
        ref = KeyVersionRef(key.key_uuid, blob.version)
        header = blob_bytes[: ciphertext.HEADER_LEN]  # == blob.header: unpack checked the format
        try:
            plaintext = self._hsm.decrypt_aes_gcm(
                ref, blob.iv, header + ciphertext.canonical_context(context) if context else header, blob.body
            )
        except NotFoundException:
            raise KMSInternalException(f"key material of {ref.label} is missing from the HSM") from None
        call.used(self._arn(key.key_uuid), blob.version)
        return key, blob.version, plaintext

    # ================================================================ maintenance

    def _make_new_key_object(self, ref: KeyVersionRef, spec: KeySpec, usage: KeyUsage) -> None:
        """The HSM object of a key whose row is not committed yet, recorded as pending
        first (committed before the HSM write), so the sweeper can tell a crashed create's
        object from another deployment's. The row's insert clears it, in its transaction."""
        self._catalog.add_pending_object(ref.label, self._now())
        try:
            self._hsm.create_key(ref, spec, usage)
        except BaseException:
            self._catalog.remove_pending_object(ref.label)
            raise

    def run_maintenance(self) -> MaintenanceReport:
        """Perform due automatic rotations and purge keys whose deletion date has passed. Idempotent."""
        from hsmkeys.ops.imports import expire_material
        from hsmkeys.ops.rotation import rotate

        now = self._now()
        rotated = []
        for key in self._catalog.keys_due_rotation(now):
            if rotate(self, None, key, RotationType.AUTOMATIC) is not None:
                rotated.append(str(key.key_uuid))
        purged = [str(key.key_uuid) for key in self._catalog.keys_due_purge(now) if self._purge(key)]
        expire_material(self)
        self.flush_rejections(older_than=_REJECTION_WINDOW_SECONDS)
        swept: tuple[str, ...] = ()
        if self._next_sweep is None:
            # Not at start-up: the sweep scans the whole token (seconds at 30,000 objects)
            # and an orphan needs two sightings a grace period apart anyway.
            self._next_sweep = now + self._doctor_grace / 2
        elif now >= self._next_sweep:
            # The sweeper: a version object left by a rotation that died between the HSM
            # write and the catalog commit (on any instance) is destroyed once it has been
            # an orphan for the grace period. Objects of keys the catalog does not know
            # (a crashed CreateKey, or another deployment sharing the token) are left to an
            # operator's `hsmkeys doctor --fix`. A token scan: not on every run.
            self._next_sweep = now + self._doctor_grace / 2
            swept = tuple(ref.label for ref in self.doctor(fix=True, known_keys_only=True).destroyed)
        return MaintenanceReport(tuple(rotated), tuple(purged), swept)

    def hold_maintenance_lease(self, holder: str, seconds: float) -> bool:
        """Take or renew the catalog's maintenance lease for ``holder`` for ``seconds``;
        whether it holds it now. Instances sharing a catalog run maintenance only while
        holding it, so each due rotation, purge or expiry is done by one of them."""
        return self._catalog.take_maintenance_lease(holder, seconds)

    def release_maintenance_lease(self, holder: str) -> None:
        """Give the lease up (at shutdown) so another instance takes over at once."""
        self._catalog.release_maintenance_lease(holder)

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
        faultpoints.reached("purge.marked")
        for version in self._catalog.list_versions(key.key_uuid):
            self._hsm.destroy_key(version.ref)
        faultpoints.reached("purge.objects_destroyed")
        self._catalog.delete_key(key.key_uuid)
        return True

    def doctor(self, *, fix: bool = False, known_keys_only: bool = False) -> DoctorReport:
        """Compare the HSM with the catalog; with ``fix``, destroy orphans and finish purges.

        A create or rotation makes its HSM object before its row commits, so an object
        without a row may be in flight. Every scan records when it first saw each orphan
        (catalog table); ``fix`` destroys only orphans first seen at least the grace
        period (``doctor_grace_seconds``) ago, and checks each again under the catalog's
        write transaction right before destroying it. Import wrapping pairs are removed
        once seen for longer than their token lives (24 h); the HSM keeps no creation
        time, so the first sighting bounds their age from below.
        """
        from hsmkeys.ops.imports import TOKEN_LIFETIME

        now = self._now()
        in_hsm = {ref for ref in self._hsm.list_key_refs() if ref.key_uuid != RESERVED_UUID}
        wrapping = self._hsm.list_wrapping_refs()
        in_catalog = self._catalog.all_version_refs()
        purging = [k for k in self._catalog.keys_due_purge(self._now()) if k.state is KeyState.PURGING]
        # Keys whose objects are meant to be absent: being purged, or awaiting imported material.
        purging_uuids = {k.key_uuid for k in purging} | {
            ref.key_uuid
            for ref in in_catalog - in_hsm
            if (k := self._catalog.get_key(ref.key_uuid)) is not None and k.state is KeyState.PENDING_IMPORT
        }
        orphans = tuple(sorted(in_hsm - in_catalog, key=_ref_order))
        missing = tuple(
            sorted((r for r in in_catalog - in_hsm if r.key_uuid not in purging_uuids), key=_ref_order)
        )
        seen = self._catalog.record_sightings(
            [ref.label for ref in orphans] + [wrapping_label(ref) for ref in wrapping], now
        )
        ripe = tuple(ref for ref in orphans if seen[ref.label] <= now - self._doctor_grace)
        pending = self._catalog.pending_objects()
        if known_keys_only:
            # Only objects this deployment made: versions of keys the catalog knows (a
            # crashed rotation's) and recorded pending creates (a crashed CreateKey's). An
            # object of an unknown key may belong to another deployment on a shared token.
            ripe = tuple(
                ref for ref in ripe if ref.label in pending or self._catalog.get_key(ref.key_uuid) is not None
            )
        stale = tuple(
            sorted((r for r in wrapping if seen[wrapping_label(r)] <= now - TOKEN_LIFETIME), key=_ref_order)
        )
        report = DoctorReport(
            orphans,
            missing,
            tuple(str(k.key_uuid) for k in purging),
            young_orphans=tuple(ref for ref in orphans if ref not in ripe),
            stale_wrapping_keys=stale,
        )
        if not fix:
            return report
        destroyed: list[KeyVersionRef] = []
        if ripe:
            # Under the write transaction no create or rotation can commit a row for one
            # of these between the final check and the destroy.
            with self._catalog.transaction():
                referenced = self._catalog.all_version_refs()
                for ref in ripe:
                    if ref in referenced:
                        continue
                    faultpoints.reached("doctor.before_destroy")
                    self._hsm.destroy_key(ref)
                    destroyed.append(ref)
                    if ref.label in pending:
                        self._catalog.remove_pending_object(ref.label)
                    log.warning("event=doctor_destroyed_orphan label=%s", ref.label)
        for ref in stale:
            self._hsm.destroy_wrapping_key(ref)
            log.warning("event=doctor_destroyed_wrapping_key label=%s", wrapping_label(ref))
        for key in purging:
            self._purge(key)
        in_hsm_labels = {ref.label for ref in in_hsm}
        for label, since in pending.items():
            # A create that died before its HSM write (no object), or whose row did commit:
            # nothing left to sweep once the grace period is over.
            if since <= now - self._doctor_grace and label not in in_hsm_labels:
                self._catalog.remove_pending_object(label)
        return replace(report, fixed=True, destroyed=tuple(destroyed))

    def preload(self) -> int:
        """Index this process's HSM objects now, in one pass over the token.

        Otherwise the first call that misses pays for it (about 3 s at 10,000 keys on
        SoftHSM2); a server worker calls this before it accepts requests. Returns the
        number of key versions found.
        """
        return len(self._hsm.list_key_refs())

    def start_indexing(self) -> bool:
        """Start indexing this process's HSM objects in a background thread and return at once.

        A server worker calls this instead of :meth:`preload`, so it answers at once on a
        big token (a full pass takes seconds at 10,000 keys): until the index is built a
        miss costs one search by CKA_ID (0.1-0.4 s at that size). False if the HSM backend
        cannot (then misses build the index as before).
        """
        return self._hsm.start_indexing()

    def use_own_hsm_session(self) -> bool:
        """Give the calling thread an HSM session of its own, so its calls (a key generation
        of seconds) do not wait for, or hold up, other threads'; see Hsm.use_own_session.

        Everything else the KeyStore shares between threads (catalog, audit log, caches)
        is thread-safe."""
        return self._hsm.use_own_session()

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

    # ================================================================ operations
    # One attribute per KMS operation, straight from the table: calling one runs invoke().

    cancel_key_deletion = operations.CANCEL_KEY_DELETION
    create_alias = operations.CREATE_ALIAS
    create_grant = operations.CREATE_GRANT
    create_key = operations.CREATE_KEY
    decrypt = operations.DECRYPT
    delete_alias = operations.DELETE_ALIAS
    delete_imported_key_material = operations.DELETE_IMPORTED_KEY_MATERIAL
    derive_shared_secret = operations.DERIVE_SHARED_SECRET
    describe_key = operations.DESCRIBE_KEY
    disable_key = operations.DISABLE_KEY
    disable_key_rotation = operations.DISABLE_KEY_ROTATION
    enable_key = operations.ENABLE_KEY
    enable_key_rotation = operations.ENABLE_KEY_ROTATION
    encrypt = operations.ENCRYPT
    generate_data_key = operations.GENERATE_DATA_KEY
    generate_data_key_pair = operations.GENERATE_DATA_KEY_PAIR
    generate_data_key_pair_without_plaintext = operations.GENERATE_DATA_KEY_PAIR_WITHOUT_PLAINTEXT
    generate_data_key_without_plaintext = operations.GENERATE_DATA_KEY_WITHOUT_PLAINTEXT
    generate_mac = operations.GENERATE_MAC
    generate_random = operations.GENERATE_RANDOM
    get_key_last_usage = operations.GET_KEY_LAST_USAGE
    get_key_policy = operations.GET_KEY_POLICY
    get_key_rotation_status = operations.GET_KEY_ROTATION_STATUS
    get_parameters_for_import = operations.GET_PARAMETERS_FOR_IMPORT
    get_public_key = operations.GET_PUBLIC_KEY
    import_key_material = operations.IMPORT_KEY_MATERIAL
    list_aliases = operations.LIST_ALIASES
    list_grants = operations.LIST_GRANTS
    list_key_policies = operations.LIST_KEY_POLICIES
    list_key_rotations = operations.LIST_KEY_ROTATIONS
    list_keys = operations.LIST_KEYS
    list_resource_tags = operations.LIST_RESOURCE_TAGS
    list_retirable_grants = operations.LIST_RETIRABLE_GRANTS
    put_key_policy = operations.PUT_KEY_POLICY
    re_encrypt = operations.RE_ENCRYPT
    retire_grant = operations.RETIRE_GRANT
    revoke_grant = operations.REVOKE_GRANT
    rotate_key_on_demand = operations.ROTATE_KEY_ON_DEMAND
    schedule_key_deletion = operations.SCHEDULE_KEY_DELETION
    sign = operations.SIGN
    tag_resource = operations.TAG_RESOURCE
    untag_resource = operations.UNTAG_RESOURCE
    update_alias = operations.UPDATE_ALIAS
    update_key_description = operations.UPDATE_KEY_DESCRIPTION
    verify = operations.VERIFY
    verify_mac = operations.VERIFY_MAC


class _RequestIds:
    """Unique request ids without a uuid4 per call: a random 80-bit process prefix (new
    after fork) and a counter, printed in the UUID layout."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        prefix = uuid.uuid4().hex[:20]
        self._prefix = f"{prefix[:8]}-{prefix[8:12]}-{prefix[12:16]}-{prefix[16:20]}-"
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"


_request_ids = _RequestIds()


def new_request_id() -> str:
    """A request id unique across processes (the server's ids come from here too)."""
    return _request_ids.next()


def principals_from_settings(settings: Settings) -> dict[str, Principal]:
    """The configured principals with their compiled identity policies, by ARN."""
    found: dict[str, Principal] = {}
    for p in settings.principals:
        text = getattr(p, "policy", None)
        policy = compile_policy(text, kind="identity") if text else None
        found[p.arn] = Principal(p.arn, identity_policy=policy)
    return found


@functools.lru_cache(maxsize=4096)
def _volatile(policy: object) -> bool:
    """Whether a policy (its text, or a compiled identity policy) reads a volatile key."""
    if policy is None:
        return False
    text = policy if isinstance(policy, str) else getattr(policy, "source", None)
    if text is None:
        return True  # a compiled policy we cannot inspect: never memoise
    low = text.lower()
    return any(k in low for k in _VOLATILE_KEYS)


def _condition_text(value: object) -> str:
    """A list element as a condition value: a tag by its key, anything else as text."""
    return value.tag_key if isinstance(value, Tag) else str(value)


def _ref_order(ref: KeyVersionRef) -> tuple[str, int]:
    return (str(ref.key_uuid), ref.version)
