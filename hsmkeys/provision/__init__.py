"""Provision keys from a YAML file, with plan/apply like Terraform.

    keys:
      - alias: alias/payments
        description: Payments master key
        rotation: {enabled: true, period_days: 180}
        tags: {team: payments}

``load_file`` validates the whole file (every problem with file:line, entry, field);
``read_state`` reads what it manages through a :class:`~hsmkeys.kmsclient.KmsApi`;
``build_plan`` diffs (no I/O); ``apply_plan`` makes exactly the planned changes.
``hsmkeys.provision.command`` is the command line (``scripts/provision.py``,
``hsmkeys provision``). Every key provision creates is tagged
``hsmkeys:provision-alias=<alias>`` so that a run interrupted before its alias was
created adopts that key on the next run instead of creating a second one.
"""

from __future__ import annotations

from hsmkeys.provision.apply import apply_plan
from hsmkeys.provision.plan import Action, Change, Plan, build_plan
from hsmkeys.provision.schema import (
    PROVISION_TAG,
    DesiredFile,
    KeyEntry,
    ProvisionError,
    load_file,
    parse_text,
)
from hsmkeys.provision.state import CurrentState, read_state

__all__ = [
    "PROVISION_TAG",
    "Action",
    "Change",
    "CurrentState",
    "DesiredFile",
    "KeyEntry",
    "Plan",
    "ProvisionError",
    "apply_plan",
    "build_plan",
    "load_file",
    "parse_text",
    "read_state",
]
