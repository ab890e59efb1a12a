"""Unit fixtures (the KeyStore, catalog and clock ones are in tests/conftest.py)."""

from __future__ import annotations

import pytest

from hsmkeys.keystore import KeyStore


@pytest.fixture
def key_id(store: KeyStore) -> str:
    return store.create_key(description="test key").key_metadata.key_id
