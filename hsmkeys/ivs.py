"""GCM IVs drawn from the HSM's RNG in batches: one C_GenerateRandom per ``batch`` encryptions.

IVs are not secret, only unique, so holding a few kilobytes of them in process memory
costs nothing in security and saves one HSM round trip per encryption. A forked child
must never reuse its parent's unspent IVs (two processes sealing with the same IV under
the same key would break GCM), so every pool is emptied in the child after a fork.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable

from hsmkeys.ciphertext import IV_LEN

DEFAULT_BATCH = 256

_pools: weakref.WeakSet[IvPool] = weakref.WeakSet()


class IvPool:
    def __init__(self, random: Callable[[int], bytes], *, batch: int = DEFAULT_BATCH) -> None:
        self._random = random
        self._size = IV_LEN * batch
        self._lock = threading.Lock()
        self._buffer = b""
        self._next = 0
        _pools.add(self)

    def take(self) -> bytes:
        """A fresh 12-byte IV that no other call (or process) gets."""
        with self._lock:
            start = self._next
            if start >= len(self._buffer):
                self._buffer = self._random(self._size)
                start = 0
            self._next = start + IV_LEN
            return self._buffer[start : start + IV_LEN]

    def discard(self) -> None:
        with self._lock:
            self._buffer = b""
            self._next = 0


def _discard_all_in_child() -> None:
    for pool in list(_pools):
        # The lock may have been held by another thread at fork time: replace it.
        pool._lock = threading.Lock()
        pool.discard()


os.register_at_fork(after_in_child=_discard_all_in_child)
