"""A maintenance-lease holder in a process of its own (run as a script), for the tests
that freeze (SIGSTOP) or kill (SIGKILL) a holder: ``python lease_child.py DSN HOLDER SECONDS``.

Takes or renews the lease every SECONDS / 10 and prints ``held`` or ``lost`` (flushed)
each time that changes.
"""

from __future__ import annotations

import sys
import time

from hsmkeys.catalog.postgres import PostgresCatalog


def main(argv: list[str]) -> int:
    dsn, holder, seconds = argv[0], argv[1], float(argv[2])
    catalog = PostgresCatalog(dsn, pool_size=1)
    held: bool | None = None
    while True:
        now_held = catalog.take_maintenance_lease(holder, seconds)
        if now_held != held:
            print("held" if now_held else "lost", flush=True)
            held = now_held
        time.sleep(seconds / 10)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
