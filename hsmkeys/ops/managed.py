"""AWS managed keys: ``alias/aws/<service>``, created on first use, not manageable.

A KeyId ``alias/aws/<service>`` (or its alias ARN) given where the operation table
marks the key role ``creates_aws_managed`` (Encrypt, GenerateDataKey*,
GenerateDataKeyPair*, ReEncrypt's destination, DescribeKey) creates that key in the
store's account the first time, then the call proceeds. Exactly one key is created
even when first uses race in threads, processes or catalog instances: each racer makes
its HSM object first (crash-safe ordering), then, under the catalog's write
transaction, looks the alias up again; the loser destroys its object and uses the
winner's key.

The key is as AWS makes it: KeyManager AWS, the description AWS gives it, automatic
rotation every 365 days (not configurable), and a fixed key policy letting any
principal of the owning account use it for cryptography and DescribeKey (and the
account root read it). Managing it is refused with the error AWS returns:
UnsupportedOperationException where the operation's model lists that error for it
(PutKeyPolicy, Enable/DisableKeyRotation, RotateKeyOnDemand), else AccessDeniedException,
which is what AWS's fixed policy answers (EnableKey, DisableKey, ScheduleKeyDeletion,
CancelKeyDeletion, TagResource, UntagResource, UpdateKeyDescription, CreateGrant, and
the alias operations on ``alias/aws/*`` names or AWS managed keys). CreateAlias of a
reserved name stays InvalidAliasNameException, as documented.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING

from hsmkeys.catalog.base import AliasRecord, KeyRecord, VersionRecord
from hsmkeys.errors import AccessDeniedException, KMSError, UnsupportedOperationException
from hsmkeys.models import KeyManager, KeySpec, KeyState, KeyUsage, Origin
from hsmkeys.ops.common import DEFAULT_ROTATION_PERIOD_DAYS

if TYPE_CHECKING:
    from hsmkeys.call import Call
    from hsmkeys.keystore import KeyStore

log = logging.getLogger("hsmkeys.managed")

AWS_ALIAS_PREFIX = "alias/aws/"
_SERVICE_ALIAS = re.compile(r"alias/aws/[a-z0-9-]+")

#: The AWS managed key aliases ListAliases shows before their keys exist (AWS lists
#: these predefined names without a TargetKeyId until a service first uses them).
PREDEFINED_ALIASES: tuple[str, ...] = tuple(
    f"{AWS_ALIAS_PREFIX}{service}"
    for service in (
        "acm",
        "dynamodb",
        "ebs",
        "elasticfilesystem",
        "es",
        "glue",
        "kinesisvideo",
        "lambda",
        "rds",
        "redshift",
        "s3",
        "secretsmanager",
        "ssm",
        "xray",
    )
)

_CRYPTO_ACTIONS = (
    "kms:Encrypt",
    "kms:Decrypt",
    "kms:ReEncrypt*",
    "kms:GenerateDataKey*",
    "kms:DescribeKey",
)


def is_service_alias(name: str) -> bool:
    """Whether ``name`` is ``alias/aws/<service>`` (lowercase letters, digits, hyphens)."""
    return _SERVICE_ALIAS.fullmatch(name) is not None


def description(service: str) -> str:
    return f"Default key that protects my {service} data when no other key is defined"


def key_policy(account_id: str, service: str) -> str:
    """The fixed policy: the account's principals use it, the account root reads it."""
    doc = {
        "Version": "2012-10-17",
        "Id": f"auto-{service}-1",
        "Statement": [
            {
                "Sid": f"Allow access through {service} for all principals in the account that are authorized",
                "Effect": "Allow",
                "Principal": {"AWS": "*"},
                "Action": list(_CRYPTO_ACTIONS),
                "Resource": "*",
                "Condition": {"StringEquals": {"kms:CallerAccount": account_id}},
            },
            {
                "Sid": "Allow direct access to key metadata to the account",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{account_id}:root"},
                "Action": ["kms:Describe*", "kms:Get*", "kms:List*"],
                "Resource": "*",
            },
        ],
    }
    return json.dumps(doc, indent=2)


def ensure_key(ks: KeyStore, call: Call, alias_name: str) -> None:
    """Create the AWS managed key ``alias_name`` names unless it exists (exactly once).

    Only for a trusted caller or a principal of the store's account: another account's
    alias/aws/* names that account's own keys, which this store does not hold.
    """
    if not is_service_alias(alias_name):
        return
    principal = call.principal
    if principal is not None and principal.account != ks.account_id:
        return
    catalog = ks._catalog
    if catalog.get_alias(alias_name) is not None:
        return
    service = alias_name[len(AWS_ALIAS_PREFIX) :]
    now = ks._now()
    key = KeyRecord(
        key_uuid=uuid.uuid4(),
        spec=KeySpec.SYMMETRIC_DEFAULT,
        usage=KeyUsage.ENCRYPT_DECRYPT,
        origin=Origin.AWS_KMS,
        state=KeyState.ENABLED,
        description=description(service),
        created_at=now,
        current_version=1,
        rotation_period_days=DEFAULT_ROTATION_PERIOD_DAYS,
        next_rotation_at=now + timedelta(days=DEFAULT_ROTATION_PERIOD_DAYS),
        policy=key_policy(ks.account_id, service),
        key_manager=KeyManager.AWS,
    )
    first = VersionRecord(key.key_uuid, 1, now)
    ks._make_new_key_object(first.ref, key.spec, key.usage)  # HSM first: a crash leaves an orphan only
    try:
        with catalog.transaction():
            won = catalog.get_alias(alias_name) is None  # re-checked under the write lock
            if won:
                catalog.insert_key(key, first)
                catalog.insert_alias(AliasRecord(alias_name, key.key_uuid, now, now))
            catalog.remove_pending_object(first.ref.label)
    except BaseException:
        ks._hsm.destroy_key(first.ref)
        catalog.remove_pending_object(first.ref.label)
        raise
    if not won:
        ks._hsm.destroy_key(first.ref)  # another caller created it first: use theirs
        return
    log.info("event=aws_managed_key_created alias=%s key=%s", alias_name, key.key_uuid)
    ks._record_managed_creation(call, ks._arn(key.key_uuid))


def _denied(call: Call, ks: KeyStore, key: KeyRecord) -> KMSError:
    who = call.principal.arn if call.principal is not None else "the caller"
    return AccessDeniedException(
        f"User: {who} is not authorized to perform: {call.op.action} on resource: "
        f"{ks._arn(key.key_uuid)} because no resource-based policy allows the {call.op.action} action "
        "(it is an AWS managed key)"
    )


def _unsupported(call: Call, ks: KeyStore, key: KeyRecord) -> KMSError:
    return UnsupportedOperationException(
        f"{ks._arn(key.key_uuid)} is an AWS managed key: {call.op.name} is not supported on it."
    )


#: Operations refused on an AWS managed key, by name, with the error AWS returns.
REFUSED: Mapping[str, Callable[[Call, KeyStore, KeyRecord], KMSError]] = {
    "PutKeyPolicy": _unsupported,
    "EnableKeyRotation": _unsupported,
    "DisableKeyRotation": _unsupported,
    "RotateKeyOnDemand": _unsupported,
    "EnableKey": _denied,
    "DisableKey": _denied,
    "ScheduleKeyDeletion": _denied,
    "CancelKeyDeletion": _denied,
    "TagResource": _denied,
    "UntagResource": _denied,
    "UpdateKeyDescription": _denied,
    "CreateGrant": _denied,
    "CreateAlias": _denied,
    "UpdateAlias": _denied,
    "DeleteAlias": _denied,
}


def refuse_management(ks: KeyStore, call: Call, key: KeyRecord) -> None:
    """Raise the error AWS returns when ``call`` would manage the AWS managed ``key``."""
    if key.key_manager is KeyManager.AWS:
        refusal = REFUSED.get(call.op.name)
        if refusal is not None:
            raise refusal(call, ks, key)


def refuse_alias_name(call: Call, name: str) -> None:
    """UpdateAlias / DeleteAlias of an ``alias/aws/*`` name: AccessDeniedException."""
    if name.startswith(AWS_ALIAS_PREFIX):
        who = call.principal.arn if call.principal is not None else "the caller"
        raise AccessDeniedException(
            f"User: {who} is not authorized to perform: {call.op.action} on resource: {name} "
            "(alias/aws/ names belong to AWS managed keys)"
        )
