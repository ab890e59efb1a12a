"""Helpers shared by the HSM tests (a module of its own: tests/ has no packages)."""

from __future__ import annotations

import uuid

from hsmkeys.keystore import KeyStore
from hsmkeys.models import KeySpec, KeyUsage, KeyVersionRef


class SharedKeys:
    """Creates each (spec, usage) key once per session in ``store``."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self._ids: dict[tuple[KeySpec, KeyUsage], str] = {}

    def key_id(self, spec: KeySpec, usage: KeyUsage) -> str:
        if (spec, usage) not in self._ids:
            created = self.store.create_key(key_spec=spec, key_usage=usage)
            self._ids[(spec, usage)] = created.key_metadata.key_id
        return self._ids[(spec, usage)]

    def ref(self, spec: KeySpec, usage: KeyUsage) -> KeyVersionRef:
        return KeyVersionRef(uuid.UUID(self.key_id(spec, usage)), 1)
