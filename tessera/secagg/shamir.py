"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

`split(secret, xs=..., threshold=t, rng=...)` gives one share per x coordinate; any t of them recover the secret
with `combine`, fewer reveal nothing about it. Coefficients come from `secrets` (the OS CSPRNG) unless a seeded
`random.Random` is passed for reproducible tests.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Mapping, Sequence
from typing import Protocol

PRIME = (1 << 521) - 1  # a Mersenne prime, larger than any 32-byte secret
SHARE_BYTES = 66  # ceil(521 / 8)


class RandBelow(Protocol):
    def randrange(self, stop: int, /) -> int: ...


class _System:
    def randrange(self, stop: int, /) -> int:
        return secrets.randbelow(stop)


def split(secret: bytes, *, xs: Sequence[int], threshold: int, rng: RandBelow | None = None) -> dict[int, bytes]:
    """Shares {x: y} of `secret` for each nonzero x in `xs`; any `threshold` of them reconstruct it."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the number of shares {len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share x coordinates must be distinct and nonzero")
    r = rng or _System()
    coeffs = [int.from_bytes(secret, "big")] + [r.randrange(PRIME) for _ in range(threshold - 1)]
    high_first = coeffs[::-1]
    out: dict[int, bytes] = {}
    for x in xs:
        y = 0
        for c in high_first:  # Horner, reduced once at the end: x is small, so y grows by log2(x) bits a step
            y = y * x + c
        out[x] = (y % PRIME).to_bytes(SHARE_BYTES, "big")
    return out


@functools.lru_cache(maxsize=64)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The Lagrange coefficients at 0 for the points `xs` (the same holders answer for most clients of a round,
    so the unmasking server computes them once)."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def combine(shares: Mapping[int, bytes], *, threshold: int, size: int = 32) -> bytes:
    """The secret from at least `threshold` shares {x: y} (Lagrange interpolation at 0)."""
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(shares)}")
    pts = sorted(shares.items())[:threshold]
    coeffs = _lagrange_at_zero(tuple(x for x, _ in pts))
    secret = sum(c * int.from_bytes(y, "big") for c, (_, y) in zip(coeffs, pts, strict=True)) % PRIME
    if secret >= 1 << (8 * size):
        raise ValueError("shares are inconsistent: the recovered value does not fit the secret size")
    return secret.to_bytes(size, "big")
