"""The AES-GCM invocation limit: how many encryptions one key version may still do here.

NIST SP 800-38D §8.3: with random 96-bit IVs a key may perform at most 2^32
encryptions (the IV collision bound). hsmkeys retires a version from encryption at
:data:`RETIRE_AT` = 2^31 (half the bound: margin for blocks wasted by crashes and for
several processes) and makes a new version current (see ``KeyStore._seal``).

Counting must cost nothing per call, so each process reserves encryptions from the
catalog in blocks (:data:`DEFAULT_BLOCK` at a time, one short write transaction) and
spends them with a local decrement. A reservation is never returned: a crash or an exit
wastes the rest of a block, and no encryption is ever counted twice or not at all. A
forked child starts with no reservation (its parent's are the parent's to spend).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable

from hsmkeys.models import KeyVersionRef

__all__ = ["DEFAULT_BLOCK", "GCM_IV_BOUND", "RETIRE_AT", "EncryptionBudget"]

GCM_IV_BOUND = 1 << 32
RETIRE_AT = 1 << 31
DEFAULT_BLOCK = 65536

_budgets: weakref.WeakSet[EncryptionBudget] = weakref.WeakSet()


class EncryptionBudget:
    """Per-process counters of reserved, unspent encryptions per key version.

    ``reserve(ref, count, limit)`` is the catalog's :meth:`reserve_encryptions`.
    """

    def __init__(
        self,
        reserve: Callable[[KeyVersionRef, int, int], int],
        *,
        limit: int = RETIRE_AT,
        block: int = DEFAULT_BLOCK,
    ) -> None:
        if not 0 < limit <= GCM_IV_BOUND or block < 1:
            raise ValueError(f"limit must be in 1..2^32 and block >= 1, got {limit}, {block}")
        self.limit = limit
        self.block = block
        self._reserve = reserve
        self._left: dict[KeyVersionRef, int] = {}
        self._lock = threading.Lock()
        _budgets.add(self)

    def take(self, ref: KeyVersionRef) -> bool:
        """Spend one encryption of ``ref``; False when the version has no more to give."""
        with self._lock:
            left = self._left.get(ref, 0)
            if left > 0:
                self._left[ref] = left - 1
                return True
        granted = self._reserve(ref, self.block, self.limit)
        if granted <= 0:
            return False
        with self._lock:
            self._left[ref] = self._left.get(ref, 0) + granted - 1
            if len(self._left) > 65536:  # versions not used lately: their rest is wasted, never reused
                for stale in [r for r, n in self._left.items() if n == 0]:
                    del self._left[stale]
        return True

    def forget(self) -> None:
        with self._lock:
            self._left.clear()


def _forget_all_in_child() -> None:
    for budget in list(_budgets):
        budget._lock = threading.Lock()  # it may have been held at fork time
        budget.forget()


os.register_at_fork(after_in_child=_forget_all_in_child)
