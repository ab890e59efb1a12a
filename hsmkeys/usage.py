"""Key usage: request counters per key, operation and caller account, and their cost.

Counted (``COUNTED_OPERATIONS``): every successful cryptographic request, the
operations AWS bills per request: Encrypt, Decrypt, ReEncrypt, GenerateDataKey*,
GenerateDataKeyPair*, Sign, Verify, GenerateMac, VerifyMac, DeriveSharedSecret,
GetPublicKey and GenerateRandom (keyless: counted under no key). A ReEncrypt is one
request, counted on its destination key. Management and read-only calls are not
counted (their cost is not what KMS pricing is about; /metrics still counts them).

The last use of a key (``GetKeyLastUsage``) is the last successful operation of
``TRACKED_OPERATIONS``, the botocore model's KeyLastUsageTrackingOperation values
hsmkeys serves; a ReEncrypt is a use of both its keys.

:class:`UsageRecorder` keeps the counts in memory (one dict increment per request,
no SQL) and :meth:`UsageRecorder.flush` adds them to the catalog in one transaction;
the server flushes every few seconds and ``KeyStore.close`` flushes at the end.

:func:`usage_report` prices a period: key-months prorated hourly from each key's
creation to its deletion (or the end of the period), as AWS bills them, at
``key_month`` per month (AWS managed keys: no monthly fee), plus requests at
``per_10k_requests`` per 10,000.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

from hsmkeys.catalog.base import KeyLastUse, KeyLifetime, UsageCount
from hsmkeys.models import KeyManager

if TYPE_CHECKING:
    from hsmkeys.catalog.base import Catalog

__all__ = [
    "COUNTED_OPERATIONS",
    "GROUPINGS",
    "TRACKED_OPERATIONS",
    "Pricing",
    "UsageGroup",
    "UsageRecorder",
    "UsageReport",
    "usage_report",
]

TRACKED_OPERATIONS = frozenset(
    {
        "Decrypt",
        "DeriveSharedSecret",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateMac",
        "ReEncrypt",
        "Sign",
        "Verify",
        "VerifyMac",
    }
)
COUNTED_OPERATIONS = TRACKED_OPERATIONS | {"GetPublicKey", "GenerateRandom"}

#: Hours in AWS's billing month (730 = 24 * 365 / 12): a key-month is a key for 730 hours.
HOURS_PER_MONTH = Decimal(730)
_HOUR = 3600
_ONE_HOUR = timedelta(hours=1)
UNTAGGED = "(untagged)"
NO_ALIAS = "(no alias)"
NO_KEY = "(no key)"
GROUPINGS = ("key", "alias", "account", "operation")


class UsageRecorder:
    """In-memory counters of one KeyStore; thread-safe, O(1) per request."""

    __slots__ = ("_counts", "_hour", "_last", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (hour number since the epoch, key uuid text or "", operation, account) -> count
        self._counts: dict[tuple[int, str, str, str], int] = {}
        self._last: dict[str, tuple[str, datetime, str]] = {}  # key uuid text -> (op, time, request id)
        # The hour of the last request: (its start, its end, its number); a comparison per
        # request instead of a timestamp conversion.
        self._hour: tuple[datetime, datetime, int] | None = None

    def record(self, operation: str, key_arns: list[str], account: str, when: datetime, request_id: str) -> None:
        """Count one successful request of a counted operation (callers check the set)."""
        span = self._hour
        if span is None or not span[0] <= when < span[1]:
            hour = int(when.timestamp()) // _HOUR
            start = datetime.fromtimestamp(hour * _HOUR, UTC)
            span = self._hour = (start, start + _ONE_HOUR, hour)
        counted = key_arns[-1][key_arns[-1].rfind("/") + 1 :] if key_arns else ""
        entry = (span[2], counted, operation, account)
        with self._lock:
            self._counts[entry] = self._counts.get(entry, 0) + 1
            if operation in TRACKED_OPERATIONS:
                for arn in key_arns:
                    self._last[arn[arn.rfind("/") + 1 :]] = (operation, when, request_id)

    def pending_last_use(self, key_uuid: uuid.UUID) -> KeyLastUse | None:
        """This process's last use of the key not yet flushed, if any."""
        with self._lock:
            found = self._last.get(str(key_uuid))
        return None if found is None else KeyLastUse(*found)

    def flush(self, catalog: Catalog) -> int:
        """Add the counts to the catalog (one transaction); returns the requests flushed.

        On failure the counts are kept for the next flush, so none is lost or doubled.
        """
        with self._lock:
            counts, self._counts = self._counts, {}
            last, self._last = self._last, {}
        if not (counts or last):
            return 0
        rows = [
            UsageCount(uuid.UUID(key) if key else None, op, account, datetime.fromtimestamp(hour * _HOUR, UTC), n)
            for (hour, key, op, account), n in counts.items()
        ]
        uses = {uuid.UUID(k): KeyLastUse(*v) for k, v in last.items()}
        try:
            catalog.add_usage(rows, uses)
        except BaseException:
            with self._lock:
                for entry, n in counts.items():
                    self._counts[entry] = self._counts.get(entry, 0) + n
                for k, v in last.items():
                    newer = self._last.get(k)
                    if newer is None or newer[1] < v[1]:
                        self._last[k] = v
            raise
        return sum(counts.values())


# ------------------------------------------------------------------ the report


@dataclass(frozen=True, slots=True)
class Pricing:
    """Prices from the config's ``pricing:`` section (AWS list prices by default)."""

    key_month: Decimal = Decimal("1.00")
    per_10k_requests: Decimal = Decimal("0.03")


@dataclass(frozen=True, slots=True)
class UsageGroup:
    name: str
    key_months: Decimal
    requests: Mapping[str, int]  # operation -> successful requests
    key_cost: Decimal
    request_cost: Decimal

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def cost(self) -> Decimal:
        return self.key_cost + self.request_cost


@dataclass(frozen=True, slots=True)
class UsageReport:
    since: datetime
    until: datetime
    by: str
    groups: tuple[UsageGroup, ...]
    total: UsageGroup
    pricing: Pricing = field(default_factory=Pricing)


def _overlap_hours(life: KeyLifetime, since: datetime, until: datetime) -> Decimal:
    start = max(life.created_at, since)
    end = min(life.deleted_at or until, until)
    seconds = (end - start).total_seconds()
    return Decimal(max(seconds, 0.0)) / Decimal(_HOUR)


def _labels(life: KeyLifetime | None, key: str | None, by: str) -> list[str]:
    """The groups a key's numbers go to under ``by`` (key, alias, tag:<name>)."""
    if key is None:
        return [NO_KEY]
    if by == "key":
        return [key]
    if by == "alias":
        aliases = life.aliases if life is not None else ()
        return [aliases[0] if aliases else NO_ALIAS]
    tag = by[4:]
    tags = life.tags if life is not None else {}
    return [tags.get(tag, UNTAGGED)]


def usage_report(
    catalog: Catalog, since: datetime, until: datetime, *, by: str = "key", pricing: Pricing | None = None
) -> UsageReport:
    """Key-months, requests and cost per group over [since, until).

    ``by``: key, alias (a key's first alias by name), account (the caller's; key-months
    go to the owning account, ``owner``), operation (key-months are not split by
    operation and go to the totals only), or ``tag:<name>`` (keys without it:
    ``(untagged)``). Requests are counted per whole hour, so a period should start and
    end on the hour to be exact.
    """
    if by not in GROUPINGS and not (by.startswith("tag:") and len(by) > 4):
        raise ValueError(f"--by must be one of {', '.join(GROUPINGS)} or tag:<name>, not {by!r}")
    prices = pricing or Pricing()
    lifetimes = {str(life.key_uuid): life for life in catalog.list_key_lifetimes(since, until)}
    months: dict[str, Decimal] = {}
    requests: dict[str, dict[str, int]] = {}
    key_costs: dict[str, Decimal] = {}

    def add_months(group: str, life: KeyLifetime) -> None:
        hours = _overlap_hours(life, since, until)
        months[group] = months.get(group, Decimal(0)) + hours / HOURS_PER_MONTH
        fee = Decimal(0) if life.key_manager is KeyManager.AWS else prices.key_month
        key_costs[group] = key_costs.get(group, Decimal(0)) + fee * hours / HOURS_PER_MONTH

    total_months = Decimal(0)
    total_key_cost = Decimal(0)
    for key, life in lifetimes.items():
        hours = _overlap_hours(life, since, until)
        total_months += hours / HOURS_PER_MONTH
        if life.key_manager is not KeyManager.AWS:
            total_key_cost += prices.key_month * hours / HOURS_PER_MONTH
        if by == "account":
            add_months("owner", life)
        elif by != "operation":
            for group in _labels(life, key, by):
                add_months(group, life)
    total_requests: dict[str, int] = {}
    for row in catalog.list_usage(since, until):
        used = None if row.key_uuid is None else str(row.key_uuid)
        if by == "account":
            labels = [row.account]
        elif by == "operation":
            labels = [row.operation]
        else:
            labels = _labels(lifetimes.get(used) if used else None, used, by)
        for group in labels:
            per_op = requests.setdefault(group, {})
            per_op[row.operation] = per_op.get(row.operation, 0) + row.count
        total_requests[row.operation] = total_requests.get(row.operation, 0) + row.count

    def priced(name: str, key_months: Decimal, reqs: Mapping[str, int], key_cost: Decimal) -> UsageGroup:
        request_cost = prices.per_10k_requests * Decimal(sum(reqs.values())) / Decimal(10000)
        return UsageGroup(name, key_months, dict(sorted(reqs.items())), key_cost, request_cost)

    names = sorted(set(months) | set(requests))
    groups = tuple(
        priced(n, months.get(n, Decimal(0)), requests.get(n, {}), key_costs.get(n, Decimal(0))) for n in names
    )
    total = priced("total", total_months, total_requests, total_key_cost)
    return UsageReport(since, until, by, groups, total, prices)


def month_start(now: datetime) -> datetime:
    """The first instant of ``now``'s UTC month (the report's default start)."""
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def hour_floor(when: datetime) -> datetime:
    return when.replace(minute=0, second=0, microsecond=0)


def parse_day(text: str) -> datetime:
    """``YYYY-MM-DD`` or an ISO date-time (UTC when no offset): ValueError otherwise."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

