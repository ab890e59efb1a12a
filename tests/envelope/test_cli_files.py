"""``hsmkeys encrypt-file`` / ``decrypt-file`` in process on the in-memory store."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import tracemalloc
from pathlib import Path

import pytest

from hsmkeys.keystore import KeyStore

from .conftest import Key, RunCli

MIB = 1 << 20


def write_random(path: Path, size: int) -> str:
    """Write ``size`` random bytes in 1 MiB chunks; return their SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(MIB, left))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("size", [0, 1, 100 * MIB], ids=["0B", "1B", "100MiB"])
def test_file_round_trips(cli: RunCli, key: Key, tmp_path: Path, size: int) -> None:
    plain, sealed, opened = tmp_path / "plain", tmp_path / "sealed", tmp_path / "opened"
    digest = write_random(plain, size)
    ran = cli(
        "encrypt-file", str(plain), str(sealed), "--key-id", key.alias, "--context", "tenant=7"
    )
    assert (ran.code, ran.err) == (0, "")
    assert sealed.stat().st_size > size
    ran = cli("decrypt-file", str(sealed), str(opened), "--context", "tenant=7")
    assert (ran.code, ran.err) == (0, "")
    assert sha256_of(opened) == digest
    assert not list(tmp_path.glob(".*.part"))


def test_stdin_to_stdout_and_back(cli: RunCli, key: Key) -> None:
    sealed = cli("encrypt-file", "-", "-", "--key-id", key.arn, stdin=b"from a pipe")
    assert sealed.code == 0 and sealed.out.startswith(b"\x02")  # message format version 2
    opened = cli("decrypt-file", "-", "-", "--key-id", key.arn, stdin=sealed.out)
    assert (opened.code, opened.out) == (0, b"from a pipe")


def test_wrong_context_exits_1_with_a_clear_message_and_no_output(
    cli: RunCli, key: Key, tmp_path: Path
) -> None:
    (tmp_path / "plain").write_bytes(b"tenant data")
    cli(
        "encrypt-file",
        str(tmp_path / "plain"),
        str(tmp_path / "sealed"),
        "--key-id",
        key.alias,
        "--context",
        "tenant=7",
    )
    ran = cli(
        "decrypt-file", str(tmp_path / "sealed"), str(tmp_path / "opened"), "--context", "tenant=8"
    )
    assert ran.code == 1
    assert ran.err == (
        "error: InvalidCiphertextException: encryption context mismatch: the message's encryption "
        "context is tenant=7; it does not contain tenant=8\n"
    )
    assert not (tmp_path / "opened").exists()
    assert not list(tmp_path.glob(".*.part"))


def test_tampered_file_is_an_error_and_leaves_no_output(
    cli: RunCli, key: Key, tmp_path: Path
) -> None:
    (tmp_path / "plain").write_bytes(b"p" * 300_000)
    cli("encrypt-file", str(tmp_path / "plain"), str(tmp_path / "sealed"), "--key-id", key.arn)
    sealed = bytearray((tmp_path / "sealed").read_bytes())
    sealed[len(sealed) // 2] ^= 0x80
    (tmp_path / "sealed").write_bytes(bytes(sealed))
    ran = cli("decrypt-file", str(tmp_path / "sealed"), str(tmp_path / "opened"))
    assert ran.code == 2
    assert ran.err.startswith("error: InvalidCiphertextException: not a valid message")
    assert "Traceback" not in ran.err and ran.err.count("\n") == 1
    assert not (tmp_path / "opened").exists()


def test_decrypt_with_another_key_id_is_refused(
    cli: RunCli, store: KeyStore, key: Key, tmp_path: Path
) -> None:
    other = store.create_key().key_metadata.arn
    cli("encrypt-file", "-", str(tmp_path / "sealed"), "--key-id", key.arn, stdin=b"x")
    ran = cli("decrypt-file", str(tmp_path / "sealed"), "-", "--key-id", other)
    assert ran.code == 2 and ran.out == b""
    assert f"{key.arn}: not a key of this provider" in ran.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["encrypt-file", "/nonexistent/in", "out", "--key-id", "alias/envelope"],
            "InputError: cannot read /nonexistent/in",
        ),
        (
            ["encrypt-file", "-", "/nonexistent/dir/out", "--key-id", "alias/envelope"],
            "InputError: cannot write",
        ),
        (["encrypt-file", "-", "-", "--key-id", "alias/nope"], "error: NotFoundException"),
        (
            ["encrypt-file", "-", "-", "--key-id", "alias/envelope", "--json"],
            "--json prints to stdout",
        ),
        (["decrypt-file", "-", "-"], "error: InvalidCiphertextException: not a valid message"),
    ],
)
def test_bad_input_is_one_error_line(cli: RunCli, key: Key, argv: list[str], message: str) -> None:
    ran = cli(*argv, stdin=b"not a message")
    assert ran.code == 2
    assert message in ran.err and ran.err.count("\n") == 1 and "Traceback" not in ran.err


def test_json_summary_names_the_key_arn_and_context(cli: RunCli, key: Key, tmp_path: Path) -> None:
    ran = cli(
        "encrypt-file",
        "-",
        str(tmp_path / "sealed"),
        "--key-id",
        key.alias,
        "--context",
        "a=1",
        "--json",
        stdin=b"x",
    )
    assert ran.code == 0
    assert b'"KeyIds": [\n    "' + key.arn.encode() + b'"\n  ]' in ran.out
    assert b'"EncryptionContext": {\n    "a": "1"\n  }' in ran.out


def test_progress_goes_to_stderr_only_when_asked(cli: RunCli, key: Key, tmp_path: Path) -> None:
    write_random(tmp_path / "plain", 2 * MIB)
    quiet = cli("encrypt-file", str(tmp_path / "plain"), str(tmp_path / "a"), "--key-id", key.arn)
    assert quiet.err == ""  # stderr is not a TTY here
    shown = cli(
        "encrypt-file",
        str(tmp_path / "plain"),
        str(tmp_path / "b"),
        "--key-id",
        key.arn,
        "--progress",
    )
    assert shown.code == 0
    assert shown.err.startswith("\rencrypt ") and shown.err.endswith("100%  2.0/2.0 MiB\n")


def test_streaming_memory_does_not_grow_with_the_file(
    cli: RunCli, key: Key, tmp_path: Path
) -> None:
    write_random(tmp_path / "plain", 24 * MIB)
    tracemalloc.start()
    try:
        cli(
            "encrypt-file",
            str(tmp_path / "plain"),
            str(tmp_path / "sealed"),
            "--key-id",
            key.arn,
            "--no-cache",
        )
        cli("decrypt-file", str(tmp_path / "sealed"), str(tmp_path / "opened"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "opened").stat().st_size == 24 * MIB
    assert peak < 4 * MIB  # a few 256 KiB reads in flight, not the 24 MiB file


def test_output_to_a_fifo_is_written_in_place(cli: RunCli, key: Key, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    ran = cli("encrypt-file", "-", str(fifo), "--key-id", key.arn, stdin=b"through a fifo")
    reader.join(timeout=30)
    assert ran.code == 0 and stat.S_ISFIFO(fifo.lstat().st_mode)  # not replaced by a file
    opened = cli("decrypt-file", "-", "-", stdin=received[0])
    assert opened.out == b"through a fifo"


def test_output_through_a_symlink_replaces_its_target(
    cli: RunCli, key: Key, tmp_path: Path
) -> None:
    (tmp_path / "target").write_bytes(b"old")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert (
        cli("encrypt-file", "-", str(tmp_path / "link"), "--key-id", key.arn, stdin=b"new").code
        == 0
    )
    assert (tmp_path / "link").is_symlink()
    assert cli("decrypt-file", str(tmp_path / "target"), "-").out == b"new"
