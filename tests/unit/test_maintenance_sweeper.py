"""run_maintenance's sweeper: orphans of crashed creates/rotations go after the grace period."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from hsmkeys import faultpoints
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.clock import FakeClock
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.keystore import KeyStore
from hsmkeys.models import KeySpec, KeyUsage, KeyVersionRef


def test_an_orphan_from_another_instance_is_swept_only_after_the_grace_period(tmp_path: Path) -> None:
    hsm, clock = MemoryHsm(), FakeClock()
    host_a = KeyStore(hsm=hsm, catalog=SqliteCatalog(tmp_path / "c.db"), clock=clock, doctor_grace_seconds=600)
    host_b = KeyStore(hsm=hsm, catalog=SqliteCatalog(tmp_path / "c.db"), clock=clock, doctor_grace_seconds=600)
    key = host_a.create_key().key_metadata
    blob = host_a.encrypt(key_id=key.key_id, plaintext=b"x").ciphertext_blob
    faultpoints.arm("rotate.hsm_done", "raise:1")  # A dies between the HSM write and the commit
    try:
        with pytest.raises(faultpoints.FaultPointError):
            host_a.rotate_key_on_demand(key_id=key.key_id)
    finally:
        faultpoints.disarm_all()
    orphan = KeyVersionRef(uuid.UUID(key.key_id), 2)
    assert hsm.has_key(orphan)
    assert host_b.run_maintenance().swept == ()  # no sweep at start-up (a whole-token scan)
    clock.advance(seconds=301)
    assert host_b.run_maintenance().swept == ()  # first sighting: a rotation may be in flight
    clock.advance(seconds=299)
    assert host_b.run_maintenance().swept == ()  # not yet due for a sweep
    clock.advance(seconds=302)
    assert host_b.run_maintenance().swept == (orphan.label,)
    assert not hsm.has_key(orphan)
    assert host_b.decrypt(ciphertext_blob=blob).plaintext == b"x"
    assert host_b.doctor().consistent


def test_objects_of_keys_the_catalog_does_not_know_are_never_swept_automatically(tmp_path: Path) -> None:
    """Another deployment may share the token: only an operator's doctor --fix removes those."""
    hsm, clock = MemoryHsm(), FakeClock()
    store = KeyStore(hsm=hsm, catalog=SqliteCatalog(tmp_path / "c.db"), clock=clock, doctor_grace_seconds=600)
    foreign = KeyVersionRef(uuid.uuid4(), 1)
    hsm.create_key(foreign, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
    for _ in range(3):
        assert store.run_maintenance().swept == ()
        clock.advance(seconds=700)
    assert hsm.has_key(foreign)
    assert store.doctor(fix=True).destroyed == (foreign,)  # the operator's explicit fix


def test_an_object_of_a_create_that_died_before_its_commit_is_swept(tmp_path: Path) -> None:
    """CreateKey records the object as pending before the HSM write: the sweeper knows it
    is this deployment's, although no key row names it."""
    hsm, clock = MemoryHsm(), FakeClock()
    catalog = SqliteCatalog(tmp_path / "c.db")
    store = KeyStore(hsm=hsm, catalog=catalog, clock=clock, doctor_grace_seconds=600)
    before = hsm.list_key_refs()
    faultpoints.arm("create_key.hsm_done", "raise:1")
    try:
        with pytest.raises(faultpoints.FaultPointError):
            store.create_key()
    finally:
        faultpoints.disarm_all()
    (orphan,) = hsm.list_key_refs() - before
    assert catalog.pending_objects().keys() == {orphan.label}
    assert store.create_key().key_metadata.key_id  # a create that commits leaves no pending row
    assert catalog.pending_objects().keys() == {orphan.label}
    swept: tuple[str, ...] = ()
    for _ in range(4):  # start-up, first sighting, then a sighting past the grace period
        swept += store.run_maintenance().swept
        clock.advance(seconds=301)
    assert swept == (orphan.label,)
    assert not hsm.has_key(orphan) and catalog.pending_objects() == {}
    assert store.doctor().consistent
