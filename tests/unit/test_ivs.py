"""IV pool: HSM randomness fetched in batches, every IV handed out once, never shared with a forked child."""

from __future__ import annotations

import os

from hsmkeys.ivs import IvPool


class CountingRandom:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, n: int) -> bytes:
        self.calls.append(n)
        return os.urandom(n)


def test_ivs_are_twelve_bytes_distinct_and_fetched_once_per_batch() -> None:
    source = CountingRandom()
    pool = IvPool(source, batch=8)
    ivs = [pool.take() for _ in range(20)]
    assert all(len(iv) == 12 for iv in ivs)
    assert len(set(ivs)) == 20
    assert source.calls == [96, 96, 96]


def test_ivs_are_the_hsm_bytes_in_order() -> None:
    stream = bytes(range(48))
    pool = IvPool(lambda n: stream[:n], batch=4)
    assert b"".join(pool.take() for _ in range(4)) == stream


def test_forked_child_never_reuses_the_parents_unspent_ivs() -> None:
    pool = IvPool(CountingRandom(), batch=64)
    pool.take()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its next IV and leave at once
        os.write(write_end, pool.take())
        os._exit(0)
    os.close(write_end)
    child_iv = os.read(read_end, 12)
    os.close(read_end)
    os.waitpid(pid, 0)
    parent_rest = {pool.take() for _ in range(63)}
    assert len(child_iv) == 12
    assert child_iv not in parent_rest
