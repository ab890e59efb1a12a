"""pytest fixtures for testing code against a real (SoftHSM2) hsmkeys HSM or KMS endpoint.

Installed as a ``pytest11`` entry point, so the fixtures are available in any test
session that has hsmkeys installed; nothing here loads a PKCS#11 module or starts a
server until a test asks for one. A user's test of code that talks to AWS KMS, run
against a throwaway hsmkeys server (needs boto3)::

    def test_envelope_round_trip_over_http(hsmkeys_kms_client):
        key_id = hsmkeys_kms_client.create_key()["KeyMetadata"]["KeyId"]
        sealed = hsmkeys_kms_client.encrypt(KeyId=key_id, Plaintext=b"secret")
        opened = hsmkeys_kms_client.decrypt(CiphertextBlob=sealed["CiphertextBlob"])
        assert opened["Plaintext"] == b"secret" and opened["KeyId"].endswith(key_id)

Code that builds its own client takes the endpoint from ``hsmkeys_kms``
(``.url``, ``.region``, ``.access_key_id``, ``.secret_access_key``). The same, in
process against the library::

    import pytest

    @pytest.mark.hsm
    def test_envelope_round_trip(hsm_keystore):
        key_id = hsm_keystore.create_key().key_metadata.key_id
        data_key = hsm_keystore.generate_data_key(key_id=key_id, key_spec="AES_256")
        opened = hsm_keystore.decrypt(ciphertext_blob=data_key.ciphertext_blob)
        assert opened.plaintext == data_key.plaintext

Fixtures:

``softhsm_token`` (session)
    A fresh SoftHSM2 token in a temp directory with random PINs
    (:class:`SoftHsmToken`). ``SOFTHSM2_CONF`` is pointed at its config before the
    module is loaded: SoftHSM2 reads the config and scans its tokens only once per
    process, so there is one token per test session (per xdist worker).
``hsm`` (session)
    A :class:`~hsmkeys.hsm.pkcs11.Pkcs11Hsm` logged in to that token.
``hsm_keystore`` (function)
    A :class:`~hsmkeys.keystore.KeyStore` over ``hsm`` with its own SQLite catalog in
    ``tmp_path`` and a :class:`~hsmkeys.clock.FakeClock` (``hsm_keystore_clock``).
``hsmkeys_kms`` (session)
    A running ``hsmkeys serve --ephemeral`` on 127.0.0.1
    (:class:`~hsmkeys.testing.server.EphemeralKms`): its own SoftHSM2 token and
    catalog, generated credentials. Stopped with SIGTERM at the end of the session;
    the session fails if it does not exit cleanly.
``hsmkeys_kms_client`` (session)
    A boto3 ``kms`` client for ``hsmkeys_kms`` (no retries).

Every test shares the session's token (and server): key ids are random UUIDs, so tests
do not collide, but ``KeyStore.doctor`` sees other tests' objects as orphans — check
doctor reports for your own refs, and run ``doctor(fix=True)`` only in a process of
its own (for example with ``pytester.runpytest_subprocess``).

What the fixtures need: ``pip install 'hsmkeys[pytest]'`` (pytest, boto3) and
``apt-get install softhsm2``. A fixture that cannot run for want of either **fails**
its test with one message saying what to install. A suite that runs where SoftHSM2
may be absent can skip those tests instead: ``hsmkeys_require_softhsm = false`` in
its pytest ini (the reason, with the same message, shows under ``-rs``).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

from hsmkeys.clock import FakeClock
from hsmkeys.errors import ConfigError
from hsmkeys.testing.server import EphemeralKms, start_ephemeral_kms

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

    from hsmkeys.hsm.pkcs11 import Pkcs11Hsm
    from hsmkeys.keystore import KeyStore

__all__ = ["SoftHsmToken", "cannot_run", "softhsm_module_or_skip"]


@dataclass(frozen=True, slots=True)
class SoftHsmToken:
    """A SoftHSM2 token made for this test session."""

    module: str  # path of libsofthsm2.so
    conf: Path  # the softhsm2.conf SOFTHSM2_CONF points at
    label: str
    pin: str = field(repr=False)


_REQUIRE_INI = "hsmkeys_require_softhsm"
_require_softhsm = True
_INSTALL = "pip install 'hsmkeys[pytest]' and apt-get install softhsm2"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        _REQUIRE_INI,
        "hsmkeys fixtures that cannot run (no SoftHSM2, no boto3) fail their test (default true); "
        "false skips it instead",
        type="bool",
        default=True,
    )


def cannot_run(fixture: str, problem: str) -> NoReturn:
    """Fail (or, with ``hsmkeys_require_softhsm = false``, skip) the test needing ``fixture``,
    with one message naming what is missing and what to install."""
    message = f"hsmkeys fixture {fixture!r} cannot run: {problem}. Install its dependencies: {_INSTALL}"
    if _require_softhsm:
        pytest.fail(f"{message} (or set {_REQUIRE_INI} = false in the pytest ini to skip)", pytrace=False)
    pytest.skip(message)


def pytest_configure(config: pytest.Config) -> None:
    global _require_softhsm
    config.addinivalue_line("markers", "hsm: runs against a real SoftHSM2 token")
    _require_softhsm = bool(config.getini(_REQUIRE_INI))


def softhsm_module_or_skip(fixture: str = "softhsm_token") -> str:
    """The SoftHSM2 module's path. Without SoftHSM2 the test fails saying what to install
    (:func:`cannot_run`), or is skipped when the ini option ``hsmkeys_require_softhsm`` is false."""
    from hsmkeys.hsm import softhsm

    try:
        module = str(softhsm.find_module())
    except ConfigError as exc:
        problem = str(exc).rstrip(".")
    else:
        if shutil.which("softhsm2-util") is not None:
            return module
        problem = "softhsm2-util (package softhsm2) is not on PATH"
    cannot_run(fixture, problem)  # outside the except: one message, no chained traceback


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmToken]:
    from hsmkeys.hsm import softhsm

    module = softhsm_module_or_skip()

    from hsmkeys.hsm.pkcs11 import module_loaded

    if module_loaded(module):
        # Its token directory was scanned already: a new token would be invisible.
        pytest.fail(
            f"{module} was loaded in this process before the softhsm_token fixture ran; "
            "it cannot see a new token. Load it only through hsmkeys' fixtures.",
            pytrace=False,
        )
    directory = tmp_path_factory.mktemp("softhsm")
    conf = softhsm.write_conf(directory)
    label = f"hsmkeys-test-{secrets.token_hex(4)}"
    pin = secrets.token_hex(8)
    softhsm.init_token(conf, label, pin, secrets.token_hex(8))
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        yield SoftHsmToken(module=module, conf=conf, label=label, pin=pin)
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture(scope="session")
def hsm(softhsm_token: SoftHsmToken) -> Iterator[Pkcs11Hsm]:
    from hsmkeys.hsm.pkcs11 import Pkcs11Hsm

    opened = Pkcs11Hsm.open(
        module=softhsm_token.module, token_label=softhsm_token.label, pin=softhsm_token.pin
    )
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def hsm_keystore_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def hsm_keystore(
    hsm: Pkcs11Hsm, tmp_path: Path, hsm_keystore_clock: FakeClock
) -> Iterator[KeyStore]:
    from hsmkeys.catalog.sqlite import SqliteCatalog
    from hsmkeys.keystore import KeyStore

    catalog = SqliteCatalog(tmp_path / "hsmkeys-catalog.db")
    try:
        # Not closed through the store: that would close the session-wide HSM.
        yield KeyStore(hsm=hsm, catalog=catalog, clock=hsm_keystore_clock)
    finally:
        catalog.close()


@pytest.fixture(scope="session")
def hsmkeys_kms() -> Iterator[EphemeralKms]:
    softhsm_module_or_skip("hsmkeys_kms")
    kms = start_ephemeral_kms()
    try:
        yield kms
    finally:
        code = kms.stop()
    if code != 0:
        pytest.fail(f"the hsmkeys_kms server exited with {code}, not 0", pytrace=False)


@pytest.fixture(scope="session")
def _hsmkeys_boto3() -> None:
    """Checks boto3 before ``hsmkeys_kms`` starts a server the client could not use."""
    try:
        import boto3  # noqa: F401
    except ImportError as exc:
        problem = f"boto3 is not importable ({exc})"
    else:
        return
    cannot_run("hsmkeys_kms_client", problem)  # outside the except: no chained traceback


@pytest.fixture(scope="session")
def hsmkeys_kms_client(_hsmkeys_boto3: None, hsmkeys_kms: EphemeralKms) -> KMSClient:
    return hsmkeys_kms.client()
