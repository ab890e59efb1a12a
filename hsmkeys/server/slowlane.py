"""The slow lane: where a server process runs calls that keep the HSM busy for seconds.

RSA-4096 generation takes ~1.7 s (CreateKey, GenerateDataKeyPair, GetParametersForImport)
and maintenance can search or scan the token. Run on the event loop, they would stall
every other request of the process for as long. They run here instead: a thread of the
process with an HSM session of its own (:meth:`hsmkeys.hsm.base.Hsm.use_own_session`),
so the event loop keeps encrypting meanwhile. They still go through
:meth:`hsmkeys.keystore.KeyStore.invoke` (authorization, audit, HSM object before
catalog row) exactly as on the loop; the catalog, audit log and usage counters are
shared behind their locks.

One thread: slow calls queue behind each other (each already uses a core), never behind
fast ones. If the HSM module runs without OS locking the lane's calls share the
process's session and its lock, so they are off the loop but still serialised.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

__all__ = ["SlowLane"]

log = logging.getLogger("hsmkeys.server")

T = TypeVar("T")


class _SessionOwner(Protocol):
    def use_own_hsm_session(self) -> bool: ...


class SlowLane:
    """A one-thread executor whose thread has its own HSM session; :meth:`close` waits for it."""

    def __init__(self, keystore: _SessionOwner) -> None:
        self._keystore = keystore
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="hsmkeys-slow", initializer=self._enter
        )

    def _enter(self) -> None:
        if not self._keystore.use_own_hsm_session():
            log.warning("event=slow_lane_shares_hsm_session reason=module_without_os_locking")

    async def run(self, call: Callable[[], T]) -> T:
        """``call()`` in the lane's thread; its result or exception. A cancelled caller does
        not stop a call already running (it completes, and :meth:`close` waits for it)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        """Wait for the running and queued calls, then stop the thread. Idempotent."""
        self._executor.shutdown(wait=True)
