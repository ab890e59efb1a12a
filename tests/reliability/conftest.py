"""Reliability harnesses: crash safety, concurrency, hostile input, secrets hygiene.

Fast variants run in ``make test``; tests marked ``soak`` run only in ``make soak``
(HSMKEYS_SOAK=1 raises their counts and durations, see harness.soak_number)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hsmkeys.testing.server import EphemeralKms, start_ephemeral_kms


@pytest.fixture(scope="module")
def kms() -> Iterator[EphemeralKms]:
    with start_ephemeral_kms() as server:
        yield server
