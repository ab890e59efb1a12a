"""Authorization: AWS KMS key policies, IAM identity policies and grants, evaluated purely.

    compile_policy(text, kind="key"|"identity") -> CompiledPolicy   (once per policy revision)
    decide(AuthzRequest, key_policy=..., grants=...) -> Decision     (per request, microseconds)
    access_denied(request, decision) -> AccessDeniedException         (KMS's wording)

No I/O: the KeyStore supplies the key policy, the grants and the caller's identity policy.
"""

from hsmkeys.authz.evaluate import GRANT_OPERATIONS, access_denied, decide, grant_constraints_hold
from hsmkeys.authz.model import AuthzRequest, ConditionValue, Decision, GrantView, Principal
from hsmkeys.authz.policy import CompiledPolicy, compile_policy, default_key_policy

__all__ = [
    "GRANT_OPERATIONS",
    "AuthzRequest",
    "CompiledPolicy",
    "ConditionValue",
    "Decision",
    "GrantView",
    "Principal",
    "access_denied",
    "compile_policy",
    "decide",
    "default_key_policy",
    "grant_constraints_hold",
]
