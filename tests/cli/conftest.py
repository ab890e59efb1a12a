"""CLI fixtures: ``cli(*argv, stdin=b"")`` runs ``hsmkeys.cli.main`` in-process on an in-memory store."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from hsmkeys.cli import main
from hsmkeys.keystore import KeyStore


@dataclass(frozen=True)
class Ran:
    code: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode("utf-8")


RunCli = Callable[..., Ran]


def run_main(
    store: KeyStore, capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> RunCli:
    def run(*argv: str, stdin: bytes = b"") -> Ran:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        capsysbinary.readouterr()
        code = main(list(argv), open_store=lambda: contextlib.nullcontext(store))
        out, err = capsysbinary.readouterr()
        return Ran(code, out, err.decode("utf-8"))

    return run


@pytest.fixture
def cli(store: KeyStore, capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch) -> RunCli:
    return run_main(store, capsysbinary, monkeypatch)


@pytest.fixture
def key_id(store: KeyStore) -> str:
    return store.create_key(description="test key").key_metadata.key_id
