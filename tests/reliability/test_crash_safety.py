"""Crash safety: a KMS process SIGKILLed between the HSM write and the catalog commit
(named fault points) or at a random moment leaves nothing doctor cannot repair, and
every ciphertext it returned still decrypts.

After each kill: ``doctor`` reports, ``doctor --fix`` (grace period advanced on a fake
clock) repairs, and then no row lacks its object, no object lacks its row, no purge is
half done, and every journaled ciphertext, signature and MAC (of keys not scheduled for
deletion) decrypts or verifies.
20 runs in ``make test``; ``make soak`` runs 200 (HSMKEYS_CRASH_RUNS)."""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.clock import FakeClock
from hsmkeys.faultpoints import ENV_VAR
from hsmkeys.hsm.pkcs11 import Pkcs11Hsm
from hsmkeys.keystore import KeyStore
from hsmkeys.testing.plugin import SoftHsmToken

from .harness import soak_number

CHILD = Path(__file__).with_name("crash_child.py")
POINTS = (
    "create_key.hsm_done",
    "create_key.committed",
    "rotate.hsm_done",
    "rotate.committed",
    "schedule_key_deletion.committed",
    "purge.marked",
    "purge.objects_destroyed",
    "import.hsm_done",
    "import.committed",
)
FIGURES: dict[str, int] = {}


def _run_child(token: SoftHsmToken, workdir: Path, seed: int, point: str | None, rng: random.Random) -> str:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HSMKEYS_")},
        "CRASH_HSM_LABEL": token.label,
        "CRASH_HSM_PIN": token.pin,
        "SOFTHSM2_CONF": str(token.conf),
    }
    if point is not None:
        env[ENV_VAR] = f"{point}=kill"
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(workdir), str(seed)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        child.kill()
        raise AssertionError(f"child did not start: {child.communicate()[1]}")
    try:
        child.wait(timeout=rng.uniform(0.05, 0.6) if point is None else 20)
    except subprocess.TimeoutExpired:
        child.kill()
    child.wait()
    _, stderr = child.communicate()
    assert child.returncode == -9, f"child ended with {child.returncode}, not SIGKILL: {stderr[-2000:]}"
    return "killed"


def _check(store: KeyStore, clock: FakeClock, journal: Path) -> tuple[int, int, int, int]:
    """(ciphertexts decrypted, signatures and MACs verified, drift found, drift fixed)."""
    first = store.doctor()  # reports (and records its sightings)
    found = len(first.orphan_objects) + len(first.missing_objects) + len(first.unfinished_purges)
    clock.advance(timedelta(seconds=601))
    fixed = store.doctor(fix=True)
    after = store.doctor()
    assert not after.orphan_objects, f"objects without rows after fix: {after.orphan_objects} (before: {first})"
    assert not after.missing_objects, f"rows without objects: {after.missing_objects}"
    assert not after.unfinished_purges, f"half-done purges: {after.unfinished_purges}"
    lines = [json.loads(line) for line in journal.read_text().splitlines() if line.endswith("}")]
    doomed = {x["doomed"] for x in lines if "doomed" in x}
    decrypted = verified = 0
    for line in lines:
        if line.get("key") in doomed:
            continue
        if "ct" in line:
            plain = store.decrypt(ciphertext_blob=base64.b64decode(line["ct"])).plaintext
            assert plain.hex() == line["pt"]
            decrypted += 1
        elif line.get("spec") == "HMAC_256":
            assert store.verify_mac(
                key_id=line["key"], message=bytes.fromhex(line["msg"]), mac=bytes.fromhex(line["tag"]),
                mac_algorithm=line["alg"],
            ).mac_valid  # fmt: skip
            verified += 1
        elif "tag" in line:
            assert store.verify(
                key_id=line["key"], message=bytes.fromhex(line["msg"]), signature=bytes.fromhex(line["tag"]),
                signing_algorithm=line["alg"],
            ).signature_valid  # fmt: skip
            verified += 1
    repaired = len(fixed.destroyed) + len(first.unfinished_purges)  # none is left (asserted above)
    return decrypted, verified, found, repaired


def _crash_runs(softhsm_token: SoftHsmToken, hsm: Pkcs11Hsm, tmp_path: Path, runs: int) -> None:
    rng = random.Random(int(os.environ.get("HSMKEYS_CRASH_SEED", "0")) or None)
    clock = FakeClock()
    catalog = SqliteCatalog(tmp_path / "catalog.db")  # migrates before any child opens it
    store = KeyStore(hsm=hsm, catalog=catalog, clock=clock)
    survived = decrypted = verified = found = repaired = 0
    started = time.monotonic()
    for run in range(runs):
        point = POINTS[run // 2 % len(POINTS)] if run % 2 == 0 else None
        _run_child(softhsm_token, tmp_path, rng.randrange(1 << 30), point, rng)
        decrypted, verified, run_found, run_repaired = _check(store, clock, tmp_path / "journal.jsonl")
        found, repaired = found + run_found, repaired + run_repaired
        survived += 1
    catalog.close()
    # Kills at hsm_done and purge points always leave drift; none means no point fired.
    assert found > 0 and repaired == found, f"drift found {found}, fixed {repaired}"
    FIGURES.update(runs=runs, survived=survived, ciphertexts=decrypted, authenticators=verified)
    print(f"\ncrash harness: {survived}/{runs} runs repaired, {decrypted} ciphertexts decrypt, "
          f"{verified} signatures/MACs verify, drift found {found} (orphans, missing objects, "
          f"unfinished purges), fixed {repaired}, {time.monotonic() - started:.1f}s")


@pytest.mark.hsm
def test_kill_at_fault_points_and_random_times(softhsm_token: SoftHsmToken, hsm: Pkcs11Hsm, tmp_path: Path) -> None:
    _crash_runs(softhsm_token, hsm, tmp_path, 20)


@pytest.mark.soak
@pytest.mark.hsm
def test_kill_soak(softhsm_token: SoftHsmToken, hsm: Pkcs11Hsm, tmp_path: Path) -> None:
    _crash_runs(softhsm_token, hsm, tmp_path, int(soak_number("CRASH_RUNS", 200, 200)))
