"""The decision: key policy, identity policy and grants combined as AWS KMS documents.

Order (KMS developer guide, "Determining access to KMS keys"; IAM "Policy evaluation
logic"):

1. An applicable Deny in the key policy, then in the identity policy, refuses.
2. Keyless request (resource ``*``): an account root is allowed; otherwise the identity
   policy must allow.
3. Keyed request, key policy Allow naming the caller:
   * its own ARN, its role (for an assumed-role session), ``*`` or NotPrincipal: allowed
     for a caller in the key's account;
   * its account (id or ``:root`` ARN): the caller's identity policy must also allow the
     action on the key ARN (an account root needs none: it holds every permission its
     account has);
   * a caller from another account always needs its identity policy too (or is its
     account's root).
4. A grant on the key whose grantee is the caller (or the caller's role) and that lists
   the operation, its encryption-context constraint holding. Grants need no key policy
   or IAM permission, across accounts too; they never deny.
5. Otherwise implicit deny.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from hsmkeys.authz.conditions import Env
from hsmkeys.authz.model import AuthzRequest, Decision, GrantLike
from hsmkeys.authz.policy import CompiledPolicy, PrincipalMatch, Statement, caller_of
from hsmkeys.errors import AccessDeniedException

# The KMS GrantOperation enum of the service model (botocore kms 2014-11-01).
GRANT_OPERATIONS: Final = frozenset(
    {
        "Decrypt",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "ReEncryptFrom",
        "ReEncryptTo",
        "Sign",
        "Verify",
        "GetPublicKey",
        "CreateGrant",
        "RetireGrant",
        "DescribeKey",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
        "GenerateMac",
        "VerifyMac",
        "DeriveSharedSecret",
        "Encapsulate",
        "Decapsulate",
    }
)

# Grant constraints apply only to operations that take an encryption context; for these a
# request without a context is held to an empty one (so a constrained grant refuses it).
CONTEXT_OPERATIONS: Final = frozenset(
    {
        "Decrypt",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "ReEncryptFrom",
        "ReEncryptTo",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
    }
)

RESOURCE_BASED: Final = "resource-based"
IDENTITY_BASED: Final = "identity-based"


def _identity_policy(request: AuthzRequest) -> CompiledPolicy | None:
    policy = request.principal.identity_policy
    if policy is None or isinstance(policy, CompiledPolicy):
        return policy
    raise TypeError("Principal.identity_policy must be a CompiledPolicy or None")


def _key_account(request: AuthzRequest) -> str:
    if request.key_account:
        return request.key_account
    parts = request.resource.split(":", 5)
    return parts[4] if len(parts) == 6 else ""


def _first_applying(statements: tuple[Statement, ...], resource: str, env: Env) -> Statement | None:
    for st in statements:
        if st.applies(resource, env):
            return st
    return None


def decide(request: AuthzRequest, *, key_policy: CompiledPolicy | None,
           grants: Sequence[GrantLike] = ()) -> Decision:
    """May ``request.principal`` perform ``request.action`` on ``request.resource``?"""
    principal = request.principal
    caller = caller_of(principal.arn)
    account = caller.account
    is_root = caller.is_root
    resource = request.resource
    action = request.action
    env = Env(principal, request.context)
    identity = _identity_policy(request)

    key_allows: tuple[tuple[Statement, int], ...] = ()
    if key_policy is not None:
        denies, key_allows = key_policy.for_caller(action, caller)
        for st in denies:
            if st.applies(resource, env):
                return Decision(False, f"key-policy:{st.label}", True, RESOURCE_BASED)
    identity_allows: tuple[Statement, ...] = ()
    if identity is not None:
        denies, identity_allows = identity.for_action(action)
        denied = _first_applying(denies, resource, env)
        if denied is not None:
            return Decision(False, f"identity-policy:{denied.label}", True, IDENTITY_BASED)

    if resource == "*" or key_policy is None:
        # No resource policy (keyless operations, and aliases): identity policies alone.
        if is_root and account:
            return Decision(True, "account-root")
        allowing = _first_applying(identity_allows, resource, env)
        if allowing is not None:
            return Decision(True, f"identity-policy:{allowing.label}")
        return Decision(False, "implicit-deny", False, IDENTITY_BASED)

    direct: Statement | None = None
    delegated: Statement | None = None
    for st, level in key_allows:
        if not st.applies(resource, env):
            continue
        if level == PrincipalMatch.DIRECT:
            direct = st
            break
        if delegated is None:
            delegated = st
    key_statement = direct or delegated
    if key_statement is not None:
        same_account = bool(account) and account == _key_account(request)
        if (direct is not None and same_account) or is_root:
            return Decision(True, f"key-policy:{key_statement.label}")
        delegating = _first_applying(identity_allows, resource, env)
        if delegating is not None:
            return Decision(True, f"key-policy+identity-policy:{key_statement.label}/{delegating.label}")

    operation = request.grant_operation
    if operation is not None and grants:
        grant = _matching_grant(grants, caller.arn, caller.role, operation, request.encryption_context)
        if grant is not None:
            return Decision(True, f"grant:{grant.grant_id}")
    return Decision(False, "implicit-deny", False,
                    IDENTITY_BASED if key_statement is not None else RESOURCE_BASED)


def _matching_grant(grants: Sequence[GrantLike], arn: str, role: str | None, operation: str,
                    context: Mapping[str, str] | None) -> GrantLike | None:
    for grant in grants:
        if grant.grantee_principal != arn and (role is None or grant.grantee_principal != role):
            continue
        if operation not in grant.operations:
            continue
        if operation in CONTEXT_OPERATIONS and not grant_constraints_hold(grant, context or {}):
            continue
        return grant
    return None


def grant_constraints_hold(grant: GrantLike, context: Mapping[str, str]) -> bool:
    """KMS's grant constraints: context keys compared case-insensitively, values exactly."""
    equals, subset = grant.encryption_context_equals, grant.encryption_context_subset
    if equals is None and subset is None:
        return True
    lowered = {k.lower(): v for k, v in context.items()}
    if len(lowered) != len(context):
        return False  # keys differing only by case: ambiguous under a constraint
    if equals is not None and lowered != {k.lower(): v for k, v in equals.items()}:
        return False
    return subset is None or all(lowered.get(k.lower()) == v for k, v in subset.items())


def access_denied(request: AuthzRequest, decision: Decision) -> AccessDeniedException:
    """The AccessDeniedException KMS returns for a refused request, worded as KMS words it."""
    policy_type = decision.policy_type or (
        IDENTITY_BASED if decision.by.startswith("identity-policy") or request.resource == "*"
        else RESOURCE_BASED
    )
    head = (f"User: {request.principal.arn} is not authorized to perform: {request.action} "
            f"on resource: {request.resource}")
    article = "an" if policy_type == IDENTITY_BASED else "a"
    if decision.explicit_deny:
        return AccessDeniedException(f"{head} with an explicit deny in {article} {policy_type} policy")
    return AccessDeniedException(f"{head} because no {policy_type} policy allows the {request.action} action")
