"""Shared fixtures for tests against SoftHSM2 (the ``hsm`` fixtures come from hsmkeys.testing.plugin).

Asymmetric keys are slow to make (RSA-4096 ~1.7 s), so one KeyStore and one key per
(spec, usage) are shared by the whole session through :class:`SharedKeys`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pkcs11
import pkcs11.exceptions
import pytest
from hsm_shared import SharedKeys
from pkcs11.types import Session

from hsmkeys.catalog.sqlite import SqliteCatalog
from hsmkeys.clock import FakeClock
from hsmkeys.hsm.pkcs11 import Pkcs11Hsm
from hsmkeys.keystore import KeyStore
from hsmkeys.testing.plugin import SoftHsmToken


@pytest.fixture(scope="session")
def shared_store(hsm: Pkcs11Hsm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyStore]:
    catalog = SqliteCatalog(Path(tmp_path_factory.mktemp("shared")) / "catalog.db")
    try:
        yield KeyStore(hsm=hsm, catalog=catalog, clock=FakeClock())
    finally:
        catalog.close()


@pytest.fixture(scope="session")
def shared_keys(shared_store: KeyStore) -> SharedKeys:
    return SharedKeys(shared_store)


@pytest.fixture(scope="module")
def raw_session(hsm: Pkcs11Hsm, softhsm_token: SoftHsmToken) -> Iterator[Session]:
    """A python-pkcs11 session of our own on the token (``hsm`` has logged the process in).

    Per module: the session-recovery tests re-initialise the module, which ends every
    session of the process (``hsm`` opens a new one by itself).
    """
    hsm.random(1)  # make sure the process is logged in (after a re-initialisation too)
    token = pkcs11.lib(softhsm_token.module).get_token(token_label=softhsm_token.label)
    session = token.open(rw=True)
    try:
        yield session
    finally:
        with contextlib.suppress(pkcs11.exceptions.PKCS11Error):  # void after a re-initialisation
            session.close()
