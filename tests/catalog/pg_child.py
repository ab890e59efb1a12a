"""A second process for the PostgreSQL tests (run as a script: ``python pg_child.py MODE ...``).

migrate DSN START  -- at wall-clock time START, open (and so migrate) the catalog; print
                      its schema version.
watch DSN UUID N   -- print "ready", then for round i in 0..N-1 wait until the key's
                      state is Disabled (even i) or Enabled (odd i), reading through the
                      cache, and print "i <time.monotonic() when seen>".
"""

from __future__ import annotations

import sys
import time
import uuid

from hsmkeys.catalog.postgres import PostgresCatalog
from hsmkeys.models import KeyState


def expected_state(round_number: int) -> KeyState:
    return KeyState.DISABLED if round_number % 2 == 0 else KeyState.ENABLED


def main(argv: list[str]) -> int:
    mode, dsn = argv[0], argv[1]
    if mode == "migrate":
        time.sleep(max(0.0, float(argv[2]) - time.time()))
        catalog = PostgresCatalog(dsn, pool_size=1)
        print(catalog.schema_version, flush=True)
        catalog.close()
        return 0
    if mode == "watch":
        key_uuid, rounds = uuid.UUID(argv[2]), int(argv[3])
        catalog = PostgresCatalog(dsn, pool_size=1)
        catalog.get_key(key_uuid)
        print("ready", flush=True)
        for i in range(rounds):
            want = expected_state(i)
            while (key := catalog.get_key(key_uuid)) is None or key.state is not want:
                time.sleep(0.0005)
            print(i, time.monotonic(), flush=True)
        catalog.close()
        return 0
    print(f"unknown mode {mode}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
