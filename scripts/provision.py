#!/usr/bin/env python3
"""Create and update hsmkeys keys from a YAML file: ``provision.py plan|apply keys.yaml``.

Same code as ``hsmkeys provision``; see hsmkeys/provision/command.py and the README.
"""

from __future__ import annotations

import sys

from hsmkeys.provision.command import main

if __name__ == "__main__":
    sys.exit(main())
