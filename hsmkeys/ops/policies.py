"""Key policies: GetKeyPolicy, PutKeyPolicy, ListKeyPolicies, and the lockout safety check."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from hsmkeys.authz import compile_policy, decide
from hsmkeys.authz.model import AuthzRequest
from hsmkeys.errors import (
    LimitExceededException,
    MalformedPolicyDocumentException,
    NotFoundException,
)
from hsmkeys.models import GetKeyPolicyResult, ListKeyPoliciesResult
from hsmkeys.ops.common import MAX_POLICY, page_limit
from hsmkeys.validation import check_str

if TYPE_CHECKING:
    from hsmkeys.call import Call
    from hsmkeys.keystore import KeyStore

DEFAULT_POLICY_NAME = "default"
LOCKOUT_MESSAGE = (
    "The new key policy will not allow you to update the key policy in the future."
)


def check_policy(policy: object) -> str:
    """The policy text if it is a valid key policy (MalformedPolicyDocumentException otherwise)."""
    text = check_str("policy", policy, min_len=1, max_len=131072)
    if len(text.encode("utf-8")) > MAX_POLICY:
        raise LimitExceededException(f"A key policy may be at most {MAX_POLICY} bytes.")
    compile_policy(text, kind="key")
    return text


def check_lockout(ks: KeyStore, call: Call, policy_text: str, key_arn: str) -> None:
    """Refuse a policy that would leave the calling principal unable to PutKeyPolicy."""
    principal = call.principal
    if principal is None:
        return  # a trusted in-process caller cannot lock itself out
    request = AuthzRequest(
        principal=principal,
        action="kms:PutKeyPolicy",
        resource=key_arn,
        key_account=ks.account_id,
        context=ks._base_conditions(call, principal),
    )
    if not decide(request, key_policy=compile_policy(policy_text, kind="key")).allowed:
        raise MalformedPolicyDocumentException(LOCKOUT_MESSAGE)


def _check_name(policy_name: str | None) -> None:
    if policy_name is not None and policy_name != DEFAULT_POLICY_NAME:
        raise NotFoundException(f"No such policy exists: {policy_name}. The only valid name is default.")


def get_key_policy(
    ks: KeyStore, call: Call, *, key_id: str, policy_name: str | None = None
) -> GetKeyPolicyResult:
    key = ks._key(call, key_id, alias_ok=False)
    _check_name(policy_name)
    call.used(ks._arn(key.key_uuid), None)
    from hsmkeys.keystore import default_key_policy

    return GetKeyPolicyResult(key.policy or default_key_policy(ks.account_id), DEFAULT_POLICY_NAME)


def put_key_policy(
    ks: KeyStore,
    call: Call,
    *,
    key_id: str,
    policy: str,
    policy_name: str | None = None,
    bypass_policy_lockout_safety_check: bool = False,
) -> None:
    text = check_policy(policy)
    with ks._catalog.transaction():
        key = ks._key(call, key_id, alias_ok=False)
        _check_name(policy_name)  # in every key state, pending deletion too (KMS key-state table)
        if not bypass_policy_lockout_safety_check:
            check_lockout(ks, call, text, ks._arn(key.key_uuid))
        ks._catalog.update_key(replace(key, policy=text))
    call.used(ks._arn(key.key_uuid), None)


def list_key_policies(
    ks: KeyStore, call: Call, *, key_id: str, limit: int | None = None, marker: str | None = None
) -> ListKeyPoliciesResult:
    page_limit(limit)
    key = ks._key(call, key_id, alias_ok=False)
    call.used(ks._arn(key.key_uuid), None)
    names = () if marker is not None else (DEFAULT_POLICY_NAME,)
    return ListKeyPoliciesResult(names, False, None)
