"""Pkcs11Hsm recovers a lost session or device without a restart (faults from hsmkeys.hsm.faults)."""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pkcs11.exceptions as ckr
import pytest
from pkcs11 import Attribute

from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.clock import FakeClock
from hsmkeys.errors import DependencyTimeoutException, KMSInternalException
from hsmkeys.hsm import softhsm
from hsmkeys.hsm.faults import FaultPlan
from hsmkeys.hsm.pkcs11 import Pkcs11Hsm
from hsmkeys.keystore import KeyStore
from hsmkeys.models import KeySpec, KeyUsage, KeyVersionRef
from hsmkeys.testing.plugin import SoftHsmToken

pytestmark = pytest.mark.hsm

LOST = [
    ckr.SessionHandleInvalid,
    ckr.SessionClosed,
    ckr.UserNotLoggedIn,
    ckr.DeviceError,
    ckr.DeviceRemoved,
    ckr.TokenNotPresent,
]


def open_faulty(token: SoftHsmToken, plan: FaultPlan, **kwargs: float) -> Pkcs11Hsm:
    return Pkcs11Hsm.open(module=token.module, token_label=token.label, pin=token.pin, session_wrapper=plan, **kwargs)


@pytest.fixture
def aes_ref(hsm: Pkcs11Hsm) -> KeyVersionRef:
    ref = KeyVersionRef(uuid.uuid4(), 1)
    hsm.create_key(ref, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
    return ref


@pytest.mark.parametrize("error", LOST, ids=lambda e: e.__name__)
def test_idempotent_call_is_retried_once_on_a_new_session(
    error: type[ckr.PKCS11Error], hsm: Pkcs11Hsm, softhsm_token: SoftHsmToken, aes_ref: KeyVersionRef,
    tmp_path: Path,
) -> None:
    plan = FaultPlan(fail_at=10**9, error=error)
    faulty = open_faulty(softhsm_token, plan)
    try:
        iv = os.urandom(12)
        body = faulty.encrypt_aes_gcm(aes_ref, iv, b"", b"before")  # warm: index built, handle cached
        plan.fail_at = plan.calls + 1
        assert faulty.decrypt_aes_gcm(aes_ref, iv, b"", body) == b"before"  # answered by the retry
        assert plan.triggered.is_set() and plan.sessions_opened == 2
        # Later requests work without a restart, and so does the shared instance.
        assert faulty.decrypt_aes_gcm(aes_ref, iv, b"", faulty.encrypt_aes_gcm(aes_ref, iv, b"", b"x")) == b"x"
        assert hsm.decrypt_aes_gcm(aes_ref, iv, b"", body) == b"before"
        catalog = SqliteCatalog(tmp_path / "catalog.db")
        try:
            store = KeyStore(hsm=faulty, catalog=catalog, clock=FakeClock())
            plan.fail_at = plan.calls + 1
            plan._broken.clear()
            store.check_health()  # its HSM call fails once, is retried and passes
            assert plan.sessions_opened == 3
            store.check_health()
        finally:
            catalog.close()
    finally:
        faulty.close()


@pytest.mark.parametrize("error", [ckr.SessionHandleInvalid, ckr.DeviceError], ids=lambda e: e.__name__)
def test_state_changing_call_is_not_retried_but_the_next_one_works(
    error: type[ckr.PKCS11Error], hsm: Pkcs11Hsm, softhsm_token: SoftHsmToken
) -> None:
    plan = FaultPlan(fail_at=10**9, error=error)
    faulty = open_faulty(softhsm_token, plan)
    try:
        faulty.random(1)
        plan.fail_at = plan.calls + 1
        ref = KeyVersionRef(uuid.uuid4(), 1)
        with pytest.raises(KMSInternalException, match=error.__name__):
            faulty.create_key(ref, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
        assert not hsm.has_key(ref)  # failed before generating: nothing half-made
        faulty.create_key(ref, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
        assert faulty.has_key(ref) and plan.sessions_opened == 2
        faulty.destroy_key(ref)
    finally:
        faulty.close()


def test_a_fault_on_the_retry_too_is_internal_error_and_then_recovers(
    softhsm_token: SoftHsmToken, aes_ref: KeyVersionRef
) -> None:
    class TwicePlan(FaultPlan):
        def __call__(self, session):  # type: ignore[no-untyped-def]
            wrapped = super().__call__(session)
            if self.sessions_opened == 2:  # the retry's session dies at its first call too
                self.fail_at = self.calls + 1
            return wrapped

    plan = TwicePlan(fail_at=10**9, error=ckr.SessionClosed)
    faulty = open_faulty(softhsm_token, plan)
    try:
        faulty.random(1)
        plan.fail_at = plan.calls + 1
        with pytest.raises(KMSInternalException, match="SessionClosed"):
            faulty.random(8)
        assert len(faulty.random(8)) == 8 and plan.sessions_opened == 3
    finally:
        faulty.close()


def test_a_session_closed_for_real_is_replaced(softhsm_token: SoftHsmToken, aes_ref: KeyVersionRef) -> None:
    plan = FaultPlan(fail_at=10**9, error=ckr.GeneralError)  # never fires: only the proxy is used
    faulty = open_faulty(softhsm_token, plan)
    try:
        faulty.encrypt_aes_gcm(aes_ref, os.urandom(12), b"", b"x")
        faulty._session.inner.close()  # type: ignore[union-attr]
        assert len(faulty.encrypt_aes_gcm(aes_ref, os.urandom(12), b"", b"x")) == 17
        assert plan.sessions_opened == 2
    finally:
        faulty.close()


def test_a_hanging_hsm_call_makes_others_time_out_not_hang(softhsm_token: SoftHsmToken) -> None:
    plan = FaultPlan(fail_at=10**9, hang_s=1.5)
    faulty = open_faulty(softhsm_token, plan, lock_timeout=0.2)
    try:
        faulty.random(1)
        plan.fail_at = plan.calls + 1
        stalled = threading.Thread(target=faulty.random, args=(4,))
        stalled.start()
        assert plan.triggered.wait(5)
        started = time.monotonic()
        with pytest.raises(DependencyTimeoutException):
            faulty.random(4)
        assert time.monotonic() - started < 1.0
        stalled.join(5)
        assert len(faulty.random(4)) == 4
    finally:
        faulty.close()


# ------------------------------------------------------------- PINs stay off argv


def test_token_init_command_line_carries_no_pin() -> None:
    argv = softhsm.init_token_argv("/usr/lib/softhsm/libsofthsm2.so")
    assert argv[0] == sys.executable and "pin" not in " ".join(argv[1:]).replace("_init_token", "")


def test_no_child_of_token_creation_shows_a_pin_in_proc_cmdline(tmp_path: Path) -> None:
    conf = softhsm.write_conf(tmp_path)
    pin, so_pin = os.urandom(8).hex(), os.urandom(8).hex()
    seen: list[bytes] = []
    done = threading.Event()

    def sample() -> None:
        me = os.getpid()
        while not done.is_set():
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == me:
                    continue
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if b"_init_token_child" in cmdline or b"softhsm2-util" in cmdline:
                    seen.append(cmdline)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        softhsm.init_token(conf, "argv-test", pin, so_pin)
    finally:
        done.set()
        sampler.join()
    assert any(b"_init_token_child" in c for c in seen)  # the sampler did see the child
    assert not any(pin.encode() in c or so_pin.encode() in c for c in seen)
    assert softhsm.token_exists(conf, "argv-test")
    # The user PIN works (C_InitPIN ran): log in from a process of its own.
    code = (
        "import sys, pkcs11; t = pkcs11.lib(sys.argv[1]).get_token(token_label='argv-test');"
        "t.open(user_pin=sys.stdin.read()).close()"
    )
    import subprocess

    done_login = subprocess.run(
        [sys.executable, "-c", code, str(softhsm.find_module())],
        input=pin, text=True, capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(conf)}, timeout=60,
    )
    assert done_login.returncode == 0, done_login.stderr


class _GlitchingGenerate:
    """A session wrapper whose generate_key makes the key, then answers FunctionFailed
    (the first ``times`` calls): a module that fails a generation and leaves its object."""

    def __init__(self, times: int) -> None:
        self.times = times
        self.glitches = 0

    def __call__(self, session: Any) -> Any:
        outer = self

        class Proxy:
            def __getattr__(self, name: str) -> Any:
                return getattr(session, name)

            def generate_key(self, *args: Any, **kwargs: Any) -> Any:
                key = session.generate_key(*args, **kwargs)
                if outer.glitches < outer.times:
                    outer.glitches += 1
                    raise ckr.FunctionFailed()
                return key

        return Proxy()


def _objects_with_id(hsm: Pkcs11Hsm, ref: KeyVersionRef) -> int:
    return hsm._call("count", lambda: len(hsm._find({Attribute.ID: ref.object_id})), retry=True)


def test_a_failed_generation_is_cleaned_up_and_made_once_more(softhsm_token: SoftHsmToken, hsm: Pkcs11Hsm) -> None:
    glitch = _GlitchingGenerate(times=1)
    faulty = Pkcs11Hsm.open(
        module=softhsm_token.module, token_label=softhsm_token.label, pin=softhsm_token.pin, session_wrapper=glitch
    )
    try:
        ref = KeyVersionRef(uuid.uuid4(), 1)
        faulty.create_key(ref, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
        assert glitch.glitches == 1
        assert _objects_with_id(hsm, ref) == 1  # the failed call's object is gone, not a duplicate
        iv = os.urandom(12)
        assert hsm.decrypt_aes_gcm(ref, iv, b"", faulty.encrypt_aes_gcm(ref, iv, b"", b"x")) == b"x"

        glitch.times, glitch.glitches = 2, 0  # fails twice: an error, and nothing left behind
        lost = KeyVersionRef(uuid.uuid4(), 1)
        with pytest.raises(KMSInternalException):
            faulty.create_key(lost, KeySpec.SYMMETRIC_DEFAULT, KeyUsage.ENCRYPT_DECRYPT)
        assert glitch.glitches == 2
        assert _objects_with_id(hsm, lost) == 0
    finally:
        faulty.close()
