"""Crash between the HSM write and the catalog commit, across hosts: instance A is killed
mid-rotation or mid-CreateKey (after its new HSM object exists, before the row commits);
B keeps serving and its maintenance sweeper destroys the orphan once the grace period
has passed."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cluster import Instance, init_token, write_config
from pgserver import PgServer

GRACE_S = 1.0  # doctor_grace_seconds: two sightings at least this far apart


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def _two_hosts(pg_server: PgServer, tmp_path: Path, fault_on_a: str) -> Iterator[tuple[Instance, Instance]]:
    """Hosts A (armed to die at ``fault_on_a``) and B on one token and one database."""
    database = pg_server.create_database()
    shared = tmp_path / "shared"
    shared.mkdir()
    dsn = pg_server.dsn(database)
    config_a = write_config(tmp_path / "a", shared, dsn, doctor_grace_seconds=GRACE_S)
    config_b = write_config(tmp_path / "b", shared, dsn, doctor_grace_seconds=GRACE_S)
    init_token(config_a)
    a = Instance("a", config_a, shared, env={"HSMKEYS_FAULT_POINTS": f"{fault_on_a}=kill"})
    b = Instance("b", config_b, shared)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.stop()
        assert b.stop() == 0, "".join(b.lines)
        pg_server.drop_database(database)


def test_a_host_killed_mid_rotation_leaves_b_serving_and_the_sweeper_repairs(
    pg_server: PgServer, tmp_path: Path
) -> None:
    with _two_hosts(pg_server, tmp_path, "rotate.hsm_done") as (a, b):
        key = a.client().create_key()["KeyMetadata"]["KeyId"]
        old_blob = b.client().encrypt(KeyId=key, Plaintext=b"before")["CiphertextBlob"]
        with pytest.raises(Exception):  # noqa: B017 - A dies with its HSM object made, no row
            a.client().rotate_key_on_demand(KeyId=key)
        assert a.process is not None and a.process.wait(timeout=10) == -9
        kms = b.client()
        assert kms.decrypt(CiphertextBlob=old_blob)["Plaintext"] == b"before"
        assert kms.list_key_rotations(KeyId=key)["Rotations"] == []  # the rotation never committed
        new_blob = kms.encrypt(KeyId=key, Plaintext=b"after")["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=new_blob)["Plaintext"] == b"after"
        # B holds the lease once A's has run out; its sweeper sees the orphan twice and destroys it.
        _wait_for(lambda: b.logged("event=doctor_destroyed_orphan"), 15, "B sweeps A's orphan")
        assert f"hsmkeys/{key}/v2" in "".join(line for line in b.lines if "doctor_destroyed_orphan" in line)
        kms.rotate_key_on_demand(KeyId=key)  # version 2 is free again, and rotation works
        assert kms.decrypt(CiphertextBlob=old_blob)["Plaintext"] == b"before"


def test_a_host_killed_mid_create_leaves_a_pending_object_the_other_sweeps(pg_server: PgServer, tmp_path: Path) -> None:
    with _two_hosts(pg_server, tmp_path, "create_key.hsm_done") as (a, b):
        with pytest.raises(Exception):  # noqa: B017 - A dies with the object made, no key row
            a.client().create_key()
        assert a.process is not None and a.process.wait(timeout=10) == -9
        kms = b.client()
        key = kms.create_key()["KeyMetadata"]["KeyId"]  # B carries on
        assert kms.decrypt(CiphertextBlob=kms.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"])["Plaintext"] == b"x"
        _wait_for(lambda: b.logged("event=doctor_destroyed_orphan"), 15, "B sweeps A's pending object")
        assert len(kms.list_keys()["Keys"]) == 1  # A's half-made key never existed for clients
