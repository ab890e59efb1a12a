"""Provision fixtures: write a YAML file, run plan/apply in process on the in-memory store.

``provision("plan", text)`` writes ``text`` to ``keys.yaml`` in tmp_path and runs
``hsmkeys.provision.command.main`` against the ``store`` fixture through LocalKms.
"""

from __future__ import annotations

import contextlib
import io
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from hsmkeys.keystore import KeyStore
from hsmkeys.kmsclient import LocalKms
from hsmkeys.provision.command import main


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error: ")]


RunProvision = Callable[..., Ran]


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, str], Path]:
    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@pytest.fixture
def provision(
    store: KeyStore,
    write_file: Callable[[str, str], Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> RunProvision:
    def run(action: str, text: str | None = None, *extra: str, stdin: str = "", tty: bool = False) -> Ran:
        path = write_file("keys.yaml", text) if text is not None else write_file("keys.yaml", "keys: []\n")
        fake_stdin = io.StringIO(stdin)
        fake_stdin.isatty = lambda: tty  # type: ignore[method-assign]
        monkeypatch.setattr(sys, "stdin", fake_stdin)
        capsys.readouterr()
        code = main([action, str(path), *extra], open_store=lambda: contextlib.nullcontext(store))
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return Ran(code, out, err)

    return run


@pytest.fixture
def kms(store: KeyStore) -> LocalKms:
    return LocalKms(store)
