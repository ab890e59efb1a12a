"""The crash harness's victim: KMS work on a shared SoftHSM2 token and catalog until it
is killed (by a fault point armed through HSMKEYS_FAULT_POINTS, or by the parent).

Every ciphertext is written (fsync'd) to the journal before the next step, as a client
that got an answer would keep it; a key is noted as doomed before its deletion is
scheduled. Usage: python crash_child.py WORKDIR SEED (PIN in $CRASH_HSM_PIN, token
label in $CRASH_HSM_LABEL)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import sys
from datetime import timedelta
from pathlib import Path

from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.clock import FakeClock
from hsmkeys.errors import LimitExceededException
from hsmkeys.hsm.pkcs11 import Pkcs11Hsm
from hsmkeys.hsm.softhsm import find_module
from hsmkeys.keystore import KeyStore
from hsmkeys.models import KeyState

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.reliability.byok import import_symmetric


def main() -> None:
    workdir, seed = Path(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)
    hsm = Pkcs11Hsm.open(
        module=str(find_module()), token_label=os.environ["CRASH_HSM_LABEL"], pin=os.environ["CRASH_HSM_PIN"]
    )
    clock = FakeClock()
    store = KeyStore(hsm=hsm, catalog=SqliteCatalog(workdir / "catalog.db"), clock=clock)
    journal = open(workdir / "journal.jsonl", "a")  # noqa: SIM115 - lives until the kill

    def note(record: dict[str, str]) -> None:
        journal.write(json.dumps(record) + "\n")
        journal.flush()
        os.fsync(journal.fileno())

    def encrypt(key_id: str) -> None:
        plaintext = rng.randbytes(rng.randint(1, 64))
        blob = store.encrypt(key_id=key_id, plaintext=plaintext).ciphertext_blob
        note({"key": key_id, "ct": base64.b64encode(blob).decode(), "pt": plaintext.hex()})

    def live_keys() -> list[str]:
        return [
            str(k.key_uuid)
            for k in store._catalog.list_keys(limit=1000)
            if k.state is KeyState.ENABLED and k.origin.value == "AWS_KMS"
        ]

    print("ready", flush=True)
    while True:
        step = rng.choice(("create", "rotate", "import", "delete", "encrypt"))
        if step == "create":
            encrypt(store.create_key().key_metadata.key_id)
        elif step == "rotate" and (keys := live_keys()):
            key_id = rng.choice(keys)
            with contextlib.suppress(LimitExceededException):  # 25 on-demand rotations per key
                store.rotate_key_on_demand(key_id=key_id)
            encrypt(key_id)
        elif step == "import":
            encrypt(import_symmetric(store))
        elif step == "delete" and (keys := live_keys()):
            key_id = rng.choice(keys)
            note({"doomed": key_id})
            store.schedule_key_deletion(key_id=key_id, pending_window_in_days=7)
            clock.advance(timedelta(days=8))
            store.run_maintenance()
        elif step == "encrypt" and (keys := live_keys()):
            encrypt(rng.choice(keys))


if __name__ == "__main__":
    main()
