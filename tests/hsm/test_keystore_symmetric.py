"""KeyStore over SoftHSM2: symmetric encryption, data keys, rotation, deletion, doctor."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from hsmkeys.clock import FakeClock
from hsmkeys.errors import InvalidCiphertextException, NotFoundException
from hsmkeys.hsm.pkcs11 import Pkcs11Hsm
from hsmkeys.keystore import KeyStore
from hsmkeys.models import KeySpec, KeyUsage, KeyVersionRef

pytestmark = pytest.mark.hsm


def test_encrypt_decrypt_round_trip_with_context(hsm_keystore: KeyStore) -> None:
    key_id = hsm_keystore.create_key(description="hsm").key_metadata.key_id
    blob = hsm_keystore.encrypt(
        key_id=key_id, plaintext=b"secret", encryption_context={"purpose": "test"}
    ).ciphertext_blob
    opened = hsm_keystore.decrypt(ciphertext_blob=blob, encryption_context={"purpose": "test"})
    assert opened.plaintext == b"secret" and opened.key_id.endswith(key_id)
    with pytest.raises(InvalidCiphertextException):
        hsm_keystore.decrypt(ciphertext_blob=blob, encryption_context={"purpose": "other"})


def test_generate_data_key_decrypts_to_the_same_key(hsm_keystore: KeyStore) -> None:
    key_id = hsm_keystore.create_key().key_metadata.key_id
    data_key = hsm_keystore.generate_data_key(key_id=key_id, key_spec="AES_256")
    assert len(data_key.plaintext) == 32
    assert hsm_keystore.decrypt(ciphertext_blob=data_key.ciphertext_blob).plaintext == data_key.plaintext


def test_rotated_three_times_old_ciphertexts_still_decrypt(hsm_keystore: KeyStore, hsm: Pkcs11Hsm) -> None:
    key_id = hsm_keystore.create_key().key_metadata.key_id
    blobs = [hsm_keystore.encrypt(key_id=key_id, plaintext=b"v1").ciphertext_blob]
    for n in (2, 3, 4):
        hsm_keystore.rotate_key_on_demand(key_id=key_id)
        blobs.append(hsm_keystore.encrypt(key_id=key_id, plaintext=f"v{n}".encode()).ciphertext_blob)
    assert hsm_keystore.describe_key(key_id=key_id).key_metadata.current_version == 4
    for n, blob in enumerate(blobs, start=1):
        opened = hsm_keystore.decrypt(ciphertext_blob=blob)
        assert (opened.plaintext, opened.key_version) == (f"v{n}".encode(), n)
    assert all(hsm.has_key(KeyVersionRef(uuid.UUID(key_id), v)) for v in (1, 2, 3, 4))


def test_scheduled_deletion_purges_every_hsm_object(
    hsm_keystore: KeyStore, hsm_keystore_clock: FakeClock, hsm: Pkcs11Hsm
) -> None:
    key_id = hsm_keystore.create_key().key_metadata.key_id
    hsm_keystore.rotate_key_on_demand(key_id=key_id)
    refs = {KeyVersionRef(uuid.UUID(key_id), v) for v in (1, 2)}
    hsm_keystore.schedule_key_deletion(key_id=key_id, pending_window_in_days=7)
    assert hsm_keystore.run_maintenance().purged == ()
    assert refs <= hsm.list_key_refs()

    hsm_keystore_clock.advance(days=7, seconds=1)
    assert hsm_keystore.run_maintenance().purged == (key_id,)
    assert not refs & hsm.list_key_refs()
    assert not any(hsm.has_key(r) for r in refs)
    with pytest.raises(NotFoundException):
        hsm_keystore.describe_key(key_id=key_id)


def test_doctor_reports_an_hsm_object_without_catalog_row(hsm_keystore: KeyStore, hsm: Pkcs11Hsm) -> None:
    # A crash between the HSM create and the catalog commit leaves exactly this.
    orphan = KeyVersionRef(uuid.uuid4(), 1)
    hsm.create_key(orphan, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
    try:
        key_id = hsm_keystore.create_key().key_metadata.key_id
        report = hsm_keystore.doctor()
        # The token is shared with other tests: check only this test's refs.
        assert orphan in report.orphan_objects
        assert KeyVersionRef(uuid.UUID(key_id), 1) not in report.orphan_objects
        assert report.missing_objects == ()
    finally:
        hsm.destroy_key(orphan)


USER_TEST = '''
import datetime
import uuid

import pytest

from hsmkeys.models import KeySpec, KeyUsage, KeyVersionRef


@pytest.mark.hsm
def test_doctor_fix_destroys_the_orphan(hsm_keystore, hsm, hsm_keystore_clock):
    key_id = hsm_keystore.create_key().key_metadata.key_id
    orphan = KeyVersionRef(uuid.uuid4(), 1)
    hsm.create_key(orphan, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
    assert hsm_keystore.doctor().orphan_objects == (orphan,)
    hsm_keystore_clock.advance(datetime.timedelta(seconds=601))  # past the doctor's grace period
    fixed = hsm_keystore.doctor(fix=True)
    assert fixed.fixed and fixed.orphan_objects == (orphan,)
    assert not hsm.has_key(orphan)
    assert hsm_keystore.doctor().consistent
    blob = hsm_keystore.encrypt(key_id=key_id, plaintext=b"still here").ciphertext_blob
    assert hsm_keystore.decrypt(ciphertext_blob=blob).plaintext == b"still here"
'''


def test_doctor_fix_in_a_fresh_process_through_the_plugin(tmp_path: Path) -> None:
    """Runs a user's test file with the installed plugin: its own token, so fix=True is safe."""
    test_file = tmp_path / "test_user_doctor.py"
    test_file.write_text(textwrap.dedent(USER_TEST), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(test_file)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
