"""``python -m hsmkeys``: the same as the ``hsmkeys`` console script."""

from hsmkeys.cli import main

raise SystemExit(main())
