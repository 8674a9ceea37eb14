"""Pure aggregation maths on lists of Params. No state, no I/O: each function is testable by hand.

Every function computes in float64 and returns tensors in the dtype of the first update (integer tensors are
rounded), so a float32 model aggregated here loses nothing to summation order at the scale of 1e-6.

Coordinate-wise rules (median, trimmed mean, Bulyan's second stage) stack the clients' values one column block
at a time (`_BLOCK` float64 values), so 100 clients of a 1M-parameter model need ~32 MB of scratch, not 800 MB.
All of them, and Krum's choice, are translation-equivariant: aggregating params or deltas (params - current)
gives the same result, so strategies pass client params directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from tessera.core.errors import ConfigError
from tessera.core.types import Params

_BLOCK = 1 << 22  # float64 values of scratch per block (32 MB)


def _check(updates: Sequence[Params]) -> None:
    if not updates:
        raise ValueError("cannot aggregate an empty list of updates")


def _cast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(like.dtype) if like.is_floating_point() else x.round().to(like.dtype)


def weighted_mean(updates: Sequence[Params], weights: Sequence[float], *, dtype: torch.dtype | None = None) -> Params:
    """sum_i w_i u_i / sum_i w_i, per tensor, accumulated in float64 and returned in each tensor's own dtype
    (or in `dtype` when given)."""
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
            acc.add_(u[k], alpha=float(w) / total)  # promotes to float64 inside the kernel, no temporaries
        out[k] = _cast(acc, ref) if dtype is None else acc.to(dtype)  # .to is a no-op for float64
    return out


def _blocks(updates: Sequence[Params], key: str) -> Iterator[tuple[slice, torch.Tensor]]:
    """(columns, n x c float64 stack of the clients' values in those columns) over one tensor, block by block."""
    numel = updates[0][key].numel()
    step = max(1, _BLOCK // len(updates))
    flats = [u[key].reshape(-1) for u in updates]
    for start in range(0, numel, step):
        cols = slice(start, min(numel, start + step))
        yield cols, torch.stack([f[cols].double() for f in flats])


def _coordinatewise(updates: Sequence[Params], rule: Callable[[torch.Tensor], torch.Tensor]) -> Params:
    """Apply `rule` (n x c float64 -> c) to every column of every tensor."""
    _check(updates)
    out: Params = {}
    for k, ref in updates[0].items():
        acc = torch.empty(ref.numel(), dtype=torch.float64)
        for cols, block in _blocks(updates, k):
            acc[cols] = rule(block)
        out[k] = _cast(acc.reshape(ref.shape), ref)
    return out


def _median_rule(s: torch.Tensor) -> torch.Tensor:
    s = s.sort(dim=0).values
    n = s.shape[0]
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def median(updates: Sequence[Params]) -> Params:
    """Coordinate-wise median; with an even count, the mean of the two middle values (Yin et al. 2018)."""
    return _coordinatewise(updates, _median_rule)


def trimmed_mean(updates: Sequence[Params], *, beta: float) -> Params:
    """Coordinate-wise mean after dropping the floor(beta * n) largest and smallest values (Yin et al. 2018)."""
    if not 0 <= beta < 0.5:
        raise ConfigError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")
    n = len(updates)
    cut = int(beta * n)
    return _coordinatewise(updates, lambda s: s.sort(dim=0).values[cut : n - cut].mean(dim=0))


def sq_distances(updates: Sequence[Params]) -> torch.Tensor:
    """n x n squared L2 distances between the flattened updates (float tensors only), in float64.

    Computed from a Gram matrix of column-centred blocks: centring (distances do not change under translation)
    keeps the |a|^2 + |b|^2 - 2ab cancellation small, and blocks keep memory bounded.
    """
    _check(updates)
    n = len(updates)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for k, ref in updates[0].items():
        if not ref.is_floating_point():
            continue
        for _, block in _blocks(updates, k):
            centred = block - block.mean(dim=0, keepdim=True)
            gram += centred @ centred.T
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp_(min=0.0).fill_diagonal_(0.0)


def _krum_scores(d: torch.Tensor, idx: Sequence[int], *, neighbours: int) -> list[float]:
    scores = []
    for i in idx:
        others = [d[i, j] for j in idx if j != i]
        scores.append(float(torch.stack(others).sort().values[:neighbours].sum()) if others else 0.0)
    return scores


def krum_scores(updates: Sequence[Params], *, f: int) -> list[float]:
    """Krum's score per update (Blanchard et al. 2017): the sum of squared distances to its n - f - 2 nearest
    neighbours."""
    n = len(updates)
    if f < 0 or n - f - 2 < 1:
        raise ConfigError(f"krum needs f >= 0 and n - f - 2 >= 1 (n={n}, f={f}); sample more clients or lower f")
    return _krum_scores(sq_distances(updates), range(n), neighbours=n - f - 2)


def krum_select(updates: Sequence[Params], *, f: int, m: int = 1) -> list[int]:
    """Indices of the m updates with the lowest Krum scores (ties broken by index)."""
    if not 1 <= m <= len(updates):
        raise ConfigError(f"multi-krum: m must be between 1 and the number of updates ({len(updates)}), got {m}")
    scores = krum_scores(updates, f=f)
    return sorted(range(len(updates)), key=lambda i: (scores[i], i))[:m]


def krum(updates: Sequence[Params], *, f: int, m: int = 1) -> Params:
    """Krum (m=1) or Multi-Krum (m>1): the plain mean of the m best-scored updates."""
    _check(updates)
    chosen = krum_select(updates, f=f, m=m)
    return weighted_mean([updates[i] for i in chosen], [1.0] * len(chosen))


def bulyan_select(updates: Sequence[Params], *, f: int) -> list[int]:
    """Bulyan's first stage: apply Krum recursively, n - 2f times, each time moving the winner out of the pool.

    The pool shrinks to 2f + 1, where Krum's n - f - 2 neighbours can reach 0; like Flower we then score with one
    neighbour (the nearest), which still prefers points inside the honest cluster.
    """
    n = len(updates)
    if f < 0 or n < 4 * f + 3:
        raise ConfigError(f"bulyan needs n >= 4f + 3 (n={n}, f={f}); sample more clients or lower f")
    d = sq_distances(updates)
    pool = list(range(n))
    chosen: list[int] = []
    while len(chosen) < n - 2 * f:
        scores = _krum_scores(d, pool, neighbours=max(1, len(pool) - f - 2))
        best = min(range(len(pool)), key=lambda i: (scores[i], pool[i]))
        chosen.append(pool.pop(best))
    return chosen


def closest_to_median_mean(updates: Sequence[Params], *, beta: int) -> Params:
    """Per coordinate, the mean of the `beta` values closest to the coordinate-wise median (Bulyan's stage 2)."""
    if not 1 <= beta <= len(updates):
        raise ConfigError(f"bulyan: beta must be between 1 and {len(updates)}, got {beta}")

    def rule(s: torch.Tensor) -> torch.Tensor:
        # a stable sort keeps client order among equal distances: the result is deterministic
        order = (s - _median_rule(s)).abs().sort(dim=0, stable=True).indices[:beta]
        return s.gather(0, order).mean(dim=0)

    return _coordinatewise(updates, rule)


def bulyan(updates: Sequence[Params], *, f: int) -> Params:
    """Bulyan (El Mhamdi et al. 2018): theta = n - 2f updates chosen by recursive Krum, then per coordinate the
    mean of the beta = theta - 2f values closest to their median."""
    _check(updates)
    chosen = [updates[i] for i in sorted(bulyan_select(updates, f=f))]
    return closest_to_median_mean(chosen, beta=len(chosen) - 2 * f)
