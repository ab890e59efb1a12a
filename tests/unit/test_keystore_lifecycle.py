"""Rotation (on demand and scheduled), deletion windows, purge, and doctor on the fake clock."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from hsmkeys import ciphertext
from hsmkeys.catalog.base import KeyRecord, VersionRecord
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.clock import FakeClock
from hsmkeys.errors import (
    DisabledException,
    KMSInternalException,
    KMSInvalidStateException,
    LimitExceededException,
    NotFoundException,
    UnsupportedOperationException,
    ValidationException,
)
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.keystore import KeyStore
from hsmkeys.models import (
    KeyMaterialState,
    KeySpec,
    KeyState,
    KeyUsage,
    KeyVersionRef,
    RotationType,
)


def _version_of(blob: bytes) -> int:
    return ciphertext.unpack(blob).version


def test_rotate_three_times_old_ciphertexts_still_decrypt(store: KeyStore, key_id: str) -> None:
    blobs = [store.encrypt(key_id=key_id, plaintext=b"v1").ciphertext_blob]
    for n in range(2, 5):
        store.rotate_key_on_demand(key_id=key_id)
        blob = store.encrypt(key_id=key_id, plaintext=f"v{n}".encode()).ciphertext_blob
        assert _version_of(blob) == n
        blobs.append(blob)
    assert [store.decrypt(ciphertext_blob=b).plaintext for b in blobs] == [b"v1", b"v2", b"v3", b"v4"]
    assert [store.decrypt(ciphertext_blob=b).key_version for b in blobs] == [1, 2, 3, 4]
    assert store.describe_key(key_id=key_id).key_metadata.current_version == 4
    rotations = store.list_key_rotations(key_id=key_id).rotations
    assert [r.rotation_type for r in rotations] == [RotationType.ON_DEMAND] * 3


def test_data_key_from_old_version_decrypts_after_rotation(store: KeyStore, key_id: str) -> None:
    dk = store.generate_data_key(key_id=key_id, key_spec="AES_256")
    store.rotate_key_on_demand(key_id=key_id)
    assert store.decrypt(ciphertext_blob=dk.ciphertext_blob).plaintext == dk.plaintext


def test_automatic_rotation_fires_at_the_period_and_not_before(
    store: KeyStore, key_id: str, clock: FakeClock
) -> None:
    store.enable_key_rotation(key_id=key_id, rotation_period_in_days=90)
    status = store.get_key_rotation_status(key_id=key_id)
    assert status.key_rotation_enabled and status.rotation_period_in_days == 90
    assert status.next_rotation_date == clock.now() + timedelta(days=90)
    clock.advance(days=90, seconds=-1)
    assert store.run_maintenance().rotated == ()
    assert store.describe_key(key_id=key_id).key_metadata.current_version == 1
    clock.advance(seconds=1)
    assert store.run_maintenance().rotated == (key_id,)
    assert store.describe_key(key_id=key_id).key_metadata.current_version == 2
    assert store.run_maintenance().rotated == ()  # idempotent: next one is 90 days out
    clock.advance(days=90)
    store.run_maintenance()
    assert store.describe_key(key_id=key_id).key_metadata.current_version == 3
    types = [r.rotation_type for r in store.list_key_rotations(key_id=key_id).rotations]
    assert types == [RotationType.AUTOMATIC, RotationType.AUTOMATIC]


def test_disabled_key_is_not_rotated_automatically(store: KeyStore, key_id: str, clock: FakeClock) -> None:
    store.enable_key_rotation(key_id=key_id, rotation_period_in_days=90)
    store.disable_key(key_id=key_id)
    clock.advance(days=91)
    assert store.run_maintenance().rotated == ()


def test_default_rotation_period_is_365_days(store: KeyStore, key_id: str) -> None:
    store.enable_key_rotation(key_id=key_id)
    assert store.get_key_rotation_status(key_id=key_id).rotation_period_in_days == 365
    store.disable_key_rotation(key_id=key_id)
    status = store.get_key_rotation_status(key_id=key_id)
    assert not status.key_rotation_enabled and status.next_rotation_date is None


@pytest.mark.parametrize("days", [89, 2561, 0])
def test_rotation_period_outside_90_to_2560_is_validation_error(store: KeyStore, key_id: str, days: int) -> None:
    with pytest.raises(ValidationException):
        store.enable_key_rotation(key_id=key_id, rotation_period_in_days=days)


@pytest.mark.parametrize("days", [90, 2560])
def test_rotation_period_limits_accepted(store: KeyStore, key_id: str, days: int) -> None:
    store.enable_key_rotation(key_id=key_id, rotation_period_in_days=days)


def test_on_demand_rotation_limit_is_25(store: KeyStore, key_id: str) -> None:
    for _ in range(25):
        store.rotate_key_on_demand(key_id=key_id)
    with pytest.raises(LimitExceededException):
        store.rotate_key_on_demand(key_id=key_id)


def test_rotate_disabled_key_is_disabled_exception(store: KeyStore, key_id: str) -> None:
    store.disable_key(key_id=key_id)
    with pytest.raises(DisabledException):
        store.rotate_key_on_demand(key_id=key_id)
    with pytest.raises(DisabledException):
        store.enable_key_rotation(key_id=key_id)


def test_rotation_status_is_false_while_pending_deletion_and_comes_back_on_cancel(
    store: KeyStore, key_id: str, clock: FakeClock
) -> None:
    store.enable_key_rotation(key_id=key_id, rotation_period_in_days=90)
    store.schedule_key_deletion(key_id=key_id, pending_window_in_days=7)
    status = store.get_key_rotation_status(key_id=key_id)
    assert (status.key_rotation_enabled, status.rotation_period_in_days, status.next_rotation_date) == (
        False,
        None,
        None,
    )
    clock.advance(days=91)  # never rotated while pending deletion
    assert store.list_key_rotations(key_id=key_id).rotations == ()
    store.cancel_key_deletion(key_id=key_id)
    status = store.get_key_rotation_status(key_id=key_id)
    assert status.key_rotation_enabled and status.rotation_period_in_days == 90


def test_list_key_rotations_all_key_material_adds_the_first_and_marks_the_current(
    store: KeyStore, key_id: str
) -> None:
    store.rotate_key_on_demand(key_id=key_id)
    store.rotate_key_on_demand(key_id=key_id)
    only = store.list_key_rotations(key_id=key_id).rotations
    assert [(r.rotation_type, r.key_material_state) for r in only] == [
        (RotationType.ON_DEMAND, KeyMaterialState.NON_CURRENT),
        (RotationType.ON_DEMAND, KeyMaterialState.CURRENT),
    ]
    assert store.list_key_rotations(key_id=key_id, include_key_material="ROTATIONS_ONLY").rotations == only
    every = store.list_key_rotations(key_id=key_id, include_key_material="ALL_KEY_MATERIAL").rotations
    first = every[0]
    assert (first.rotation_date, first.rotation_type, first.key_material_state) == (
        None,
        None,
        KeyMaterialState.NON_CURRENT,
    )
    assert every[1:] == only
    ids = [r.key_material_id for r in every]
    assert len(set(ids)) == 3 and all(i is not None and len(i) == 64 for i in ids)
    paged = store.list_key_rotations(key_id=key_id, include_key_material="ALL_KEY_MATERIAL", limit=2)
    assert paged.truncated and paged.rotations == every[:2]
    rest = store.list_key_rotations(key_id=key_id, include_key_material="ALL_KEY_MATERIAL", marker=paged.next_marker)
    assert rest.rotations == every[2:] and not rest.truncated
    with pytest.raises(ValidationException):
        store.list_key_rotations(key_id=key_id, include_key_material="SOME_KEY_MATERIAL")


@pytest.mark.parametrize(
    "spec, usage",
    [("HMAC_256", "GENERATE_VERIFY_MAC"), ("ECC_NIST_P256", "SIGN_VERIFY"), ("RSA_2048", "ENCRYPT_DECRYPT")],
)
def test_rotation_of_asymmetric_and_hmac_keys_is_unsupported(store: KeyStore, spec: str, usage: str) -> None:
    kid = store.create_key(key_spec=spec, key_usage=usage).key_metadata.key_id
    for call in (store.rotate_key_on_demand, store.enable_key_rotation, store.get_key_rotation_status):
        with pytest.raises(UnsupportedOperationException):
            call(key_id=kid)


# ------------------------------------------------------------------ deletion


@pytest.mark.parametrize("days", [6, 31, 0, 365])
def test_deletion_window_outside_7_to_30_is_validation_error(store: KeyStore, key_id: str, days: int) -> None:
    with pytest.raises(ValidationException):
        store.schedule_key_deletion(key_id=key_id, pending_window_in_days=days)


@pytest.mark.parametrize("days", [7, 30])
def test_deletion_window_limits_accepted(store: KeyStore, key_id: str, clock: FakeClock, days: int) -> None:
    res = store.schedule_key_deletion(key_id=key_id, pending_window_in_days=days)
    assert res.pending_window_in_days == days
    assert res.deletion_date == clock.now() + timedelta(days=days)
    assert res.key_state is KeyState.PENDING_DELETION


def test_default_deletion_window_is_30_days(store: KeyStore, key_id: str) -> None:
    assert store.schedule_key_deletion(key_id=key_id).pending_window_in_days == 30


def test_pending_deletion_blocks_every_crypto_call(store: KeyStore, key_id: str) -> None:
    blob = store.encrypt(key_id=key_id, plaintext=b"p").ciphertext_blob
    store.schedule_key_deletion(key_id=key_id, pending_window_in_days=7)
    calls = [
        lambda: store.encrypt(key_id=key_id, plaintext=b"p"),
        lambda: store.decrypt(ciphertext_blob=blob),
        lambda: store.re_encrypt(ciphertext_blob=blob, destination_key_id=key_id),
        lambda: store.generate_data_key(key_id=key_id, key_spec="AES_256"),
        lambda: store.generate_data_key_without_plaintext(key_id=key_id, key_spec="AES_256"),
        lambda: store.rotate_key_on_demand(key_id=key_id),
        lambda: store.enable_key_rotation(key_id=key_id),
        lambda: store.schedule_key_deletion(key_id=key_id),
    ]
    for call in calls:
        with pytest.raises(KMSInvalidStateException):
            call()
    md = store.describe_key(key_id=key_id).key_metadata
    assert md.key_state is KeyState.PENDING_DELETION and md.deletion_date is not None


def test_cancel_deletion_leaves_key_disabled_and_usable_after_enable(store: KeyStore, key_id: str) -> None:
    blob = store.encrypt(key_id=key_id, plaintext=b"keep").ciphertext_blob
    store.schedule_key_deletion(key_id=key_id, pending_window_in_days=7)
    store.cancel_key_deletion(key_id=key_id)
    md = store.describe_key(key_id=key_id).key_metadata
    assert md.key_state is KeyState.DISABLED and md.deletion_date is None
    store.enable_key(key_id=key_id)
    assert store.decrypt(ciphertext_blob=blob).plaintext == b"keep"


def test_cancel_deletion_of_key_not_pending_is_invalid_state(store: KeyStore, key_id: str) -> None:
    with pytest.raises(KMSInvalidStateException):
        store.cancel_key_deletion(key_id=key_id)


def test_maintenance_purges_after_window_and_not_before(
    store: KeyStore, key_id: str, clock: FakeClock, memory_hsm_backend: MemoryHsm
) -> None:
    store.rotate_key_on_demand(key_id=key_id)
    store.create_alias(alias_name="alias/gone", target_key_id=key_id)
    refs = {KeyVersionRef(uuid.UUID(key_id), v) for v in (1, 2)}
    assert refs <= memory_hsm_backend.list_key_refs()
    store.schedule_key_deletion(key_id=key_id, pending_window_in_days=7)
    clock.advance(days=7, seconds=-1)
    assert store.run_maintenance().purged == ()
    clock.advance(seconds=1)
    assert store.run_maintenance().purged == (key_id,)
    assert not refs & memory_hsm_backend.list_key_refs()
    with pytest.raises(NotFoundException):
        store.describe_key(key_id=key_id)
    with pytest.raises(NotFoundException):
        store.describe_key(key_id="alias/gone")
    assert store.run_maintenance().purged == ()


def test_cancelled_deletion_is_not_purged(store: KeyStore, key_id: str, clock: FakeClock) -> None:
    store.schedule_key_deletion(key_id=key_id, pending_window_in_days=7)
    store.cancel_key_deletion(key_id=key_id)
    clock.advance(days=8)
    assert store.run_maintenance().purged == ()
    store.describe_key(key_id=key_id)


# ------------------------------------------------------------------ doctor


class CrashingCatalog(SqliteCatalog):
    """Dies between the HSM object's creation and the catalog commit."""

    def insert_key(self, key: KeyRecord, first_version: VersionRecord) -> None:
        raise KMSInternalException("simulated crash before the catalog commit")


def test_crash_between_hsm_create_and_catalog_commit_is_found_and_fixed_by_doctor(
    tmp_path: Path, clock: FakeClock
) -> None:
    hsm = MemoryHsm()
    crashing = KeyStore(hsm=hsm, catalog=CrashingCatalog(tmp_path / "c.db"), clock=clock)
    with pytest.raises(KMSInternalException):
        crashing.create_key()
    (orphan,) = hsm.list_key_refs()
    store = KeyStore(hsm=hsm, catalog=SqliteCatalog(tmp_path / "c.db"), clock=clock)
    report = store.doctor()
    assert report.orphan_objects == (orphan,) and not report.consistent
    assert store.doctor(fix=True).destroyed == ()  # seen once: maybe a create in flight
    clock.advance(timedelta(seconds=601))  # past doctor_grace_seconds
    fixed = store.doctor(fix=True)
    assert fixed.fixed and hsm.list_key_refs() == set()
    assert store.doctor().consistent


def test_doctor_finishes_a_half_done_purge(
    store: KeyStore, key_id: str, catalog: SqliteCatalog, memory_hsm_backend: MemoryHsm
) -> None:
    store.rotate_key_on_demand(key_id=key_id)
    key = catalog.get_key(uuid.UUID(key_id))
    assert key is not None
    from dataclasses import replace

    catalog.update_key(replace(key, state=KeyState.PURGING))
    memory_hsm_backend.destroy_key(KeyVersionRef(key.key_uuid, 1))  # crash after destroying one object
    report = store.doctor()
    assert report.unfinished_purges == (key_id,) and not report.consistent
    store.doctor(fix=True)
    assert catalog.get_key(key.key_uuid) is None
    assert memory_hsm_backend.list_key_refs() == set()
    assert store.doctor().consistent


def test_doctor_reports_catalog_rows_whose_objects_are_missing(
    store: KeyStore, key_id: str, memory_hsm_backend: MemoryHsm
) -> None:
    ref = KeyVersionRef(uuid.UUID(key_id), 1)
    memory_hsm_backend.destroy_key(ref)
    assert store.doctor().missing_objects == (ref,)


def test_doctor_ignores_the_reserved_audit_key(store: KeyStore, key_id: str) -> None:
    store.audit_mac(b"x")
    assert store.doctor().consistent


def test_crypto_after_missing_hsm_object_is_internal_error(
    store: KeyStore, key_id: str, memory_hsm_backend: MemoryHsm
) -> None:
    blob = store.encrypt(key_id=key_id, plaintext=b"p").ciphertext_blob
    memory_hsm_backend.destroy_key(KeyVersionRef(uuid.UUID(key_id), 1))
    with pytest.raises(KMSInternalException):
        store.decrypt(ciphertext_blob=blob)


def test_create_key_specs_make_hsm_objects(store: KeyStore, memory_hsm_backend: MemoryHsm) -> None:
    for spec, usage in [(KeySpec.HMAC_512, KeyUsage.GENERATE_VERIFY_MAC), (KeySpec.ECC_SECG_P256K1, KeyUsage.SIGN_VERIFY)]:
        kid = store.create_key(key_spec=spec, key_usage=usage).key_metadata.key_id
        assert memory_hsm_backend.has_key(KeyVersionRef(uuid.UUID(kid), 1))


def test_two_maintainers_racing_rotate_a_due_key_once(
    store: KeyStore,
    key_id: str,
    clock: FakeClock,
    memory_hsm_backend: MemoryHsm,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store.enable_key_rotation(key_id=key_id, rotation_period_in_days=90)
    clock.advance(days=90)
    other_catalog = SqliteCatalog(tmp_path / "catalog.db")  # the same file, as a second process has
    other = KeyStore(hsm=memory_hsm_backend, catalog=other_catalog, clock=clock)
    listed_before = other_catalog.keys_due_rotation(clock.now())  # "other" saw the key due...
    assert store.run_maintenance().rotated == (key_id,)  # ...then this maintainer rotated it
    monkeypatch.setattr(other_catalog, "keys_due_rotation", lambda now: listed_before)
    assert other.run_maintenance().rotated == ()
    assert store.describe_key(key_id=key_id).key_metadata.current_version == 2
    other_catalog.close()
