"""Two ``hsmkeys serve`` instances (A and B) on one SoftHSM2 token and one PostgreSQL
catalog, each with its own config file and process, as two hosts behind a load balancer:
what one does, the other sees at once; one alias race has one winner; maintenance runs
in the lease holder only; and when A is killed mid-traffic, B carries on and takes over
maintenance.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from botocore.exceptions import ClientError
from cluster import (
    ACCOUNT,
    APP,
    LEASE_S,
    MAINTENANCE_INTERVAL_S,
    Instance,
    init_token,
    write_config,
)
from pgserver import PgServer

from hsmkeys.catalog.postgres import PostgresCatalog

pytestmark = [pytest.mark.hsm, pytest.mark.server]

PLAINTEXT = b"multi-host secret"
VISIBLE_WITHIN_S = 0.1  # a change committed through one instance is enforced by the other


@dataclass
class Cluster:
    a: Instance
    b: Instance
    dsn: str
    catalog: PostgresCatalog  # the test's own view of the shared database

    def lease_holder_pid(self) -> int | None:
        """The pid in the holder of the unexpired maintenance lease, None if nobody holds it."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT holder FROM maintenance_lease WHERE expires > clock_timestamp()"
            ).fetchone()
        return None if row is None else int(str(row[0]).split(":")[1])

    def make_rotation_due(self, key_id: str) -> None:
        record = self.catalog.get_key(uuid.UUID(key_id))
        assert record is not None and record.rotation_period_days is not None
        self.catalog.update_key(replace(record, next_rotation_at=datetime.now(UTC) - timedelta(seconds=1)))


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` until it holds; seconds it took. Fails after ``timeout``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def cluster(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    database = pg_server.create_database()
    dsn = pg_server.dsn(database)
    root = tmp_path_factory.mktemp("multihost")
    shared = root / "shared"  # the HSM (token directory) and the secrets every host is given
    shared.mkdir()
    config_a, config_b = write_config(root / "a", shared, dsn), write_config(root / "b", shared, dsn)
    init_token(config_a)  # creates the token, its pin file and the principals' secrets
    a, b = Instance("a", config_a, shared), Instance("b", config_b, shared)
    catalog = PostgresCatalog(dsn, pool_size=1)
    try:
        a.start()
        # A starts first, so it takes the maintenance lease; B then finds it held.
        _wait_for(lambda: a.logged(f":{a.pid}:") and a.logged("event=maintenance_lease held=True"), 10, "A leads")
        b.start()
        yield Cluster(a, b, dsn, catalog)
        assert b.stop() == 0, "".join(b.lines)
    finally:
        a.stop()
        b.stop()
        catalog.close()
        pg_server.drop_database(database)


def _error_code(call: Callable[[], object]) -> str | None:
    try:
        call()
    except ClientError as exc:
        return str(exc.response["Error"]["Code"])
    return None


def _refused_with(code: str, call: Callable[[], object]) -> Callable[[], bool]:
    return lambda: _error_code(call) == code


def _new_key(instance: Instance, **kwargs: Any) -> str:
    return str(instance.client().create_key(**kwargs)["KeyMetadata"]["KeyId"])


def test_a_key_created_on_a_encrypts_on_b_and_its_blob_decrypts_on_a(cluster: Cluster) -> None:
    key = _new_key(cluster.a)
    blob = cluster.b.client().encrypt(KeyId=key, Plaintext=PLAINTEXT)["CiphertextBlob"]
    assert cluster.a.client().decrypt(CiphertextBlob=blob)["Plaintext"] == PLAINTEXT


def test_after_a_rotation_on_a_b_decrypts_blobs_of_the_old_and_the_new_version(cluster: Cluster) -> None:
    a, b = cluster.a.client(), cluster.b.client()
    key = _new_key(cluster.a)
    old = b.encrypt(KeyId=key, Plaintext=b"old")["CiphertextBlob"]  # B has the key cached now
    a.rotate_key_on_demand(KeyId=key)
    new = a.encrypt(KeyId=key, Plaintext=b"new")["CiphertextBlob"]
    assert old != new
    _wait_for(lambda: b.decrypt(CiphertextBlob=new)["Plaintext"] == b"new", VISIBLE_WITHIN_S, "B decrypts v2")
    assert b.decrypt(CiphertextBlob=old)["Plaintext"] == b"old"
    assert len(b.list_key_rotations(KeyId=key)["Rotations"]) == 1


def test_a_key_disabled_on_b_is_refused_on_a_within_100_ms(cluster: Cluster) -> None:
    a, b = cluster.a.client(), cluster.b.client()
    key = _new_key(cluster.a)
    a.encrypt(KeyId=key, Plaintext=PLAINTEXT)  # A has the key cached as Enabled
    b.disable_key(KeyId=key)
    took = _wait_for(
        _refused_with("DisabledException", lambda: a.encrypt(KeyId=key, Plaintext=PLAINTEXT)),
        VISIBLE_WITHIN_S,
        "A refuses the disabled key",
    )
    print(f"cross-instance disable visible after {took * 1000:.1f} ms")


def test_a_deletion_scheduled_on_a_is_refused_on_b(cluster: Cluster) -> None:
    a, b = cluster.a.client(), cluster.b.client()
    key = _new_key(cluster.a)
    b.encrypt(KeyId=key, Plaintext=PLAINTEXT)
    a.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    _wait_for(
        _refused_with("KMSInvalidStateException", lambda: b.encrypt(KeyId=key, Plaintext=PLAINTEXT)),
        VISIBLE_WITHIN_S,
        "B refuses a key pending deletion",
    )
    assert b.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "PendingDeletion"


def _policy(*, app_may_encrypt: bool) -> str:
    statements: list[dict[str, Any]] = [
        {"Sid": "Account", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
         "Action": "kms:*", "Resource": "*"},
    ]  # fmt: skip
    if app_may_encrypt:
        statements.append(
            {"Sid": "App", "Effect": "Allow", "Principal": {"AWS": APP}, "Action": "kms:Encrypt", "Resource": "*"}
        )
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


def test_a_key_policy_changed_on_one_instance_is_enforced_on_the_other(cluster: Cluster) -> None:
    admin_a, admin_b = cluster.a.client(), cluster.b.client()
    app_a, app_b = cluster.a.client(APP), cluster.b.client(APP)
    key = _new_key(cluster.a, Policy=_policy(app_may_encrypt=False))

    def app_encrypts_on(client: Any) -> Callable[[], object]:
        return lambda: client.encrypt(KeyId=key, Plaintext=PLAINTEXT)

    assert _error_code(app_encrypts_on(app_b)) == "AccessDeniedException"
    admin_a.put_key_policy(KeyId=key, PolicyName="default", Policy=_policy(app_may_encrypt=True))
    _wait_for(lambda: _error_code(app_encrypts_on(app_b)) is None, VISIBLE_WITHIN_S, "B allows the app")
    assert _error_code(app_encrypts_on(app_a)) is None  # A has the allow cached now
    admin_b.put_key_policy(KeyId=key, PolicyName="default", Policy=_policy(app_may_encrypt=False))
    _wait_for(
        _refused_with("AccessDeniedException", app_encrypts_on(app_a)), VISIBLE_WITHIN_S, "A denies the app again"
    )


def _create_alias(client: Any, name: str, key: str, start: threading.Barrier, outcomes: list[str]) -> None:
    start.wait()
    outcomes.append(_error_code(lambda: client.create_alias(AliasName=name, TargetKeyId=key)) or "created")


def test_one_alias_name_created_from_both_at_once_has_one_winner(cluster: Cluster) -> None:
    key_a, key_b = _new_key(cluster.a), _new_key(cluster.b)
    for _ in range(5):
        name = f"alias/race-{uuid.uuid4().hex[:12]}"
        start, outcomes = threading.Barrier(2), list[str]()
        threads = [
            threading.Thread(target=_create_alias, args=(instance.client(), name, key, start, outcomes))
            for instance, key in ((cluster.a, key_a), (cluster.b, key_b))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == ["AlreadyExistsException", "created"]
        aliases = cluster.b.client().list_aliases()["Aliases"]
        assert [alias["TargetKeyId"] for alias in aliases if alias["AliasName"] == name] in ([key_a], [key_b])


def test_a_due_rotation_is_done_once_by_the_lease_holder_only(cluster: Cluster) -> None:
    assert cluster.lease_holder_pid() == cluster.a.pid
    key = _new_key(cluster.b)
    cluster.b.client().enable_key_rotation(KeyId=key, RotationPeriodInDays=90)
    cluster.make_rotation_due(key)

    def rotations() -> int:
        return len(cluster.b.client().list_key_rotations(KeyId=key)["Rotations"])

    _wait_for(lambda: rotations() == 1, 5 * MAINTENANCE_INTERVAL_S + 2, "the due rotation")
    time.sleep(3 * MAINTENANCE_INTERVAL_S)  # both loops ran again meanwhile
    assert rotations() == 1
    assert cluster.a.logged("event=maintenance rotated=1 ")
    assert not cluster.b.logged("event=maintenance_lease held=True")  # B never ran maintenance
    assert not cluster.b.logged("event=maintenance rotated")


def _traffic(instance: Instance, key: str, stop: threading.Event, outcomes: list[tuple[float, bool]]) -> None:
    client = instance.client()
    while not stop.is_set():
        try:
            client.encrypt(KeyId=key, Plaintext=PLAINTEXT)
            outcomes.append((time.monotonic(), True))
        except Exception:  # a killed server: refused or reset connections
            outcomes.append((time.monotonic(), False))
            time.sleep(0.01)


def test_b_carries_on_when_a_is_killed_mid_traffic_and_takes_over_maintenance(cluster: Cluster) -> None:
    """Last in this module: it kills A."""
    key = _new_key(cluster.a)
    made_on_a = cluster.a.client().encrypt(KeyId=key, Plaintext=PLAINTEXT)["CiphertextBlob"]
    stop = threading.Event()
    seen: dict[str, list[tuple[float, bool]]] = {"a": [], "b": []}
    threads = [
        threading.Thread(target=_traffic, args=(instance, key, stop, seen[instance.name]))
        for instance in (cluster.a, cluster.a, cluster.b, cluster.b)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    killed_at = time.monotonic()
    cluster.a.kill()
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join()
    assert any(ok for when, ok in seen["a"] if when < killed_at)
    assert not any(ok for when, ok in seen["a"] if when > killed_at + 0.5)
    assert all(ok for _, ok in seen["b"]), "B failed requests while A died"
    assert sum(1 for when, _ in seen["b"] if when > killed_at) >= 20
    b = cluster.b.client()
    assert b.decrypt(CiphertextBlob=made_on_a)["Plaintext"] == PLAINTEXT

    took = _wait_for(lambda: cluster.lease_holder_pid() == cluster.b.pid, LEASE_S + 2, "B takes the lease")
    assert took <= LEASE_S + 1
    b.enable_key_rotation(KeyId=key, RotationPeriodInDays=90)
    cluster.make_rotation_due(key)
    _wait_for(lambda: len(b.list_key_rotations(KeyId=key)["Rotations"]) == 1, 3, "B rotates the due key")
    # The log line follows the commit the client saw: wait for it rather than race it.
    _wait_for(lambda: cluster.b.logged("event=maintenance rotated=1 "), 3, "B logs its maintenance run")


def test_the_instances_keep_their_own_files(cluster: Cluster) -> None:
    """Each host's maintenance lock and audit log sit in its own folder."""
    for instance in (cluster.a, cluster.b):
        var = Path(instance.config).parent / "var"
        assert (var / "audit.log").exists()
        assert (var / "catalog.postgresql.maintenance.lock").exists()
