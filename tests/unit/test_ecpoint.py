"""EC public-key recovery (hsmkeys.hsm.ecpoint) against pyca/cryptography keys."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from hsmkeys.hsm.ecpoint import curve_for, even_point, recover_from_signature

CURVES = [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1(), ec.SECP256K1()]


@pytest.mark.parametrize("curve", CURVES, ids=lambda c: c.name)
def test_two_signatures_recover_exactly_the_public_point(curve: ec.EllipticCurve) -> None:
    private = ec.generate_private_key(curve)
    numbers = private.public_key().public_numbers()
    params = curve_for(curve)
    candidates = None
    for _ in range(2):
        digest = hashlib.sha256(os.urandom(16)).digest()
        r, s = decode_dss_signature(private.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
        found = recover_from_signature(params, digest, r, s)
        candidates = found if candidates is None else candidates & found
    assert candidates == {(numbers.x, numbers.y)}


@pytest.mark.parametrize("curve", CURVES, ids=lambda c: c.name)
def test_x_only_recovery_gives_a_point_with_the_same_ecdh_results(curve: ec.EllipticCurve) -> None:
    private = ec.generate_private_key(curve)
    numbers = private.public_key().public_numbers()
    point = even_point(curve_for(curve), numbers.x)
    assert point is not None and point[0] == numbers.x
    recovered = ec.EllipticCurvePublicNumbers(point[0], point[1], curve).public_key()
    peer = ec.generate_private_key(curve)
    assert peer.exchange(ec.ECDH(), recovered) == peer.exchange(ec.ECDH(), private.public_key())


def test_a_signature_out_of_range_recovers_nothing() -> None:
    params = curve_for(ec.SECP256R1())
    assert recover_from_signature(params, b"\x00" * 32, 0, 1) == set()
    assert recover_from_signature(params, b"\x00" * 32, 1, params.n) == set()
