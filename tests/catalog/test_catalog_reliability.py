"""Encryption reservations, doctor sightings and request results, on every backend."""

from __future__ import annotations

from datetime import timedelta
from functools import partial

import pytest
from records import T0, OpenCatalog, add_key
from test_catalog_races import race

from hsmkeys.catalog.base import Catalog
from hsmkeys.errors import AlreadyExistsException, NotFoundException
from hsmkeys.models import KeyVersionRef


def test_reservations_never_pass_the_limit(catalog: Catalog) -> None:
    key = add_key(catalog)
    ref = KeyVersionRef(key.key_uuid, 1)
    assert catalog.reserve_encryptions(ref, 60, 100) == 60
    assert catalog.reserve_encryptions(ref, 60, 100) == 40
    assert catalog.reserve_encryptions(ref, 1, 100) == 0
    with pytest.raises(NotFoundException):
        catalog.reserve_encryptions(KeyVersionRef(key.key_uuid, 2), 1, 100)


def test_concurrent_reservations_on_two_catalogs_hand_out_each_block_once(open_catalog: OpenCatalog) -> None:
    a, b = open_catalog(), open_catalog()
    ref = KeyVersionRef(add_key(a).key_uuid, 1)

    def reserve(c: Catalog) -> int:
        return sum(c.reserve_encryptions(ref, 7, 100) for _ in range(10))

    granted = race(partial(reserve, a), partial(reserve, b))
    assert sum(granted) == 100  # type: ignore[arg-type]


def test_sightings_keep_the_first_time_and_forget_what_is_gone(catalog: Catalog) -> None:
    assert catalog.record_sightings(["a", "b"], T0) == {"a": T0, "b": T0}
    later = T0 + timedelta(hours=1)
    assert catalog.record_sightings(["b", "c"], later) == {"b": T0, "c": later}
    assert catalog.record_sightings(["a"], later) == {"a": later}


def test_a_request_is_remembered_once_and_recalled(catalog: Catalog) -> None:
    catalog.remember_request("p", "inv-1", "CreateKey", "key-1", T0)
    with pytest.raises(AlreadyExistsException):
        catalog.remember_request("p", "inv-1", "CreateKey", "key-2", T0)
    assert catalog.recall_request("p", "inv-1", "CreateKey") == "key-1"
    assert catalog.recall_request("p", "inv-1", "CreateAlias") is None
    catalog.remember_request("p", "inv-2", "CreateKey", "key-3", T0 + timedelta(days=2))  # drops day-old rows
    assert catalog.recall_request("p", "inv-1", "CreateKey") is None
