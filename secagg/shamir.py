"""Shamir secret sharing of raw 32-byte secrets over the prime field GF(2^521 - 1).

A 32-byte secret (an X25519 private key or a self-mask seed, all 256 bits kept) is read as
an integer below 2^256 < p = 2^521 - 1 (a Mersenne prime), hidden as the constant term of a
random polynomial of degree ``threshold - 1`` with coefficients from :mod:`secrets`, and
each holder receives the polynomial's value at its own nonzero x-coordinate. Any
``threshold`` shares determine the secret (Lagrange interpolation at 0); fewer reveal
nothing about it (Shamir 1979).

Work is batched across secrets: one call shares many secrets to the same holders, and
reconstruction computes the Lagrange coefficients of a holder set once and reuses them for
every secret reconstructed from that set (in the complete graph, all of a round's secrets).
Arithmetic is on Python integers; the x-coordinates are small, so Horner's rule runs
without reductions and reduces once per share.
"""

from __future__ import annotations

import secrets as _secrets
from functools import lru_cache
from typing import Mapping, Sequence

__all__ = ["PRIME", "SHARE_BYTES", "SECRET_BYTES", "split", "split_many", "combine", "combine_many"]

PRIME = (1 << 521) - 1
"""The field modulus, the Mersenne prime 2^521 - 1."""

SHARE_BYTES = 66
"""Bytes of one serialized share (big-endian field element)."""

SECRET_BYTES = 32
_MAX_X = 1 << 32


def _check_threshold_and_xs(threshold: int, xs: Sequence[int]) -> tuple[int, ...]:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"threshold must be an int >= 1, got {threshold!r}")
    xs = tuple(xs)
    for x in xs:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 < x < _MAX_X:
            raise ValueError(f"x-coordinates must be ints in [1, 2^32), got {x!r}")
    if len(set(xs)) != len(xs):
        raise ValueError(f"x-coordinates must be distinct, got {sorted(xs)}")
    if threshold > len(xs):
        raise ValueError(f"threshold={threshold} exceeds the number of holders {len(xs)}")
    return xs


def _secret_int(secret: bytes) -> int:
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets must be {SECRET_BYTES} bytes, got {secret!r:.20}")
    return int.from_bytes(secret, "big")


def split_many(secrets: Sequence[bytes], *, threshold: int, xs: Sequence[int]) -> list[list[bytes]]:
    """Share several 32-byte secrets to the same holders.

    Returns:
        ``shares[j][i]``: the share of ``secrets[i]`` for the holder at ``xs[j]``
        (``SHARE_BYTES`` bytes each).

    Raises:
        ValueError: a secret that is not 32 bytes, threshold outside [1, len(xs)], or
            x-coordinates that are not distinct ints in [1, 2^32).
    """
    xs = _check_threshold_and_xs(threshold, xs)
    values = [_secret_int(s) for s in secrets]
    polys = [[v] + [_secrets.randbelow(PRIME) for _ in range(threshold - 1)] for v in values]
    out: list[list[bytes]] = []
    for x in xs:
        row = []
        for poly in polys:
            acc = 0
            for coeff in reversed(poly):
                acc = acc * x + coeff
            row.append((acc % PRIME).to_bytes(SHARE_BYTES, "big"))
        out.append(row)
    return out


def split(secret: bytes, *, threshold: int, xs: Sequence[int]) -> list[bytes]:
    """Share one 32-byte secret; ``result[j]`` goes to the holder at ``xs[j]``."""
    return [row[0] for row in split_many([secret], threshold=threshold, xs=xs)]


@lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    coeffs = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        coeffs.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(coeffs)


def _share_int(share: bytes) -> int:
    if not isinstance(share, (bytes, bytearray)) or len(share) != SHARE_BYTES:
        raise ValueError(
            f"shares must be {SHARE_BYTES} bytes, got {len(share) if isinstance(share, (bytes, bytearray)) else share!r}"
        )
    value = int.from_bytes(share, "big")
    if value >= PRIME:
        raise ValueError("share is not a field element (>= 2^521 - 1)")
    return value


def combine_many(shares: Sequence[Mapping[int, bytes]], *, threshold: int) -> list[bytes]:
    """Reconstruct several secrets, each from exactly ``threshold`` shares keyed by x.

    Raises:
        ValueError: a mapping without exactly ``threshold`` shares, a malformed share, or
            an interpolated value of 256 bits or more (a corrupted share: no 32-byte secret
            has that value).
    """
    out = []
    for held in shares:
        if len(held) != threshold:
            raise ValueError(f"reconstruction takes exactly threshold={threshold} shares, got {len(held)}")
        xs = _check_threshold_and_xs(threshold, sorted(held))
        lam = _lagrange_at_zero(xs)
        value = sum(c * _share_int(held[x]) for c, x in zip(lam, xs)) % PRIME
        if value >> (8 * SECRET_BYTES):
            raise ValueError("shares interpolate to a value that is not a 32-byte secret (corrupted share)")
        out.append(value.to_bytes(SECRET_BYTES, "big"))
    return out


def combine(shares: Mapping[int, bytes], *, threshold: int) -> bytes:
    """Reconstruct one secret from exactly ``threshold`` shares keyed by x-coordinate."""
    return combine_many([shares], threshold=threshold)[0]
