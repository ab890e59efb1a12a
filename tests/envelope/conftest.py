"""Envelope fixtures: a KeyStore on the in-memory HSM (tests/conftest.py) whose KMS calls
are counted, an encryption key with an alias, and the CLI run in-process on that store."""

from __future__ import annotations

import contextlib
import io
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from hsmkeys.cli import main
from hsmkeys.keystore import KeyStore


class CountingKeyStore:
    """Forwards everything to a KeyStore and counts the calls of each operation method."""

    def __init__(self, store: KeyStore) -> None:
        self._store = store
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._store, name)
        if not callable(value):
            return value

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return value(*args, **kwargs)

        return counted


@pytest.fixture
def counting(store: KeyStore) -> CountingKeyStore:
    return CountingKeyStore(store)


@dataclass(frozen=True)
class Key:
    arn: str
    key_id: str
    alias: str


@pytest.fixture
def key(store: KeyStore) -> Key:
    md = store.create_key(description="envelope").key_metadata
    store.create_alias(alias_name="alias/envelope", target_key_id=md.key_id)
    return Key(md.arn, md.key_id, "alias/envelope")


@dataclass(frozen=True)
class Ran:
    code: int
    out: bytes
    err: str


RunCli = Callable[..., Ran]


@pytest.fixture
def cli(
    store: KeyStore, capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> RunCli:
    """``cli(*argv, stdin=b"")``: hsmkeys.cli.main on ``store``, stdin fed, output captured."""

    def run(*argv: str, stdin: bytes = b"") -> Ran:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        capsysbinary.readouterr()
        code = main(list(argv), open_store=lambda: contextlib.nullcontext(store))
        out, err = capsysbinary.readouterr()
        return Ran(code, out, err.decode("utf-8"))

    return run
