"""Secrets hygiene: a full run (init, server, CLI, provisioning with imported key
material, SDK calls, errors, /metrics) with a recognisable PIN, secret access key,
plaintext and key material leaves none of them in any log, audit line, error message,
/metrics page or process command line seen meanwhile."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from hsmkeys.hsm.softhsm import find_module


def _cmdlines(seen: set[str], stop: threading.Event) -> None:
    while not stop.is_set():
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    seen.add((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace"))
        stop.wait(0.02)


@pytest.mark.hsm
@pytest.mark.server
def test_no_secret_leaves_a_trace(tmp_path: Path) -> None:
    secret_key = "SECRETCANARY" + secrets.token_hex(10)
    plaintext = b"PLAINCANARY" + secrets.token_hex(6).encode()
    material = (b"MATERIALCANARY" + secrets.token_hex(9).encode())[:32]
    canaries = {
        "secret": [secret_key],
        "plaintext": [plaintext.decode(), base64.b64encode(plaintext).decode(), plaintext.hex()],
        "key material": [material.decode(), base64.b64encode(material).decode(), material.hex()],
    }
    config = tmp_path / "hsmkeys.yaml"
    config.write_text(
        f"hsm:\n  module: {find_module()}\n  token_label: hygiene\n  pin_file: var/pin\n"
        "catalog: var/catalog.db\naudit_log: var/audit.log\n"
        "principals:\n  - arn: arn:aws:iam::111122223333:root\n    access_key_id: AKIAHYGIENE\n"
        "    secret_access_key_env: HYGIENE_SECRET\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HSMKEYS_", "AWS_"))}
    env |= {"HYGIENE_SECRET": secret_key, "SOFTHSM2_CONF": str(tmp_path / "var" / "softhsm2.conf"),
            "PYTHONUNBUFFERED": "1"}
    hsmkeys = [sys.executable, "-m", "hsmkeys", "--config", str(config)]
    texts: list[str] = []
    seen_cmdlines: set[str] = set()
    stop = threading.Event()
    sampler = threading.Thread(target=_cmdlines, args=(seen_cmdlines, stop), daemon=True)
    sampler.start()
    try:
        done = subprocess.run([*hsmkeys, "init", "--create-token"], env=env, capture_output=True, text=True, timeout=60)
        texts += [done.stdout, done.stderr]
        assert done.returncode == 0, done.stderr
        pin = (tmp_path / "var" / "pin").read_text().strip()  # init made it: the PIN canary
        assert len(pin) >= 8
        canaries["pin"] = [pin]
        server = subprocess.Popen([*hsmkeys, "serve", "--host", "127.0.0.1", "--port", "0"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert server.stdout is not None
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            texts.append(line)
            if found := re.search(r"listening on (http://\S+)", line):
                url = found[1]
        assert url is not None, texts
        client = boto3.client("kms", endpoint_url=url, region_name="us-east-1", aws_access_key_id="AKIAHYGIENE",
                              aws_secret_access_key=secret_key, config=Config(retries={"max_attempts": 1}))
        key_id = client.create_key()["KeyMetadata"]["KeyId"]
        blob = client.encrypt(KeyId=key_id, Plaintext=plaintext, EncryptionContext={"k": "v"})["CiphertextBlob"]
        assert client.decrypt(CiphertextBlob=blob, EncryptionContext={"k": "v"})["Plaintext"] == plaintext
        for bad in (
            lambda: client.decrypt(CiphertextBlob=blob, EncryptionContext={"k": "other"}),
            lambda: client.encrypt(KeyId="alias/none", Plaintext=plaintext),
            lambda: client.encrypt(KeyId=key_id, Plaintext=plaintext, EncryptionAlgorithm="RSAES_OAEP_SHA_1"),
            lambda: boto3.client("kms", endpoint_url=url, region_name="us-east-1", aws_access_key_id="AKIAHYGIENE",
                                 aws_secret_access_key=secret_key + "x").encrypt(KeyId=key_id, Plaintext=plaintext),
        ):
            with pytest.raises(ClientError) as refused:
                bad()
            texts.append(str(refused.value.response))
        with urllib.request.urlopen(url + "/metrics", timeout=10) as page:
            texts.append(page.read().decode())
        cli_env = env | {"AWS_ACCESS_KEY_ID": "AKIAHYGIENE"}
        for args, stdin in ((["keys", "list"], b""), (["encrypt", "--key-id", key_id], plaintext), (["doctor"], b"")):
            done_cli = subprocess.run([*hsmkeys, *args], env=cli_env, input=stdin, capture_output=True, timeout=60)
            texts += [done_cli.stdout.decode("utf-8", "replace"), done_cli.stderr.decode("utf-8", "replace")]
        (tmp_path / "material.bin").write_bytes(material)
        plan = tmp_path / "keys.yaml"
        plan.write_text(
            "keys:\n  - alias: alias/hygiene\n    description: secrets scan\n"
            "  - alias: alias/hygiene-import\n    origin: EXTERNAL\n    key_material_file: material.bin\n"
        )
        provision = Path(__file__).resolve().parents[2] / "scripts" / "provision.py"
        provision_env = env | {"AWS_ACCESS_KEY_ID": "AKIAHYGIENE", "AWS_SECRET_ACCESS_KEY": secret_key}
        for verb in (["plan"], ["apply", "--yes"]):
            done_p = subprocess.run(
                [sys.executable, str(provision), *verb, str(plan), "--endpoint", url, "--region", "us-east-1"],
                env=provision_env, capture_output=True, text=True, timeout=120,
            )
            texts += [done_p.stdout, done_p.stderr]
            assert done_p.returncode in (0, 2), done_p.stderr
        imported = client.describe_key(KeyId="alias/hygiene-import")["KeyMetadata"]
        assert imported["KeyState"] == "Enabled"
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
        texts += [out, err]
    finally:
        stop.set()
        sampler.join()
    for path in (tmp_path / "var").rglob("*"):
        if path.is_file() and path.suffix in (".log", ".conf", ".txt", "") and path.name not in ("pin", "credentials") and "tokens" not in str(path):
            texts.append(path.read_bytes().decode("utf-8", "replace"))
    haystacks = {"output, logs, audit, errors, /metrics": "\n".join(texts), "command lines": "\n".join(seen_cmdlines)}
    hits = [(what, name) for what, text in haystacks.items() for name, values in canaries.items()
            for value in values if value in text]
    print(f"\nsecrets scan: {len(texts)} texts, {len(seen_cmdlines)} command lines, hits: {hits}")
    assert hits == []
    assert len(seen_cmdlines) > 3 and any("hsmkeys" in c for c in seen_cmdlines)
