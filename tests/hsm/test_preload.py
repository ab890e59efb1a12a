"""Loading the PKCS#11 module ahead of Pkcs11Hsm.open (a one-worker `serve` does it while
importing the server): open then uses the loaded module; a bad module is still reported
by open, as without the preload. Each case runs in a fresh process (a module loads once
per process)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from hsmkeys.hsm import softhsm

pytestmark = pytest.mark.hsm

CHILD = """
import json, sys, threading
from hsmkeys.errors import ConfigError
from hsmkeys.hsm import pkcs11 as p
module, label, pin = sys.argv[1:4]
loader = threading.Thread(target=p.preload_module, args=(module, label))
loader.start()
loader.join()
out = {"loaded": p.module_loaded(module)}
try:
    hsm = p.Pkcs11Hsm.open(module=module, token_label=label, pin=pin)
    out["random"] = len(hsm.random(16))
    hsm.close()
except ConfigError as exc:
    out["error"] = str(exc)
print(json.dumps(out))
"""


def run(tmp_path: Path, module: str) -> dict[str, object]:
    conf = softhsm.write_conf(tmp_path)
    pin = secrets.token_hex(8)
    softhsm.init_token(conf, "preload", pin, secrets.token_hex(8))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, module, "preload", pin],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_open_uses_the_module_a_thread_loaded(tmp_path: Path) -> None:
    assert run(tmp_path, str(softhsm.find_module())) == {"loaded": True, "random": 16}


def test_a_module_that_cannot_load_is_still_reported_by_open(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-module.so")
    result = run(tmp_path, missing)
    assert result["loaded"] is False
    assert "cannot load PKCS#11 module" in str(result["error"])
