"""Public-key arithmetic on the short-Weierstrass curves KMS offers, for one job:
recovering the public half of an EC private key that exists only inside the HSM.

Some HSMs (SoftHSM2 among them) keep no public point with an unwrapped EC private key
and cannot compute one. The point is then recovered from what the HSM does with the
private key, which never leaves it:

* a SIGN_VERIFY key signs two random digests in the HSM; ECDSA public-key recovery
  gives at most four candidates per signature, and exactly one point is a candidate
  for both (the standard "recovery id" technique, SEC 1 v2 §4.1.6);
* a KEY_AGREEMENT key derives ECDH with the base point G, giving x(d·G) = x(Q); the
  y of either sign gives identical ECDH results with every peer, so the even one is
  chosen (documented: GetPublicKey of such an imported key may be -Q).

Everything here is public data (points, signatures). Curve constants are checked
against pyca/cryptography at first use (G from the scalar 1, 2·G from the scalar 2,
the group order), so a wrong constant fails loudly instead of recovering garbage.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

Point = tuple[int, int] | None  # None is the point at infinity

_PRIMES: dict[str, tuple[int, int]] = {  # curve name -> (field prime p, coefficient a)
    "secp256r1": (2**256 - 2**224 + 2**192 + 2**96 - 1, -3),
    "secp384r1": (2**384 - 2**128 - 2**96 + 2**32 - 1, -3),
    "secp521r1": (2**521 - 1, -3),
    "secp256k1": (2**256 - 2**32 - 977, 0),
}


@dataclass(frozen=True, slots=True)
class Curve:
    name: str
    p: int
    a: int
    b: int
    n: int
    g: tuple[int, int]

    def on_curve(self, point: tuple[int, int]) -> bool:
        x, y = point
        return (y * y - (x * x * x + self.a * x + self.b)) % self.p == 0

    def add(self, p1: Point, p2: Point) -> Point:
        if p1 is None:
            return p2
        if p2 is None:
            return p1
        (x1, y1), (x2, y2) = p1, p2
        p = self.p
        if x1 == x2:
            if (y1 + y2) % p == 0:
                return None
            slope = (3 * x1 * x1 + self.a) * pow(2 * y1, -1, p) % p
        else:
            slope = (y2 - y1) * pow(x2 - x1, -1, p) % p
        x3 = (slope * slope - x1 - x2) % p
        return x3, (slope * (x1 - x3) - y1) % p

    def mul(self, k: int, point: Point) -> Point:
        result: Point = None
        addend = point
        k %= self.n
        while k:
            if k & 1:
                result = self.add(result, addend)
            addend = self.add(addend, addend)
            k >>= 1
        return result

    def lift_x(self, x: int) -> list[tuple[int, int]]:
        """Both points with abscissa ``x`` (none if x is not on the curve). Every curve
        here has p ≡ 3 (mod 4), so a square root is one exponentiation."""
        p = self.p
        rhs = (x * x * x + self.a * x + self.b) % p
        y = pow(rhs, (p + 1) // 4, p)
        if y * y % p != rhs:
            return []
        return [(x, y), (x, p - y)] if y else [(x, 0)]


@functools.cache
def curve_for(curve: ec.EllipticCurve) -> Curve:
    p, a = _PRIMES[curve.name]
    g = ec.derive_private_key(1, curve).public_key().public_numbers()
    b = (g.y * g.y - (g.x**3 + a * g.x)) % p
    found = Curve(curve.name, p, a, b, curve.group_order, (g.x, g.y))
    two = ec.derive_private_key(2, curve).public_key().public_numbers()
    if found.add(found.g, found.g) != (two.x, two.y) or found.mul(found.n - 1, found.g) != (g.x, p - g.y):
        raise AssertionError(f"curve constants for {curve.name} do not match pyca/cryptography")
    return found


def recover_from_signature(curve: Curve, digest: bytes, r: int, s: int) -> set[tuple[int, int]]:
    """Every public point for which (r, s) is a valid ECDSA signature of ``digest``."""
    n = curve.n
    if not (0 < r < n and 0 < s < n):
        return set()
    z = int.from_bytes(digest, "big")
    excess = len(digest) * 8 - n.bit_length()
    if excess > 0:
        z >>= excess
    r_inv = pow(r, -1, n)
    found: set[tuple[int, int]] = set()
    for j in range(2):  # x = r + j·n while it stays inside the field
        x = r + j * n
        if x >= curve.p:
            break
        for point in curve.lift_x(x):
            q = curve.mul(r_inv, curve.add(curve.mul(s, point), curve.mul(-z % n, curve.g)))
            if q is not None:
                found.add(q)
    return found


def public_key(curve: ec.EllipticCurve, point: tuple[int, int]) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicNumbers(point[0], point[1], curve).public_key()


def even_point(curve: Curve, x: int) -> tuple[int, int] | None:
    """The point with abscissa ``x`` and even y (the choice for x-only recoveries)."""
    points = curve.lift_x(x)
    return next((pt for pt in points if pt[1] % 2 == 0), None)
