"""Threads with sessions of their own (Pkcs11Hsm.use_own_session) and the background index.

Each scenario runs in a child process (tests/hsm/lanes_child.py) whose PKCS#11 module is
first loaded by Pkcs11Hsm.open, so it is initialised with CKF_OS_LOCKING_OK; this
process may have loaded it otherwise. A crash of SoftHSM2 under concurrent calls fails
the test through the child's exit status.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hsmkeys.hsm import softhsm

CHILD = Path(__file__).with_name("lanes_child.py")


def run_child(scenario: str, tmp_path: Path) -> dict[str, Any]:
    module = str(softhsm.find_module())
    conf = softhsm.write_conf(tmp_path)
    pin = secrets.token_hex(8)
    softhsm.init_token(conf, "lanes", pin, secrets.token_hex(8))
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    done = subprocess.run(
        [sys.executable, str(CHILD), scenario, module, "lanes", str(tmp_path)],
        input=pin + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_encrypts_complete_while_another_thread_generates_rsa_4096(tmp_path: Path) -> None:
    result = run_child("keygen", tmp_path)
    assert result["own_session"] == [True]
    # Serialised, the first encrypt would wait for the whole generation: at most one.
    assert result["encrypts_during_keygen"] >= 20
    assert result["signature_len"] == 512  # the pair made on the other lane, used here
    assert result["gone"]  # destroyed on a third lane, NotFound here


def test_five_threads_on_four_sessions_share_keys_without_errors(tmp_path: Path) -> None:
    result = run_child("stress", tmp_path)
    assert result["errors"] == []
    assert result["counts"] == {name: 150 for name in ("lane0", "lane1", "lane2", "lane3", "shared")}


@pytest.mark.parametrize("scenario", ["lazy"])
def test_first_request_is_answered_before_the_background_index_is_built(scenario: str, tmp_path: Path) -> None:
    result = run_child(scenario, tmp_path)
    assert result["started"]
    assert result["plaintext_ok"]
    assert not result["index_done_at_first_request"]  # the scan was still blocked
    assert result["scans"] == 1
    assert result["pages"] == [40, 40, 40, 30]  # ListKeys comes from the catalog: full pages
    assert result["listed_all"]
    assert result["finished"]
    assert result["searches_after_index"] == 0  # once indexed, a miss-free lookup
