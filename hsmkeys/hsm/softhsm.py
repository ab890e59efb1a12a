"""SoftHSM2 helpers: find the module, write a private config, initialise tokens.

Nothing here loads the PKCS#11 library in the calling process: tokens are made in a
child process whose environment alone carries ``SOFTHSM2_CONF`` (``softhsm2-util
--show-slots`` to list them; a Python child calling C_InitToken / C_InitPIN to create
one), so the calling process (and the system token directory) are never touched.
PINs never appear on a command line (``/proc/*/cmdline`` is readable by every local
user): the child reads them from its stdin.

SoftHSM2 reads ``SOFTHSM2_CONF`` and scans its token directory only at
C_Initialize: a process that has already loaded the module does not see a token
initialised afterwards. Create the token first, then open it.

Errors: :class:`hsmkeys.errors.ConfigError` when SoftHSM2 is not installed, a
token label is taken, or ``softhsm2-util`` fails (its message is included; PINs
are not).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from hsmkeys.errors import ConfigError

#: Where distributions install the module, most common first.
MODULE_CANDIDATES: tuple[Path, ...] = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib64/pkcs11/libsofthsm2.so"),
    Path("/usr/lib/pkcs11/libsofthsm2.so"),
    Path("/usr/local/lib/softhsm/libsofthsm2.so"),
    Path("/opt/homebrew/lib/softhsm/libsofthsm2.so"),
)

CONF_NAME = "softhsm2.conf"
TOKEN_DIR_NAME = "tokens"
_UTIL = "softhsm2-util"
_TIMEOUT_S = 60


def find_module(candidates: Iterable[Path] = MODULE_CANDIDATES) -> Path:
    """The first existing SoftHSM2 module among ``candidates``; ConfigError if none."""
    tried = list(candidates)
    for path in tried:
        if path.is_file():
            return path
    raise ConfigError(
        "SoftHSM2 module (libsofthsm2.so) not found; install softhsm2 "
        f"(apt-get install softhsm2). Looked in: {', '.join(str(p) for p in tried)}"
    )


def write_conf(directory: Path, name: str = CONF_NAME) -> Path:
    """Write ``directory/name`` (softhsm2.conf) with its own token directory; return the conf path.

    The token directory is ``directory/tokens`` (absolute, created mode 0700), the
    object store is the file backend (the only one in Debian's build) and logging
    is limited to errors.
    """
    directory = Path(directory).resolve()
    token_dir = directory / TOKEN_DIR_NAME
    token_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = directory / name
    conf.write_text(
        "# Written by hsmkeys.hsm.softhsm.write_conf\n"
        f"directories.tokendir = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n",
        encoding="utf-8",
    )
    return conf


def init_token(conf: Path, label: str, pin: str, so_pin: str) -> None:
    """Initialise a new token labelled ``label`` in the first free slot of ``conf``.

    Raises ConfigError if the label already exists in that token directory or the
    initialisation fails. A child Python process loads the module with this config and
    calls C_InitToken (SO PIN) and C_InitPIN (user PIN); the PINs reach it on stdin,
    never on a command line.
    """
    if not label or len(label.encode("utf-8")) > 32:
        raise ConfigError(f"token label must be 1-32 bytes, got {label!r}")
    if not pin or not so_pin:
        raise ConfigError("token PINs must not be empty")
    if token_exists(conf, label):
        raise ConfigError(f"a token labelled {label!r} already exists in {conf}")
    module = str(find_module())
    env = {**os.environ, "SOFTHSM2_CONF": str(Path(conf).resolve())}
    request = json.dumps({"label": label, "pin": pin, "so_pin": so_pin})
    try:
        done = subprocess.run(
            init_token_argv(module),
            input=request,
            env=env,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"token initialisation failed to run: {type(exc).__name__}") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        detail = message[-1] if message else ""
        for secret in (pin, so_pin):
            detail = detail.replace(secret, "***")
        raise ConfigError(f"token initialisation failed (exit {done.returncode}): {detail}")


def init_token_argv(module: str) -> list[str]:
    """The child's command line: the interpreter, this module's entry point and the module path.

    Nothing secret: the label and PINs go to the child's stdin.
    """
    return [sys.executable, "-c", _CHILD_ENTRY, module]


_CHILD_ENTRY = "from hsmkeys.hsm.softhsm import _init_token_child; _init_token_child()"


def _init_token_child() -> None:  # pragma: no cover - runs in the child process
    """Child side of :func:`init_token`: initialise the first uninitialised slot's token."""
    import ctypes

    import pkcs11
    from pkcs11 import TokenFlag

    module = sys.argv[1]
    request = json.loads(sys.stdin.read())
    label: str = request["label"]
    so_pin: bytes = request["so_pin"].encode("utf-8")
    lib = pkcs11.lib(module)
    free = [
        slot
        for slot in lib.get_slots(token_present=True)
        if not slot.get_token().flags & TokenFlag.TOKEN_INITIALIZED
    ]
    if not free:
        raise SystemExit("no free slot: every token is initialised")
    cdll = ctypes.CDLL(module)  # the same loaded library: python-pkcs11 has no C_InitToken
    init_token = cdll.C_InitToken
    init_token.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    init_token.restype = ctypes.c_ulong
    padded = label.encode("utf-8").ljust(32, b" ")
    rv = init_token(free[0].slot_id, so_pin, len(so_pin), padded)
    if rv != 0:
        raise SystemExit(f"C_InitToken failed: CKR 0x{rv:08x}")
    token = lib.get_token(token_label=label)
    session = token.open(rw=True, so_pin=request["so_pin"])
    try:
        session.init_pin(request["pin"])
    finally:
        session.close()


def token_exists(conf: Path, label: str) -> bool:
    """True if an initialised token labelled ``label`` exists under ``conf``."""
    out = _run_util(conf, ["--show-slots"], secrets=())
    for line in out.splitlines():
        name, sep, value = line.strip().partition(":")
        if sep and name == "Label" and value.strip() == label:
            return True
    return False


def _util_path() -> str:
    found = shutil.which(_UTIL)
    if found is None:
        raise ConfigError(
            f"{_UTIL} not found on PATH; install softhsm2 (apt-get install softhsm2)"
        )
    return found


def _run_util(conf: Path, args: list[str], *, secrets: tuple[str, ...]) -> str:
    conf = Path(conf).resolve()
    if not conf.is_file():
        raise ConfigError(f"SoftHSM2 config {conf} does not exist; call write_conf first")
    # Only the child sees this config: the caller's process keeps its own.
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    try:
        done = subprocess.run(
            [_util_path(), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{_UTIL} {args[0]} failed to run: {type(exc).__name__}") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        for secret in secrets:
            if secret:
                message = message.replace(secret, "***")
        raise ConfigError(f"{_UTIL} {args[0]} failed (exit {done.returncode}): {message}")
    return done.stdout
