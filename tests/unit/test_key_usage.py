"""Key usage: per key/operation/account counters, GetKeyLastUsage, and priced reports."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from hsmkeys.authz import compile_policy
from hsmkeys.authz.model import Principal
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.cli import main
from hsmkeys.clock import FakeClock
from hsmkeys.context import CallContext, call_context
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.keystore import KeyStore
from hsmkeys.models import KeyLastUsageData
from hsmkeys.usage import Pricing, UsageReport

ACCOUNT = "111122223333"
OTHER = "444455556666"
PARTNER = f"arn:aws:iam::{OTHER}:role/partner"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
MONTH = timedelta(hours=730)  # AWS's billing month
ALLOW_ALL = compile_policy(
    json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}),
    kind="identity",
)
SHARED_POLICY = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Sid": "Admin", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
     "Action": "kms:*", "Resource": "*"},
    {"Sid": "Partner", "Effect": "Allow", "Principal": {"AWS": PARTNER},
     "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*"},
]})  # fmt: skip


def _open(path: Path, clock: FakeClock, hsm: MemoryHsm) -> KeyStore:
    principals = {PARTNER: Principal(PARTNER, identity_policy=ALLOW_ALL)}
    return KeyStore(hsm=hsm, catalog=SqliteCatalog(path), clock=clock, account_id=ACCOUNT, principals=principals)


@contextmanager
def as_partner(store: KeyStore) -> Iterator[None]:
    with call_context(CallContext(principal=store.principal(PARTNER), request_id="partner-req")):
        yield


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[Path, dict[str, str], MemoryHsm]:
    """A known sequence of requests, then a graceful stop (close flushes the counts)."""
    clock, hsm = FakeClock(T0), MemoryHsm()
    store = _open(tmp_path / "catalog.db", clock, hsm)
    red = store.create_key(policy=SHARED_POLICY, tags=[{"TagKey": "team", "TagValue": "red"}]).key_metadata.key_id
    blue = store.create_key(tags=[{"TagKey": "team", "TagValue": "blue"}]).key_metadata.key_id
    plain = store.create_key().key_metadata.key_id
    store.create_alias(alias_name="alias/red", target_key_id=red)
    for _ in range(3):
        blob = store.encrypt(key_id=red, plaintext=b"x").ciphertext_blob
    store.decrypt(ciphertext_blob=blob)
    store.decrypt(ciphertext_blob=blob)
    with as_partner(store):
        store.encrypt(key_id=f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{red}", plaintext=b"x")
    for _ in range(4):
        store.generate_data_key(key_id=blue, key_spec="AES_256")
    s3 = store.encrypt(key_id="alias/aws/s3", plaintext=b"x").key_id.rsplit("/", 1)[1]
    store.encrypt(key_id="alias/aws/s3", plaintext=b"x")
    store.generate_random(number_of_bytes=8)
    store.describe_key(key_id=plain)  # not a cryptographic request: not counted
    with contextlib.suppress(Exception):
        store.encrypt(key_id=plain, plaintext=b"x" * 5000)  # failed: not counted
    store.schedule_key_deletion(key_id=blue, pending_window_in_days=7)
    clock.advance(days=7)
    assert store.run_maintenance().purged == (blue,)  # billed for its 7 days only
    store.close()
    return tmp_path / "catalog.db", {"red": red, "blue": blue, "plain": plain, "s3": s3}, hsm


def _report(path: Path, hsm: MemoryHsm, by: str) -> UsageReport:
    store = _open(path, FakeClock(T0 + MONTH), hsm)  # a restart: everything is read back
    try:
        return store.usage_report(T0, T0 + MONTH, by=by, pricing=Pricing())
    finally:
        store.close()


def _group(report: UsageReport, name: str) -> tuple[Decimal, dict[str, int], Decimal]:
    found = {g.name: g for g in report.groups}[name]
    return found.key_months, dict(found.requests), found.cost


WEEK = Decimal(168) / Decimal(730)


def test_counts_and_costs_by_key_survive_a_restart(recorded: tuple[Path, dict[str, str], MemoryHsm]) -> None:
    path, keys, hsm = recorded
    report = _report(path, hsm, "key")
    assert _group(report, keys["red"]) == (Decimal(1), {"Decrypt": 2, "Encrypt": 4}, Decimal("1.000018"))
    assert _group(report, keys["blue"]) == (WEEK, {"GenerateDataKey": 4}, WEEK + Decimal("0.000012"))
    assert _group(report, keys["plain"]) == (Decimal(1), {}, Decimal(1))
    # An AWS managed key has no monthly fee: its requests only.
    assert _group(report, keys["s3"]) == (Decimal(1), {"Encrypt": 2}, Decimal("0.000006"))
    assert _group(report, "(no key)") == (Decimal(0), {"GenerateRandom": 1}, Decimal("0.000003"))
    total = report.total
    assert total.total_requests == 13 and total.key_months == 3 + WEEK
    assert total.cost == Decimal(2) + WEEK + Decimal("0.000039")


def test_costs_by_tag_put_keys_without_the_tag_in_untagged(recorded: tuple[Path, dict[str, str], MemoryHsm]) -> None:
    path, _, hsm = recorded
    report = _report(path, hsm, "tag:team")
    assert _group(report, "red") == (Decimal(1), {"Decrypt": 2, "Encrypt": 4}, Decimal("1.000018"))
    # The purged key keeps the tag it had when it was deleted.
    assert _group(report, "blue") == (WEEK, {"GenerateDataKey": 4}, WEEK + Decimal("0.000012"))
    assert _group(report, "(untagged)") == (Decimal(2), {"Encrypt": 2}, Decimal("1.000006"))
    assert [g.name for g in report.groups] == ["(no key)", "(untagged)", "blue", "red"]


def test_requests_by_caller_account(recorded: tuple[Path, dict[str, str], MemoryHsm]) -> None:
    path, _, hsm = recorded
    report = _report(path, hsm, "account")
    assert _group(report, OTHER)[1] == {"Encrypt": 1}
    assert _group(report, ACCOUNT)[1] == {"Decrypt": 2, "Encrypt": 5, "GenerateDataKey": 4, "GenerateRandom": 1}
    assert _group(report, "owner")[0] == 3 + WEEK  # key-months belong to the owning account


def test_custom_prices_apply(recorded: tuple[Path, dict[str, str], MemoryHsm]) -> None:
    path, _keys, hsm = recorded
    store = _open(path, FakeClock(T0 + MONTH), hsm)
    report = store.usage_report(T0, T0 + MONTH, by="alias", pricing=Pricing(Decimal("2"), Decimal("1")))
    store.close()
    assert _group(report, "alias/red") == (Decimal(1), {"Decrypt": 2, "Encrypt": 4}, Decimal("2.0006"))
    assert _group(report, "alias/aws/s3")[2] == Decimal("0.0002")


def test_a_period_counts_only_its_hours_and_prorates_key_months(
    recorded: tuple[Path, dict[str, str], MemoryHsm],
) -> None:
    path, keys, hsm = recorded
    store = _open(path, FakeClock(T0 + MONTH), hsm)
    later = store.usage_report(T0 + timedelta(hours=1), T0 + timedelta(hours=74), by="key")
    store.close()
    assert _group(later, keys["red"]) == (Decimal(73) / Decimal(730), {}, Decimal("0.1"))


def test_get_key_last_usage_reports_the_last_cryptographic_operation(tmp_path: Path) -> None:
    clock, hsm = FakeClock(T0), MemoryHsm()
    store = _open(tmp_path / "catalog.db", clock, hsm)
    source = store.create_key().key_metadata.key_id
    dest = store.create_key().key_metadata.key_id
    fresh = store.get_key_last_usage(key_id=source)
    assert fresh.key_last_usage == KeyLastUsageData() and fresh.key_creation_date == T0
    # tracking began before the key existed: the key's creation is its start
    assert fresh.tracking_start_date == max(fresh.key_creation_date, store._catalog.usage_tracking_start())
    assert fresh.tracking_start_date >= fresh.key_creation_date
    blob = store.encrypt(key_id=source, plaintext=b"x").ciphertext_blob
    clock.advance(minutes=5)
    with call_context(CallContext(request_id="re-encrypt-1")):
        store.re_encrypt(ciphertext_blob=blob, destination_key_id=dest)
    store.describe_key(key_id=source)  # not a cryptographic operation
    for key in (source, dest):
        last = store.get_key_last_usage(key_id=key).key_last_usage
        assert (last.operation, last.timestamp, last.kms_request_id, last.cloud_trail_event_id) == (
            "ReEncrypt", T0 + timedelta(minutes=5), "re-encrypt-1", "re-encrypt-1",
        )
    store.close()
    reopened = _open(tmp_path / "catalog.db", clock, hsm)
    last = reopened.get_key_last_usage(key_id=dest).key_last_usage
    assert last.kms_request_id == "re-encrypt-1"
    assert reopened.get_key_last_usage(key_id=dest).tracking_start_date <= datetime.now(UTC)
    reopened.close()


def test_requests_run_no_usage_sql_and_a_flush_costs_the_same_for_1_or_100(tmp_path: Path) -> None:
    store = _open(tmp_path / "catalog.db", FakeClock(T0), MemoryHsm())
    key = store.create_key().key_metadata.key_id
    catalog = store._catalog
    assert isinstance(catalog, SqliteCatalog)
    statements: list[str] = []
    catalog._conn.set_trace_callback(statements.append)

    def usage_sql() -> list[str]:
        found = [s for s in statements if "usage_counts" in s or "key_last_use" in s]
        statements.clear()
        return found

    for _ in range(100):
        store.encrypt(key_id=key, plaintext=b"x")
    assert usage_sql() == []
    assert store.flush_usage() == 100
    after_100 = len(usage_sql())
    store.encrypt(key_id=key, plaintext=b"x")
    generation = catalog._generation.read()
    assert store.flush_usage() == 1
    assert len(usage_sql()) == after_100 > 0
    assert catalog._generation.read() == generation  # the flush does not empty read caches
    rows = catalog.list_usage(T0, T0 + timedelta(hours=1))
    assert [(r.operation, r.count) for r in rows] == [("Encrypt", 101)]
    catalog._conn.set_trace_callback(None)
    store.close()


def test_a_failed_flush_keeps_the_counts_for_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _open(tmp_path / "catalog.db", FakeClock(T0), MemoryHsm())
    key = store.create_key().key_metadata.key_id
    store.encrypt(key_id=key, plaintext=b"x")
    catalog = store._catalog
    with monkeypatch.context() as m:
        m.setattr(catalog, "add_usage", lambda *a: (_ for _ in ()).throw(RuntimeError("down")))
        with pytest.raises(RuntimeError):
            store.flush_usage()
    store.encrypt(key_id=key, plaintext=b"x")
    assert store.flush_usage() == 2
    store.close()


def test_cli_usage_json_and_csv(
    recorded: tuple[Path, dict[str, str], MemoryHsm], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _keys, hsm = recorded
    store = _open(path, FakeClock(T0 + MONTH), hsm)
    opener = lambda: contextlib.nullcontext(store)  # noqa: E731
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    argv = ["usage", "--since", "2026-01-01", "--until", "2026-01-31T10:00:00", "--by", "tag:team"]
    assert main([*argv, "--json"], open_store=opener) == 0
    out = json.loads(capsys.readouterr().out)
    red = next(g for g in out["groups"] if g["group"] == "red")
    assert red["requests_by_operation"] == {"Decrypt": 2, "Encrypt": 4} and red["cost"] == "1.000018"
    assert out["total"]["requests"] == 13
    assert main([*argv, "--csv"], open_store=opener) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(",")[:3] == ["tag:team", "key_months", "requests"]
    assert lines[-1].startswith("total,")
    assert main(["usage", "--by", "colour"], open_store=opener) == 2
    store.close()
