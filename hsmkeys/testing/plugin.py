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
    A boto3 ``kms`` client for ``hsmkeys_kms`` (no retries); skipped without boto3.

Every test shares the session's token (and server): key ids are random UUIDs, so tests
do not collide, but ``KeyStore.doctor`` sees other tests' objects as orphans — check
doctor reports for your own refs, and run ``doctor(fix=True)`` only in a process of
its own (for example with ``pytester.runpytest_subprocess``).

Tests are skipped when SoftHSM2 (the module or ``softhsm2-util``) is not installed.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hsmkeys.clock import FakeClock
from hsmkeys.errors import ConfigError
from hsmkeys.testing.server import EphemeralKms, start_ephemeral_kms

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

    from hsmkeys.hsm.pkcs11 import Pkcs11Hsm
    from hsmkeys.keystore import KeyStore

__all__ = ["SoftHsmToken"]


@dataclass(frozen=True, slots=True)
class SoftHsmToken:
    """A SoftHSM2 token made for this test session."""

    module: str  # path of libsofthsm2.so
    conf: Path  # the softhsm2.conf SOFTHSM2_CONF points at
    label: str
    pin: str = field(repr=False)


_REQUIRE_INI = "hsmkeys_require_softhsm"
_require_softhsm = False


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        _REQUIRE_INI,
        "fail (rather than skip) SoftHSM2-backed tests when SoftHSM2 is not installed",
        type="bool",
        default=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    global _require_softhsm
    config.addinivalue_line("markers", "hsm: runs against a real SoftHSM2 token")
    _require_softhsm = bool(config.getini(_REQUIRE_INI))


def softhsm_module_or_skip() -> str:
    """The SoftHSM2 module's path. Without SoftHSM2 the test is skipped, or fails when
    the ini option ``hsmkeys_require_softhsm`` is true (a suite whose CI installs it)."""
    from hsmkeys.hsm import softhsm

    try:
        module = str(softhsm.find_module())
        if shutil.which("softhsm2-util") is None:
            raise ConfigError("softhsm2-util not found on PATH; install softhsm2")
    except ConfigError as exc:
        if _require_softhsm:
            pytest.fail(f"SoftHSM2 is required here: {exc}", pytrace=False)
        pytest.skip(str(exc))
    return module


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
    softhsm_module_or_skip()
    kms = start_ephemeral_kms()
    try:
        yield kms
    finally:
        code = kms.stop()
    if code != 0:
        pytest.fail(f"the hsmkeys_kms server exited with {code}, not 0", pytrace=False)


@pytest.fixture(scope="session")
def hsmkeys_kms_client(hsmkeys_kms: EphemeralKms) -> KMSClient:
    pytest.importorskip("boto3")
    return hsmkeys_kms.client()
