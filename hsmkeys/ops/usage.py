"""GetKeyLastUsage: the last successful cryptographic operation on a key.

Recorded by :meth:`hsmkeys.keystore.KeyStore.invoke` for the operations in
:data:`hsmkeys.usage.TRACKED_OPERATIONS`, kept in memory and flushed to the catalog
every few seconds; this process's unflushed use is seen at once, another worker's after
its next flush. The request id is the one on the call's audit line (CloudTrailEventId
and KmsRequestId both carry it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hsmkeys.models import GetKeyLastUsageResult, KeyLastUsageData

if TYPE_CHECKING:
    from hsmkeys.call import Call
    from hsmkeys.keystore import KeyStore


def get_key_last_usage(ks: KeyStore, call: Call, *, key_id: str) -> GetKeyLastUsageResult:
    key = ks._key(call, key_id, alias_ok=False)  # "Alias names are not supported."
    arn = ks._arn(key.key_uuid)
    call.used(arn, None)
    stored = ks._catalog.get_key_last_use(key.key_uuid)
    pending = ks._usage.pending_last_use(key.key_uuid)
    last = pending if stored is None or (pending is not None and pending.time >= stored.time) else stored
    usage = KeyLastUsageData() if last is None else KeyLastUsageData(
        last.operation, last.time, last.request_id, last.request_id
    )
    return GetKeyLastUsageResult(
        key_id=arn,  # the key ARN, as every other response's top-level KeyId
        tracking_start_date=max(ks._catalog.usage_tracking_start(), key.created_at),
        key_creation_date=key.created_at,
        key_last_usage=usage,
    )
