"""A worker that loads SoftHSM2 while a sibling writes the token can miss it: it rescans."""

from __future__ import annotations

from typing import Any

import pytest

from hsmkeys.errors import ConfigError
from hsmkeys.hsm import pkcs11 as backend


class _Lib:
    def __init__(self, misses: int) -> None:
        self.misses = misses
        self.calls: list[str] = []

    def finalize(self) -> None:
        self.calls.append("finalize")

    def initialize(self) -> None:
        self.calls.append("initialize")


def _find(lib: Any, module: str, label: str) -> str:
    if lib.misses:
        lib.misses -= 1
        raise ConfigError(f"no token labelled {label!r}")
    return "token"


def test_a_token_missed_at_first_load_is_found_by_reading_the_directory_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backend, "_find_token", _find)
    monkeypatch.setattr(backend.time, "sleep", lambda _: None)
    lib = _Lib(misses=2)
    assert backend._find_token_loaded_now(lib, "m.so", "t") == "token"  # type: ignore[arg-type]
    assert lib.calls == ["finalize", "initialize", "finalize", "initialize"]


def test_a_token_that_is_really_missing_is_still_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "_find_token", _find)
    monkeypatch.setattr(backend.time, "sleep", lambda _: None)
    with pytest.raises(ConfigError, match="no token labelled"):
        backend._find_token_loaded_now(_Lib(misses=99), "m.so", "t")  # type: ignore[arg-type]
