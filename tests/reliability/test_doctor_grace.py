"""doctor --fix may destroy an HSM object only after two sightings a grace period
apart, and never one whose row committed meanwhile; stale BYOK wrapping pairs go."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from pathlib import Path

from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.clock import FakeClock
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.keystore import KeyStore
from hsmkeys.models import KeySpec, KeyUsage, KeyVersionRef


def _store(tmp_path: Path, clock: FakeClock, grace: float = 600) -> tuple[KeyStore, MemoryHsm]:
    hsm = MemoryHsm()
    return KeyStore(hsm=hsm, catalog=SqliteCatalog(tmp_path / "c.db"), clock=clock, doctor_grace_seconds=grace), hsm


def test_fix_spares_a_create_in_flight(tmp_path: Path) -> None:
    """The create's HSM object exists, its row commits while doctor runs: it survives."""
    clock = FakeClock()
    store, hsm = _store(tmp_path, clock)
    created = threading.Event()
    resume = threading.Event()
    real_create = hsm.create_key

    def slow_create(ref: KeyVersionRef, spec: KeySpec, usage: KeyUsage) -> None:
        real_create(ref, spec, usage)
        created.set()
        resume.wait(10)  # doctor scans while the row is not committed yet

    hsm.create_key = slow_create  # type: ignore[method-assign]
    result: dict[str, str] = {}
    worker = threading.Thread(target=lambda: result.update(k=store.create_key().key_metadata.key_id))
    worker.start()
    assert created.wait(10)
    report = store.doctor(fix=True)
    assert len(report.orphan_objects) == 1 and report.destroyed == ()
    resume.set()
    worker.join()
    assert store.encrypt(key_id=result["k"], plaintext=b"x").ciphertext_blob
    clock.advance(timedelta(seconds=601))
    assert store.doctor(fix=True).consistent


def test_orphan_destroyed_only_after_two_sightings_a_grace_apart(tmp_path: Path) -> None:
    clock = FakeClock()
    store, hsm = _store(tmp_path, clock)
    orphan = KeyVersionRef(uuid.uuid4(), 1)
    hsm.create_key(orphan, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
    first = store.doctor(fix=True)
    assert first.young_orphans == (orphan,) and first.destroyed == () and hsm.has_key(orphan)
    clock.advance(timedelta(seconds=599))
    assert store.doctor(fix=True).destroyed == () and hsm.has_key(orphan)
    clock.advance(timedelta(seconds=2))
    assert store.doctor(fix=True).destroyed == (orphan,)
    assert not hsm.has_key(orphan)
    assert store.doctor().consistent


def test_an_orphan_that_got_its_row_is_forgotten(tmp_path: Path) -> None:
    """A sighting is dropped when the object stops being an orphan: a later orphan with
    the same label starts a new grace period."""
    clock = FakeClock()
    store, hsm = _store(tmp_path, clock)
    key_id = store.create_key().key_metadata.key_id
    ref = KeyVersionRef(uuid.UUID(key_id), 2)
    hsm.create_key(ref, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
    assert store.doctor().orphan_objects == (ref,)
    clock.advance(timedelta(seconds=300))
    store.rotate_key_on_demand(key_id=key_id)  # replaces the leftover and commits v2
    assert store.doctor().consistent
    clock.advance(timedelta(seconds=400))
    assert store.doctor(fix=True).destroyed == ()
    assert store.encrypt(key_id=key_id, plaintext=b"x").ciphertext_blob


def test_stale_wrapping_pairs_are_removed_after_the_token_lifetime(tmp_path: Path) -> None:
    clock = FakeClock()
    store, hsm = _store(tmp_path, clock)
    wrapping = KeyVersionRef(uuid.uuid4(), 1)
    hsm.create_wrapping_key(wrapping, "RSA_2048")
    assert store.doctor(fix=True).stale_wrapping_keys == ()
    clock.advance(timedelta(hours=23))
    assert store.doctor(fix=True).stale_wrapping_keys == ()
    assert hsm.list_wrapping_refs() == {wrapping}
    clock.advance(timedelta(hours=1, seconds=1))
    assert store.doctor(fix=True).stale_wrapping_keys == (wrapping,)
    assert hsm.list_wrapping_refs() == set()
