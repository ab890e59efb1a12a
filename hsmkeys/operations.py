"""The operation table: every KMS operation hsmkeys serves, declared once.

Each :class:`Operation` names the KMS operation, the function implementing it (in
:mod:`hsmkeys.ops`), the request members that name keys with the ``kms:`` action
each is authorized for, whether it changes state (state changes write their audit
intent line before any effect), the condition keys its request members supply, and
whether it is ``slow`` (can keep the HSM busy for seconds: key generation, RSA
wrapping pairs), which the server runs off its event loop on an HSM session of its own.

The server serves exactly the operations in :data:`OPERATIONS`; the KeyStore's
public methods are these entries (an :class:`Operation` is a descriptor: reading
``store.encrypt`` gives a callable that runs ``store.invoke(ENCRYPT, kwargs)``), so
authorization and audit are applied from the declaration for library and server
callers alike. A new operation is one row here plus one function.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload

import hsmkeys.ops.aliases as aliases
import hsmkeys.ops.asymmetric as asymmetric
import hsmkeys.ops.grants as grants
import hsmkeys.ops.imports as imports
import hsmkeys.ops.keys as keys
import hsmkeys.ops.policies as policies
import hsmkeys.ops.rotation as rotation
import hsmkeys.ops.symmetric as symmetric
import hsmkeys.ops.tags as tags
import hsmkeys.ops.usage as usage
from hsmkeys.usage import TRACKED_OPERATIONS

if TYPE_CHECKING:
    from hsmkeys.call import Call
    from hsmkeys.keystore import KeyStore

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class KeyRole:
    """One key an operation touches and what the caller needs on it.

    ``member`` is the request member naming the key (None when the key is named by
    the ciphertext or by a grant); ``grant_operation`` the name a grant must list to
    allow it (None: grants cannot allow it); ``context_member`` the request member
    whose encryption context the kms:EncryptionContext condition keys and grant
    constraints see. ``creates_aws_managed``: an ``alias/aws/<service>`` naming the key
    there creates that AWS managed key on first use (in the caller's account).
    """

    action: str
    member: str | None = "key_id"
    grant_operation: str | None = None
    context_member: str | None = None
    creates_aws_managed: bool = False


class Operation(Generic[P, R]):
    """One KMS operation; as a class attribute of KeyStore, its public method."""

    __slots__ = (
        "action",
        "attr",
        "conditions",
        "cross_account",
        "impl",
        "keyless_role",
        "keys",
        "mutating",
        "name",
        "resource_member",
        "slow",
    )

    def __init__(
        self,
        name: str,
        impl: Callable[Concatenate[KeyStore, Call, P], R],
        *,
        action: str | None = None,
        keys: tuple[KeyRole, ...] = (),
        mutating: bool = False,
        conditions: tuple[tuple[str, str], ...] = (),
        slow: bool = False,
        resource_member: str | None = None,
    ) -> None:
        self.name = name
        self.impl = impl
        self.slow = slow  # seconds of HSM work (key generation): served off the event loop
        self.action = action or f"kms:{name}"
        self.keys = keys  # empty: the operation names no key (decided by identity policy on "*")
        self.mutating = mutating
        self.conditions = conditions  # (request member, condition key) pairs
        # "Cross-account use: Yes" in the operation's API reference: a principal of another
        # account may call it on this account's keys (its policies permitting).
        self.cross_account = name in CROSS_ACCOUNT_OPERATIONS
        self.keyless_role = KeyRole(self.action, member=None)
        # An operation naming no key: the request member whose value is the authorized
        # resource (ListRetirableGrants: the retiring principal), else "*".
        self.resource_member = resource_member
        self.attr: str | None = None  # the KeyStore attribute naming it (set by __set_name__)

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.attr = name

    @property
    def parameters(self) -> Mapping[str, inspect.Parameter]:
        """The request members the implementation takes (snake_case), with defaults."""
        params = inspect.signature(self.impl).parameters
        return {n: p for n, p in list(params.items())[2:]}

    @overload
    def __get__(self, store: None, owner: type[Any]) -> Operation[P, R]: ...

    @overload
    def __get__(self, store: KeyStore, owner: type[Any]) -> Callable[P, R]: ...

    def __get__(self, store: KeyStore | None, owner: type[Any]) -> Operation[P, R] | Callable[P, R]:
        if store is None:
            return self
        bound = _bound(store, self)
        if self.attr is not None:
            # A non-data descriptor: the instance attribute now answers later look-ups
            # (no closure per call on the hot path).
            store.__dict__[self.attr] = bound
        return bound

    def __repr__(self) -> str:
        return f"Operation({self.name})"


def _bound(store: KeyStore, op: Operation[P, R]) -> Callable[P, R]:
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        if args:
            raise TypeError(f"{op.name} takes keyword arguments only")
        result: R = store.invoke(op, kwargs)
        return result

    functools.update_wrapper(call, op.impl)
    return call


#: The operations whose API reference says "Cross-account use: Yes" (plus
#: ListRetirableGrants, which lists a retiring principal's grants on any account's keys).
#: Any other operation refuses a principal of another account, whatever the policies say.
CROSS_ACCOUNT_OPERATIONS: frozenset[str] = TRACKED_OPERATIONS | {  # the cryptographic operations
    "CreateGrant",
    "DescribeKey",
    "GetKeyRotationStatus",
    "GetPublicKey",
    "ListGrants",
    "ListRetirableGrants",
    "RetireGrant",
    "RevokeGrant",
}

#: A condition key's value when the request leaves its member out: KMS evaluates the
#: parameter's default ("This type of condition works even when the parameter doesn't
#: appear in the request, such as when you use the parameter's default value").
CONDITION_DEFAULTS: Mapping[str, str] = {
    "kms:KeySpec": "SYMMETRIC_DEFAULT",
    "kms:KeyUsage": "ENCRYPT_DECRYPT",
    "kms:KeyOrigin": "AWS_KMS",
    "kms:EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
    "kms:MessageType": "RAW",
}

_ENC = "encryption_context"
_ENC_ALG = (("encryption_algorithm", "kms:EncryptionAlgorithm"),)
_SIGN_ALG = (("signing_algorithm", "kms:SigningAlgorithm"), ("message_type", "kms:MessageType"))
_MAC_ALG = (("mac_algorithm", "kms:MacAlgorithm"),)


def _role(
    action: str,
    *,
    grant: bool = False,
    member: str | None = "key_id",
    context: str | None = None,
    creates_aws_managed: bool = False,
) -> KeyRole:
    return KeyRole(action, member, action[4:] if grant else None, context, creates_aws_managed)


def _keyed(
    name: str,
    impl: Callable[Concatenate[KeyStore, Call, P], R],
    *,
    grant: bool = False,
    mutating: bool = False,
    context: str | None = None,
    conditions: tuple[tuple[str, str], ...] = (),
    creates_aws_managed: bool = False,
    slow: bool = False,
) -> Operation[P, R]:
    action = f"kms:{name}"
    return Operation(
        name,
        impl,
        keys=(_role(action, grant=grant, context=context, creates_aws_managed=creates_aws_managed),),
        mutating=mutating,
        conditions=conditions,
        slow=slow,
    )


# ---------------------------------------------------------------- keys
CREATE_KEY = Operation(
    "CreateKey",
    keys.create_key,
    mutating=True,
    slow=True,  # RSA-4096 generation: ~1.7 s
    conditions=(
        ("key_spec", "kms:KeySpec"),
        ("customer_master_key_spec", "kms:KeySpec"),
        ("key_usage", "kms:KeyUsage"),
        ("origin", "kms:KeyOrigin"),
        ("bypass_policy_lockout_safety_check", "kms:BypassPolicyLockoutSafetyCheck"),
    ),
)
DESCRIBE_KEY = _keyed("DescribeKey", keys.describe_key, grant=True, creates_aws_managed=True)
LIST_KEYS = Operation("ListKeys", keys.list_keys)
UPDATE_KEY_DESCRIPTION = _keyed("UpdateKeyDescription", keys.update_key_description, mutating=True)
ENABLE_KEY = _keyed("EnableKey", keys.enable_key, mutating=True)
DISABLE_KEY = _keyed("DisableKey", keys.disable_key, mutating=True)

# ---------------------------------------------------------------- key policies
GET_KEY_POLICY = _keyed("GetKeyPolicy", policies.get_key_policy)
PUT_KEY_POLICY = _keyed(
    "PutKeyPolicy",
    policies.put_key_policy,
    mutating=True,
    conditions=(("bypass_policy_lockout_safety_check", "kms:BypassPolicyLockoutSafetyCheck"),),
)
LIST_KEY_POLICIES = _keyed("ListKeyPolicies", policies.list_key_policies)

# ---------------------------------------------------------------- aliases
# The alias itself is a resource too: kms:<Op> on the alias ARN is decided by the
# caller's identity policy (aliases have no resource policy), as AWS documents.
CREATE_ALIAS = Operation(
    "CreateAlias",
    aliases.create_alias,
    keys=(_role("kms:CreateAlias", member="target_key_id"),),
    mutating=True,
)
UPDATE_ALIAS = Operation(
    "UpdateAlias",
    aliases.update_alias,
    keys=(_role("kms:UpdateAlias", member="target_key_id"), _role("kms:UpdateAlias", member=None)),
    mutating=True,
)
DELETE_ALIAS = Operation(
    "DeleteAlias", aliases.delete_alias, keys=(_role("kms:DeleteAlias", member=None),), mutating=True
)
LIST_ALIASES = Operation("ListAliases", aliases.list_aliases)

# ---------------------------------------------------------------- tags
TAG_RESOURCE = _keyed(
    "TagResource", tags.tag_resource, mutating=True, conditions=(("tags", "aws:TagKeys"),)
)
UNTAG_RESOURCE = _keyed(
    "UntagResource", tags.untag_resource, mutating=True, conditions=(("tag_keys", "aws:TagKeys"),)
)
LIST_RESOURCE_TAGS = _keyed("ListResourceTags", tags.list_resource_tags)

# ---------------------------------------------------------------- symmetric crypto
ENCRYPT = _keyed(
    "Encrypt", symmetric.encrypt, grant=True, context=_ENC, conditions=_ENC_ALG, creates_aws_managed=True
)
DECRYPT = _keyed("Decrypt", symmetric.decrypt, grant=True, context=_ENC, conditions=_ENC_ALG)
RE_ENCRYPT = Operation(
    "ReEncrypt",
    symmetric.re_encrypt,
    action="kms:ReEncrypt*",
    keys=(
        _role("kms:ReEncryptFrom", grant=True, member="source_key_id", context="source_encryption_context"),
        _role(
            "kms:ReEncryptTo",
            grant=True,
            member="destination_key_id",
            context="destination_encryption_context",
            creates_aws_managed=True,
        ),
    ),
    conditions=(
        ("source_encryption_algorithm", "kms:EncryptionAlgorithm"),
        ("destination_encryption_algorithm", "kms:EncryptionAlgorithm"),
    ),
)
GENERATE_DATA_KEY = _keyed(
    "GenerateDataKey", symmetric.generate_data_key, grant=True, context=_ENC, creates_aws_managed=True
)
GENERATE_DATA_KEY_WITHOUT_PLAINTEXT = _keyed(
    "GenerateDataKeyWithoutPlaintext",
    symmetric.generate_data_key_without_plaintext,
    grant=True,
    context=_ENC,
    creates_aws_managed=True,
)
GENERATE_RANDOM = Operation("GenerateRandom", symmetric.generate_random)

# ---------------------------------------------------------------- asymmetric and HMAC
SIGN = _keyed("Sign", asymmetric.sign, grant=True, conditions=_SIGN_ALG)
VERIFY = _keyed("Verify", asymmetric.verify, grant=True, conditions=_SIGN_ALG)
GET_PUBLIC_KEY = _keyed("GetPublicKey", asymmetric.get_public_key, grant=True)
GENERATE_MAC = _keyed("GenerateMac", asymmetric.generate_mac, grant=True, conditions=_MAC_ALG)
VERIFY_MAC = _keyed("VerifyMac", asymmetric.verify_mac, grant=True, conditions=_MAC_ALG)
GENERATE_DATA_KEY_PAIR = _keyed(
    "GenerateDataKeyPair",
    asymmetric.generate_data_key_pair,
    grant=True,
    context=_ENC,
    conditions=(("key_pair_spec", "kms:DataKeyPairSpec"),),
    creates_aws_managed=True,
    slow=True,
)
GENERATE_DATA_KEY_PAIR_WITHOUT_PLAINTEXT = _keyed(
    "GenerateDataKeyPairWithoutPlaintext",
    asymmetric.generate_data_key_pair_without_plaintext,
    grant=True,
    context=_ENC,
    conditions=(("key_pair_spec", "kms:DataKeyPairSpec"),),
    creates_aws_managed=True,
    slow=True,
)
DERIVE_SHARED_SECRET = _keyed(
    "DeriveSharedSecret",
    asymmetric.derive_shared_secret,
    grant=True,
    conditions=(("key_agreement_algorithm", "kms:KeyAgreementAlgorithm"),),
)

# ---------------------------------------------------------------- rotation
ENABLE_KEY_ROTATION = _keyed(
    "EnableKeyRotation",
    rotation.enable_key_rotation,
    mutating=True,
    conditions=(("rotation_period_in_days", "kms:RotationPeriodInDays"),),
)
DISABLE_KEY_ROTATION = _keyed("DisableKeyRotation", rotation.disable_key_rotation, mutating=True)
GET_KEY_ROTATION_STATUS = _keyed("GetKeyRotationStatus", rotation.get_key_rotation_status)
ROTATE_KEY_ON_DEMAND = _keyed("RotateKeyOnDemand", rotation.rotate_key_on_demand, mutating=True, slow=True)
LIST_KEY_ROTATIONS = _keyed("ListKeyRotations", rotation.list_key_rotations)

# ---------------------------------------------------------------- key usage
GET_KEY_LAST_USAGE = _keyed("GetKeyLastUsage", usage.get_key_last_usage)

# ---------------------------------------------------------------- deletion
SCHEDULE_KEY_DELETION = _keyed("ScheduleKeyDeletion", keys.schedule_key_deletion, mutating=True)
CANCEL_KEY_DELETION = _keyed("CancelKeyDeletion", keys.cancel_key_deletion, mutating=True)

# ---------------------------------------------------------------- grants
CREATE_GRANT = _keyed(
    "CreateGrant",
    grants.create_grant,
    grant=True,
    mutating=True,
    conditions=(
        ("operations", "kms:GrantOperations"),
        ("grantee_principal", "kms:GranteePrincipal"),
        ("retiring_principal", "kms:RetiringPrincipal"),
    ),
)
LIST_GRANTS = _keyed("ListGrants", grants.list_grants)
REVOKE_GRANT = _keyed("RevokeGrant", grants.revoke_grant, mutating=True)
# RetireGrant is decided by the grant itself (its retiring principal, or its grantee when
# it lists RetireGrant), which the implementation checks; anyone else needs kms:RetireGrant
# from the key's policies (another grant's RetireGrant does not reach this grant).
RETIRE_GRANT = Operation(
    "RetireGrant",
    grants.retire_grant,
    keys=(_role("kms:RetireGrant", member=None),),
    mutating=True,
)
LIST_RETIRABLE_GRANTS = Operation(
    "ListRetirableGrants", grants.list_retirable_grants, resource_member="retiring_principal"
)

# ---------------------------------------------------------------- imported key material
GET_PARAMETERS_FOR_IMPORT = _keyed(
    "GetParametersForImport",
    imports.get_parameters_for_import,
    mutating=True,  # makes a wrapping key pair in the HSM
    conditions=(("wrapping_algorithm", "kms:WrappingAlgorithm"), ("wrapping_key_spec", "kms:WrappingKeySpec")),
    slow=True,  # RSA-4096 wrapping pairs
)
IMPORT_KEY_MATERIAL = _keyed(
    "ImportKeyMaterial",
    imports.import_key_material,
    mutating=True,
    conditions=(("expiration_model", "kms:ExpirationModel"), ("valid_to", "kms:ValidTo")),
    slow=True,  # several unwraps, an EC public key recovered by signatures
)
DELETE_IMPORTED_KEY_MATERIAL = _keyed(
    "DeleteImportedKeyMaterial", imports.delete_imported_key_material, mutating=True
)


OPERATIONS: Mapping[str, Operation[Any, Any]] = {
    op.name: op for op in globals().copy().values() if isinstance(op, Operation)
}
