"""The crash harness's victim: KMS work on a shared SoftHSM2 token and catalog until it
is killed (by a fault point armed through HSMKEYS_FAULT_POINTS, or by the parent).

Keys of four kinds are made (AES-256, RSA-2048 and P-256 signing, HMAC-256). Every
ciphertext, signature and MAC is written (fsync'd) to the journal before the next step,
as a client that got an answer would keep it; a key is noted as doomed before its
deletion is scheduled. Usage: python crash_child.py WORKDIR SEED (PIN in $CRASH_HSM_PIN, token
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
from hsmkeys.models import KeySpec, KeyState

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.reliability.byok import import_symmetric

# key spec -> (key usage, the algorithm its signatures or MACs are made with)
AUTHENTICATORS = {
    "RSA_2048": ("SIGN_VERIFY", "RSASSA_PSS_SHA_256"),
    "ECC_NIST_P256": ("SIGN_VERIFY", "ECDSA_SHA_256"),
    "HMAC_256": ("GENERATE_VERIFY_MAC", "HMAC_SHA_256"),
}


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

    def authenticate(key_id: str, spec: str) -> None:
        """A signature or MAC over a random message, journaled for the parent to verify."""
        message = rng.randbytes(rng.randint(1, 64))
        usage, algorithm = AUTHENTICATORS[spec]
        if usage == "GENERATE_VERIFY_MAC":
            tag = store.generate_mac(key_id=key_id, message=message, mac_algorithm=algorithm).mac
        else:
            tag = store.sign(key_id=key_id, message=message, signing_algorithm=algorithm).signature
        note({"key": key_id, "spec": spec, "alg": algorithm, "msg": message.hex(), "tag": tag.hex()})

    def live_keys(spec: KeySpec = KeySpec.SYMMETRIC_DEFAULT) -> list[str]:
        return [
            str(k.key_uuid)
            for k in store._catalog.list_keys(limit=1000)
            if k.state is KeyState.ENABLED and k.origin.value == "AWS_KMS" and k.spec is spec
        ]

    print("ready", flush=True)
    while True:
        step = rng.choice(("create", "create_other", "rotate", "import", "delete", "encrypt"))
        if step == "create":
            encrypt(store.create_key().key_metadata.key_id)
        elif step == "create_other":
            spec = rng.choice(tuple(AUTHENTICATORS))
            usage = AUTHENTICATORS[spec][0]
            authenticate(store.create_key(key_spec=spec, key_usage=usage).key_metadata.key_id, spec)
        elif step == "rotate" and (keys := live_keys()):
            key_id = rng.choice(keys)
            with contextlib.suppress(LimitExceededException):  # 25 on-demand rotations per key
                store.rotate_key_on_demand(key_id=key_id)
            encrypt(key_id)
        elif step == "import":
            encrypt(import_symmetric(store))
        elif step == "delete" and (keys := live_keys() + live_keys(KeySpec(rng.choice(tuple(AUTHENTICATORS))))):
            key_id = rng.choice(keys)
            note({"doomed": key_id})
            store.schedule_key_deletion(key_id=key_id, pending_window_in_days=7)
            clock.advance(timedelta(days=8))
            store.run_maintenance()
        elif step == "encrypt" and (keys := live_keys()):
            encrypt(rng.choice(keys))


if __name__ == "__main__":
    main()
