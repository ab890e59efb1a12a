"""Child process for test_concurrent_lanes: each scenario needs a process whose PKCS#11
module was first loaded by Pkcs11Hsm.open (so initialised with CKF_OS_LOCKING_OK).

Usage: python lanes_child.py SCENARIO MODULE LABEL WORKDIR (the PIN on stdin).
Prints one JSON object; exits non-zero on any failure (a crash is a failure too).
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.errors import NotFoundException
from hsmkeys.hsm.pkcs11 import Pkcs11Hsm
from hsmkeys.keystore import KeyStore
from hsmkeys.models import KeySpec, KeyUsage, KeyVersionRef, SigningAlgorithm

IV = b"\x07" * 12


def new_ref() -> KeyVersionRef:
    return KeyVersionRef(uuid.uuid4(), 1)


def keygen(hsm: Pkcs11Hsm) -> dict[str, Any]:
    """Encrypts on the shared lane complete while another lane generates an RSA-4096 pair."""
    aes = new_ref()
    hsm.create_key(aes, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
    rsa = new_ref()
    started, done = threading.Event(), threading.Event()
    own: list[bool] = []

    def generate() -> None:
        own.append(hsm.use_own_session())
        started.set()
        try:
            hsm.create_key(rsa, KeySpec.RSA_4096, KeyUsage.SIGN_VERIFY)
        finally:
            done.set()

    thread = threading.Thread(target=generate)
    thread.start()
    started.wait()
    during = 0
    while not done.is_set():
        hsm.encrypt_aes_gcm(aes, IV, b"", b"x" * 32)
        if not done.is_set():
            during += 1
    thread.join()
    # Made on the other lane: found here by one search, then used.
    signature = hsm.sign_digest(rsa, SigningAlgorithm.RSASSA_PSS_SHA_256, b"\x01" * 32)
    # Destroyed on another lane: gone here too.
    destroyer = threading.Thread(target=lambda: (hsm.use_own_session(), hsm.destroy_key(rsa)))
    destroyer.start()
    destroyer.join()
    try:
        hsm.sign_digest(rsa, SigningAlgorithm.RSASSA_PSS_SHA_256, b"\x01" * 32)
        gone = False
    except NotFoundException:
        gone = True
    return {"own_session": own, "encrypts_during_keygen": during, "signature_len": len(signature), "gone": gone}


def stress(hsm: Pkcs11Hsm) -> dict[str, Any]:
    """Four lanes and the shared one at once: encrypt/decrypt, sign, create/destroy."""
    aes = new_ref()
    hsm.create_key(aes, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
    ec = new_ref()
    hsm.create_key(ec, KeySpec.ECC_NIST_P256, KeyUsage.SIGN_VERIFY)
    errors: list[str] = []
    counts: dict[str, int] = {}

    def work(name: str, own: bool) -> None:
        try:
            if own and not hsm.use_own_session():
                raise AssertionError("no own session")
            n = 0
            for i in range(150):
                message = f"{name}-{i}".encode()
                blob = hsm.encrypt_aes_gcm(aes, IV, name.encode(), message)
                if hsm.decrypt_aes_gcm(aes, IV, name.encode(), blob) != message:
                    raise AssertionError("round trip changed the plaintext")
                hsm.sign_digest(ec, SigningAlgorithm.ECDSA_SHA_256, bytes(32))
                if i % 25 == 0:
                    mine = new_ref()
                    hsm.create_key(mine, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
                    hsm.encrypt_aes_gcm(mine, IV, b"", message)
                    hsm.destroy_key(mine)
                n += 1
            counts[name] = n
        except Exception as exc:  # reported to the parent
            errors.append(f"{name}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(f"lane{i}", True)) for i in range(4)]
    threads.append(threading.Thread(target=work, args=("shared", False)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"errors": errors, "counts": counts}


class _BlockedScan:
    """A session wrapper whose full scans (get_objects without a template) wait for ``release``."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.scans = 0
        self.searches = 0

    def __call__(self, session: Any) -> Any:
        outer = self

        class Blocking:
            def __getattr__(self, name: str) -> Any:
                return getattr(session, name)

            def get_objects(self, attrs: Any = None) -> Any:
                if attrs is None:
                    outer.scans += 1
                    outer.release.wait()
                else:
                    outer.searches += 1
                return session.get_objects(attrs) if attrs is not None else session.get_objects()

        return Blocking()


def lazy(module: str, label: str, pin: str, workdir: Path) -> dict[str, Any]:
    """A fresh instance answers before its background index is done; ListKeys stays full."""
    catalog_path = workdir / "catalog.sqlite3"
    first = Pkcs11Hsm.open(module=module, token_label=label, pin=pin)
    maker = KeyStore(hsm=first, catalog=SqliteCatalog(catalog_path))
    key_ids = [maker.create_key().key_metadata.key_id for _ in range(150)]
    maker.close()

    blocker = _BlockedScan()
    hsm = Pkcs11Hsm.open(module=module, token_label=label, pin=pin, session_wrapper=blocker)
    store = KeyStore(hsm=hsm, catalog=SqliteCatalog(catalog_path))
    started = store.start_indexing()
    blob = store.encrypt(key_id=key_ids[100], plaintext=b"first request").ciphertext_blob
    plain = store.decrypt(ciphertext_blob=blob).plaintext
    index_done_at_first_request = hsm.indexing_done(0)
    pages: list[int] = []
    listed: list[str] = []
    marker: str | None = None
    while True:
        page = store.list_keys(limit=40, marker=marker)
        pages.append(len(page.keys))
        listed += [k.key_id for k in page.keys]
        if not page.truncated:
            break
        marker = page.next_marker
    searches_before = blocker.searches
    blocker.release.set()
    finished = hsm.indexing_done(30)
    store.encrypt(key_id=key_ids[7], plaintext=b"after the index")
    result = {
        "started": started,
        "plaintext_ok": plain == b"first request",
        "index_done_at_first_request": index_done_at_first_request,
        "scans": blocker.scans,
        "pages": pages,
        "listed_all": sorted(listed) == sorted(key_ids),
        "finished": finished,
        "searches_after_index": blocker.searches - searches_before,
    }
    store.close()
    return result


def main() -> None:
    scenario, module, label, workdir = sys.argv[1:5]
    pin = sys.stdin.readline().strip()
    if scenario == "lazy":
        print(json.dumps(lazy(module, label, pin, Path(workdir))))
        return
    runs: dict[str, Callable[[Pkcs11Hsm], dict[str, Any]]] = {"keygen": keygen, "stress": stress}
    hsm = Pkcs11Hsm.open(module=module, token_label=label, pin=pin)
    try:
        print(json.dumps(runs[scenario](hsm)))
    finally:
        hsm.close()


if __name__ == "__main__":
    main()
