"""Pure aggregation maths on lists of Params. No state, no I/O: each function is testable by hand.

Every function computes in float64 and returns tensors in the dtype of the first update (integer tensors are
rounded), so a float32 model aggregated here loses nothing to summation order at the scale of 1e-6.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tessera.core.errors import ConfigError
from tessera.core.types import Params


def _check(updates: Sequence[Params]) -> None:
    if not updates:
        raise ValueError("cannot aggregate an empty list of updates")


def _cast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(like.dtype) if like.is_floating_point() else x.round().to(like.dtype)


def weighted_mean(updates: Sequence[Params], weights: Sequence[float]) -> Params:
    """sum_i w_i u_i / sum_i w_i, per tensor."""
    _check(updates)
    if len(weights) != len(updates):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    out: Params = {}
    for k, ref in updates[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for u, w in zip(updates, weights, strict=True):
            acc += u[k].double() * (float(w) / total)
        out[k] = _cast(acc, ref)
    return out


def _stacked(updates: Sequence[Params], key: str) -> torch.Tensor:
    return torch.stack([u[key].double() for u in updates])


def median(updates: Sequence[Params]) -> Params:
    """Coordinate-wise median; with an even count, the mean of the two middle values."""
    _check(updates)
    out: Params = {}
    for k, ref in updates[0].items():
        s = _stacked(updates, k).sort(dim=0).values
        n = s.shape[0]
        mid = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
        out[k] = _cast(mid, ref)
    return out


def trimmed_mean(updates: Sequence[Params], *, beta: float) -> Params:
    """Coordinate-wise mean after dropping the floor(beta * n) largest and smallest values."""
    _check(updates)
    if not 0 <= beta < 0.5:
        raise ConfigError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")
    n = len(updates)
    cut = int(beta * n)
    out: Params = {}
    for k, ref in updates[0].items():
        s = _stacked(updates, k).sort(dim=0).values
        out[k] = _cast(s[cut : n - cut].mean(dim=0), ref)
    return out


def _flat(u: Params) -> torch.Tensor:
    return torch.cat([t.double().reshape(-1) for t in u.values()])


def krum_scores(updates: Sequence[Params], *, f: int) -> list[float]:
    """Krum's score per update: the sum of squared distances to its n - f - 2 nearest neighbours."""
    n = len(updates)
    if n - f - 2 < 1:
        raise ConfigError(f"krum needs n - f - 2 >= 1 (n={n}, f={f}); sample more clients or lower f")
    flat = torch.stack([_flat(u) for u in updates])
    d = torch.cdist(flat, flat).pow(2)
    scores = []
    for i in range(n):
        others = torch.cat([d[i, :i], d[i, i + 1 :]]).sort().values
        scores.append(float(others[: n - f - 2].sum()))
    return scores


def krum_select(updates: Sequence[Params], *, f: int, m: int = 1) -> list[int]:
    """Indices of the m updates with the lowest Krum scores (ties broken by index)."""
    scores = krum_scores(updates, f=f)
    return sorted(range(len(updates)), key=lambda i: (scores[i], i))[:m]


def krum(updates: Sequence[Params], *, f: int, m: int = 1) -> Params:
    """Krum (m=1) or Multi-Krum (m>1): the plain mean of the m best-scored updates."""
    _check(updates)
    chosen = krum_select(updates, f=f, m=m)
    return weighted_mean([updates[i] for i in chosen], [1.0] * len(chosen))
