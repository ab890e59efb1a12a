"""AES-GCM invocation limit (SP 800-38D §8.3): versions retire before the bound."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from hsmkeys.audit import AuditLog
from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.ciphertext import unpack
from hsmkeys.clock import FakeClock
from hsmkeys.errors import KMSInvalidStateException
from hsmkeys.hsm.memory import MemoryHsm
from hsmkeys.keystore import KeyStore
from hsmkeys.models import KeyVersionRef


def _store(path: Path, catalog: SqliteCatalog, hsm: MemoryHsm, *, limit: int, block: int) -> KeyStore:
    return KeyStore(hsm=hsm, catalog=catalog, clock=FakeClock(), gcm_encryption_limit=limit, gcm_reservation_block=block)


def test_spent_version_is_retired_and_key_rotated(tmp_path: Path) -> None:
    catalog = SqliteCatalog(tmp_path / "c.db")
    hsm = MemoryHsm()
    store = _store(tmp_path, catalog, hsm, limit=10, block=4)
    store._audit = AuditLog(tmp_path / "audit.log", mac=store.audit_mac, checkpoints=catalog)
    key_id = store.create_key().key_metadata.key_id
    blobs = [store.encrypt(key_id=key_id, plaintext=b"%d" % i).ciphertext_blob for i in range(25)]
    versions = [unpack(b).version for b in blobs]
    assert versions == [1] * 10 + [2] * 10 + [3] * 5
    for i, blob in enumerate(blobs):
        assert store.decrypt(ciphertext_blob=blob).plaintext == b"%d" % i
    for v in (1, 2):
        assert catalog.encryptions_reserved(KeyVersionRef(uuid.UUID(key_id), v)) == 10
    store._audit.close()
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    rotations = [x for x in lines if x.get("operation") == "AutomaticRotation"]
    assert [(x["phase"], x["outcome"]) for x in rotations] == [("intent", "Pending"), ("done", "Success")] * 2


def test_two_processes_share_the_limit(tmp_path: Path) -> None:
    """Reservations are in the catalog: two stores never exceed the limit together."""
    hsm = MemoryHsm()
    a = _store(tmp_path, SqliteCatalog(tmp_path / "c.db"), hsm, limit=8, block=3)
    b = _store(tmp_path, SqliteCatalog(tmp_path / "c.db"), hsm, limit=8, block=3)
    key_id = a.create_key().key_metadata.key_id
    blobs = [s.encrypt(key_id=key_id, plaintext=b"x").ciphertext_blob for _ in range(6) for s in (a, b)]
    per_version: dict[int, int] = {}
    for blob in blobs:
        per_version[unpack(blob).version] = per_version.get(unpack(blob).version, 0) + 1
    assert all(n <= 8 for n in per_version.values()) and len(per_version) >= 2
    assert all(a.decrypt(ciphertext_blob=blob).plaintext == b"x" for blob in blobs)


def test_imported_key_is_refused_when_spent(tmp_path: Path) -> None:
    from tests.reliability.byok import import_symmetric

    catalog = SqliteCatalog(tmp_path / "c.db")
    store = _store(tmp_path, catalog, MemoryHsm(), limit=3, block=2)
    key_id = import_symmetric(store)
    blobs = [store.encrypt(key_id=key_id, plaintext=b"x").ciphertext_blob for _ in range(3)]
    with pytest.raises(KMSInvalidStateException, match="cannot be rotated"):
        store.encrypt(key_id=key_id, plaintext=b"x")
    assert all(store.decrypt(ciphertext_blob=blob).plaintext == b"x" for blob in blobs)
