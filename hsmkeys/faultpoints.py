"""Named fault points between an effect and its bookkeeping, for crash and retry tests.

Production code calls :func:`reached` at a few places where a crash matters (after the
HSM write and before the catalog commit, after the commit and before the answer). With
nothing armed it costs one dict truthiness check. Points are armed by the
``HSMKEYS_FAULT_POINTS`` environment variable, read once at import (so a child process
can be told to die at a point), or by :func:`arm` in-process::

    HSMKEYS_FAULT_POINTS="create_key.hsm_done=kill"
    HSMKEYS_FAULT_POINTS="create_key.committed=raise:1,rotate.hsm_done=kill"

Actions: ``kill`` (SIGKILL this process: no cleanup, no flush), ``raise`` (a RuntimeError,
every time) and ``raise:N`` (only the first N times, then the point is disarmed).

Points (see :data:`POINTS`) are named ``<operation>.<stage>``: ``hsm_done`` = the HSM
object exists, its catalog row does not; ``committed`` = the catalog change is durable
and the caller has not been answered.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["ENV_VAR", "POINTS", "FaultPointError", "arm", "disarm_all", "reached"]

ENV_VAR = "HSMKEYS_FAULT_POINTS"

POINTS = frozenset(
    {
        "create_key.hsm_done",
        "create_key.committed",
        "rotate.hsm_done",
        "rotate.committed",
        "schedule_key_deletion.committed",
        "create_grant.committed",
        "purge.marked",
        "purge.objects_destroyed",
        "import.hsm_done",
        "import.committed",
        "doctor.before_destroy",
    }
)


class FaultPointError(RuntimeError):
    """Raised by a point armed with ``raise``: an unexpected fault, as a bug would be."""


_armed: dict[str, list[int | None]] = {}  # name -> [remaining raises] (None: always / kill)
_actions: dict[str, str] = {}
_lock = threading.Lock()


def arm(name: str, action: str) -> None:
    """Arm ``name`` with ``kill``, ``raise`` or ``raise:N``. ValueError for anything else."""
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}; known: {', '.join(sorted(POINTS))}")
    kind, _, count = action.partition(":")
    if kind not in ("kill", "raise") or (count and (kind != "raise" or not count.isdigit())):
        raise ValueError(f"fault point action must be kill, raise or raise:N, not {action!r}")
    with _lock:
        _actions[name] = kind
        _armed[name] = [int(count) if count else None]


def disarm_all() -> None:
    with _lock:
        _armed.clear()
        _actions.clear()


def reached(name: str) -> None:
    """Called by production code at point ``name``; does nothing unless it is armed."""
    if not _armed:
        return
    with _lock:
        remaining = _armed.get(name)
        if remaining is None:
            return
        kind = _actions[name]
        if kind == "raise" and remaining[0] is not None:
            remaining[0] -= 1
            if remaining[0] <= 0:
                del _armed[name]
                del _actions[name]
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise FaultPointError(f"fault point {name} reached")


def _arm_from_env() -> None:
    spec = os.environ.get(ENV_VAR, "").strip()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        arm(name.strip(), action.strip() or "kill")


_arm_from_env()
