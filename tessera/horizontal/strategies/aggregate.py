"""Pure aggregation maths on lists of Params. No state, no I/O: each function is testable by hand.

Every function computes in float64 and returns tensors in the dtype of the first update (integer tensors are
rounded), so a float32 model aggregated here loses nothing to summation order at the scale of 1e-6.

Coordinate-wise rules (median, trimmed mean, Bulyan's second stage) stack the clients' values one block of
coordinates at a time, so 100 clients of a 1M-parameter model never need an 800 MB stack. They find order
statistics in the input's own dtype (float16/bfloat16 widened to float32, which is exact) with numpy's vectorised
sort, 10-30x faster than a torch sort or kthvalue across clients, then do their float64 arithmetic in the order
the plain sort-based definition does: results are bit-identical to it (tests/horizontal/test_aggregate_select.py
holds that reference). Krum's distances come from one float64 Gram matrix accumulated block by block.
All of them, and Krum's choice, are translation-equivariant: aggregating params or deltas (params - current)
gives the same result, so strategies pass client params directly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from scipy.linalg.blas import dsyrk
from threadpoolctl import threadpool_limits

from tessera.core.errors import ConfigError
from tessera.core.types import Params

_BLOCK = 1 << 22  # float64 values of scratch per block of a client stack (32 MB)
_WIDEN = {torch.float16: torch.float32, torch.bfloat16: torch.float32}  # numpy has no bfloat16; widening is exact


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


Source = np.ndarray | torch.Tensor


def _source(t: torch.Tensor, dtype: torch.dtype | None) -> Source:
    """One client's values of a tensor, flat, to be read a block at a time: a numpy view of its own memory where
    that needs no conversion (a contiguous CPU tensor already in `dtype`; `dtype` None: any dtype numpy holds
    exactly), else the flat tensor, converted block by block (`_slices`) so memory stays bounded.

    The view is what makes a block cheap: slicing numpy costs a fraction of slicing, converting and wrapping a
    tensor, and a block reads 100 clients' slices (at 100 x 1M: 0.06 s instead of 0.084 s to stack them all)."""
    flat = t.detach().reshape(-1)
    want = dtype if dtype is not None else _WIDEN.get(flat.dtype, flat.dtype)
    if flat.device.type == "cpu" and flat.dtype == want and flat.is_contiguous() and not flat.is_conj():
        return flat.numpy()
    return flat


def _slices(sources: Sequence[Source], start: int, stop: int, dtype: torch.dtype | None = None) -> list[np.ndarray]:
    """Every client's values start..stop as numpy arrays (views where `_source` made one, else converted:
    float16/bfloat16 widened to float32, or to `dtype`)."""
    return [s[start:stop] if isinstance(s, np.ndarray)
            else s[start:stop].to("cpu", dtype or _WIDEN.get(s.dtype, s.dtype)).numpy() for s in sources]


def _blocks(updates: Sequence[Params], key: str) -> Iterator[torch.Tensor]:
    """The n x c float64 CPU stack of the clients' values in one block of columns after another, over one tensor.

    Each block is written into the same scratch buffer (overwritten by the next one) of `_BLOCK // 4` values:
    8 MB, large enough for an efficient matrix product, small enough to stay near the cache."""
    numel = updates[0][key].numel()
    step = max(1, (_BLOCK // 4) // len(updates))
    sources = [_source(u[key], None) for u in updates]
    scratch = torch.empty(len(updates), min(step, numel), dtype=torch.float64)
    for start in range(0, numel, step):
        block = scratch[:, : min(numel, start + step) - start]
        # one numpy call converts every client's slice to float64 (exactly) into the scratch
        np.stack(_slices(sources, start, start + block.shape[1]), out=block.numpy())
        yield block


def _coordinatewise(updates: Sequence[Params], rule: Callable[[np.ndarray], torch.Tensor]) -> Params:
    """Apply `rule` to every coordinate of every tensor, a block of coordinates at a time.

    `rule` gets a c x n array (one row per coordinate, clients along the contiguous axis, where numpy's
    vectorised sort and selection run) in the values' own dtype (float16/bfloat16 widened to float32; float64
    if the clients' dtypes differ): conversions that are exact and keep the order. The array is scratch that the
    rule may overwrite (the next block reuses it); it returns c float64 values. Blocks of `_BLOCK // 8` values
    keep each block and its transpose in cache, and reusing the two buffers spares a fresh allocation per block."""
    _check(updates)
    n = len(updates)
    step = max(1, (_BLOCK // 8) // n)
    out: Params = {}
    for k, ref in updates[0].items():
        dtype = _WIDEN.get(ref.dtype, ref.dtype) if len({u[k].dtype for u in updates}) == 1 else torch.float64
        sources = [_source(u[k], dtype) for u in updates]
        numel = ref.numel()
        by_client = torch.empty(n, min(step, numel), dtype=dtype).numpy()  # n x c
        by_coord = np.empty((min(step, numel), n), dtype=by_client.dtype)  # c x n
        acc = torch.empty(numel, dtype=torch.float64)
        for start in range(0, numel, step):
            cols = slice(start, min(numel, start + step))
            stacked = by_client[:, : cols.stop - start]
            np.stack(_slices(sources, start, cols.stop, dtype), out=stacked)
            block = by_coord[: cols.stop - start]
            block[...] = stacked.T
            acc[cols] = rule(block)
        out[k] = _cast(acc.reshape(ref.shape), ref)
    return out


def _median_rule(a: np.ndarray) -> torch.Tensor:
    """Per row, the middle value (odd n) or the float64 mean of the two middle values (even n). Sorts `a` in place.

    numpy 2 sorts short rows with SIMD sorting networks (x86-simd-sort, Highway on ARM): for 100 float32 values per
    coordinate that measured faster than its own selection (np.partition: 0.11 s vs 0.08 s per million rows, and
    torch.kthvalue 1.3 s), so the middle is read off the sorted rows. Ties cannot change a sorted value."""
    n, k = a.shape[1], a.shape[1] // 2
    a.sort(axis=1)
    s = torch.from_numpy(a)
    return s[:, k].double() if n % 2 else 0.5 * (s[:, k - 1].double() + s[:, k].double())


def median(updates: Sequence[Params]) -> Params:
    """Coordinate-wise median; with an even count, the mean of the two middle values (Yin et al. 2018)."""
    return _coordinatewise(updates, _median_rule)


def trimmed_mean(updates: Sequence[Params], *, beta: float) -> Params:
    """Coordinate-wise mean after dropping the floor(beta * n) largest and smallest values (Yin et al. 2018)."""
    if not 0 <= beta < 0.5:
        raise ConfigError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")
    n = len(updates)
    cut = int(beta * n)

    def rule(a: np.ndarray) -> torch.Tensor:
        # numpy's vectorised sort costs what a two-sided selection does here, and it keeps the kept values in
        # ascending order: laid out kept x c as in the definition, the float64 mean runs in the same order.
        a.sort(axis=1)
        kept = torch.from_numpy(a[:, cut : n - cut]).T
        return torch.empty(kept.shape, dtype=torch.float64).copy_(kept).mean(dim=0)

    return _coordinatewise(updates, rule)


def sq_distances(updates: Sequence[Params]) -> torch.Tensor:
    """n x n squared L2 distances between the flattened updates (float tensors only), in float64.

    Computed from a Gram matrix of column-centred blocks: centring (distances do not change under translation)
    keeps the |a|^2 + |b|^2 - 2ab cancellation small, and blocks keep memory bounded. The Gram matrix is one
    symmetric rank-k update per block (BLAS dsyrk, lower triangle only: half a full product's multiply-adds; at
    100 x 1M it took 0.24 s where 4 strips of GEMM took 0.30 s and the full product 0.38 s, one thread), on as
    many BLAS threads as torch uses.
    """
    _check(updates)
    n = len(updates)
    gram = np.zeros((n, n), order="F")  # dsyrk accumulates into a Fortran-ordered matrix in place
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        for k, ref in updates[0].items():
            if not ref.is_floating_point():
                continue
            for block in _blocks(updates, k):
                block.sub_(block.mean(dim=0, keepdim=True))
                # block is n x c row-major, so block.T is c x n column-major: trans=1 gives block @ block.T
                gram = dsyrk(1.0, block.numpy().T, beta=1.0, c=gram, trans=1, lower=1, overwrite_c=1)
    lower = torch.from_numpy(np.tril(gram))
    full = lower + lower.tril(-1).T  # exactly symmetric
    sq = full.diagonal()
    return (sq[:, None] + sq[None, :] - 2 * full).clamp_(min=0.0).fill_diagonal_(0.0)


def _krum_scores(d: torch.Tensor, idx: Sequence[int], *, neighbours: int) -> list[float]:
    """Per i in idx, the sum of its `neighbours` smallest distances to the other members of idx (all rows at once:
    the update itself is excluded by an infinite distance on the diagonal)."""
    pool = torch.as_tensor(list(idx), dtype=torch.long)
    if len(pool) < 2:
        return [0.0] * len(pool)
    sub = d[pool][:, pool].fill_diagonal_(torch.inf)
    k = min(neighbours, len(pool) - 1)
    return sub.sort(dim=1).values[:, :k].sum(dim=1).tolist()


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


def _sorted_middle(a: np.ndarray, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a c x n float32 array, the values and client indices at sorted positions `cols` (ascending
    values, equal values by client index, -0.0 before +0.0), each laid out positions x c.

    One SIMD sort of uint64 keys: the high half is the value's bits made order-preserving (flip the sign bit of
    a positive value, every bit of a negative one), the low half the client index."""
    c, n = a.shape
    lo, hi = (0, 1) if sys.byteorder == "little" else (1, 0)
    keys = np.empty((c, n), dtype=np.uint64)
    halves = keys.view(np.uint32).reshape(c, n, 2)
    halves[:, :, lo] = np.arange(n, dtype=np.uint32)
    flip = (a.view(np.int32) >> 31).view(np.uint32)  # all ones for negative values, else zero
    flip |= np.uint32(0x80000000)
    np.bitwise_xor(a.view(np.uint32), flip, out=halves[:, :, hi])
    keys.sort(axis=1)
    mid = np.ascontiguousarray(keys[:, cols].T).view(np.uint32).reshape(-1, c, 2)
    bits = mid[:, :, hi]
    unflip = ((bits >> 31) - np.uint32(1)) | np.uint32(0x80000000)  # the same flip, read off the key
    return (bits ^ unflip).view(np.float32), mid[:, :, lo]


def _closest_rule(a: np.ndarray, beta: int) -> torch.Tensor:
    """Per row, the float64 mean of the `beta` values closest to the median, summed in order of (distance, client
    index): what a stable sort of the distances in client order gives, without sorting every distance.

    Along the sorted values the distance to the median falls then rises, so the beta closest are a merge of the
    values below the median (outward) and those above it, by (distance, client index), and lie among the 2 beta
    sorted values around the middle. Rows where that shortcut could be wrong (equal distances on one side, or the
    value just outside those 2 beta as close as the beta-th: heavy ties) take the general search, as do dtypes
    other than float32 and large beta (where the general search's window is the cheaper way)."""
    c, n = a.shape
    if a.dtype != np.float32 or beta > 16:
        return _closest_general(a, beta)
    k = n // 2
    lo, hi = max(0, k - beta), min(n, k + beta)
    glo, ghi = max(0, lo - 1), min(n, hi + 1)  # one guard position on each side where there is one
    g = ghi - glo
    vals, who = _sorted_middle(a, slice(glo, ghi))
    v = np.empty((g + 1, c))  # rows: sorted positions glo..ghi-1, then one row of +inf distance ending both sides
    v[:g] = vals
    mid = v[k - glo] if n % 2 else 0.5 * (v[k - 1 - glo] + v[k - glo])
    dist = np.empty_like(v)
    np.abs(np.subtract(v[:g], mid, out=dist[:g]), out=dist[:g])
    dist[g] = np.inf
    split = (k + 1 if n % 2 else k) - glo  # first row above the median; rows below it are read outward
    ok = (dist[: split - 1] > dist[1:split]).all(axis=0)  # no equal distances within a side
    ok &= (dist[split + 1 : g] > dist[split : g - 1]).all(axis=0)
    flat_d, flat_v, flat_w = dist.ravel(), v.ravel(), who.ravel()
    cols = np.arange(c)
    nl, nr = np.zeros(c, dtype=np.intp), np.zeros(c, dtype=np.intp)  # values taken from below and from above
    picked = np.empty((beta, c))
    for step in range(beta):
        il = ((split - 1 - nl) % (g + 1)) * c + cols  # past the lowest row: the +inf row
        ir = (split + nr) * c + cols
        x, y = flat_d.take(il), flat_d.take(ir)
        left = x < y
        tie = x == y
        if tie.any():
            left |= tie & (flat_w.take(il, mode="clip") < flat_w.take(ir, mode="clip"))
        np.copyto(picked[step], flat_v.take(ir))
        np.copyto(picked[step], flat_v.take(il), where=left)
        nl += left
        nr += ~left
    far = np.where(left, x, y)  # the beta-th distance, D
    if glo < lo:  # the value below the 2 beta (row 0) must be strictly farther than D, and never taken itself
        ok &= (nl < split) & (dist[0] > far)
    if ghi > hi:  # likewise the one above them (row g - 1)
        ok &= (nr < g - split) & (dist[g - 1] > far)
    out = torch.from_numpy(picked).mean(dim=0)  # beta x c, as the definition lays it out
    if not ok.all():
        out[torch.from_numpy(~ok)] = _closest_general(np.ascontiguousarray(a[~ok]), beta)
    return out


def _closest_general(a: np.ndarray, beta: int) -> torch.Tensor:
    """Per row, the float64 mean of the `beta` values closest to the median, summed in order of (distance, client
    index): what a stable sort of the distances in client order gives, without sorting every distance.

    On sorted values the distances to the median fall then rise, so the beta closest lie in a window found by a
    binary search (move right while the value leaving is farther than the one entering). The values as far as
    the farthest of them, D, form one interval; only those few are sorted by (distance, client index)."""
    c, n = a.shape
    if n <= 24 or c * n <= 1 << 14:  # few values: one stable sort of the distances in client order is cheaper
        t = torch.from_numpy(a).double()
        order = (t - _median_rule(a.copy())[:, None]).abs().sort(dim=1, stable=True).indices[:, :beta]
        return t.gather(1, order).T.contiguous().mean(dim=0)
    who = torch.from_numpy(np.argsort(a, axis=1))  # client index of each sorted value (equal values in any order)
    s = torch.from_numpy(np.take_along_axis(a, who.numpy(), axis=1)).double()
    k = n // 2
    d = (s - (s[:, k] if n % 2 else 0.5 * (s[:, k - 1] + s[:, k]))[:, None]).abs()
    lo, hi = torch.zeros(c, dtype=torch.long), torch.full((c,), n - beta, dtype=torch.long)
    for _ in range(max(1, n - beta).bit_length()):
        mid = (lo + hi) // 2
        right = (d.gather(1, mid[:, None]) > d.gather(1, (mid + beta).clamp(max=n - 1)[:, None]))[:, 0] & (lo < hi)
        lo, hi = torch.where(right, mid + 1, lo), torch.where(right | (lo >= hi), hi, mid)
    far = d.gather(1, lo[:, None] + torch.arange(beta)).amax(dim=1, keepdim=True)  # the beta-th distance, D
    near = d <= far  # one interval of sorted positions: the window and any value tied with it at distance D
    width = near.sum(dim=1, keepdim=True)
    span = torch.arange(int(width.max()))
    pos = (near.to(torch.uint8).argmax(dim=1, keepdim=True) + span).clamp(max=n - 1)
    vals, dist, idx = s.gather(1, pos), d.gather(1, pos).masked_fill_(span >= width, torch.inf), who.gather(1, pos)
    if len(span) <= 16:  # rank = how many candidates come first in (distance, client index) order
        di, dj, ii, ij = dist[:, :, None], dist[:, None, :], idx[:, :, None], idx[:, None, :]
        rank = ((di < dj) | ((di == dj) & (ii < ij))).sum(dim=1)  # distinct for kept values, >= beta for pads
        picked = torch.empty(c, beta + 1, dtype=torch.float64).scatter_(1, rank.clamp_(max=beta), vals)[:, :beta]
    else:  # the same order by two stable sorts: by client index, then by distance
        by_client = idx.sort(dim=1, stable=True).indices
        vals, dist = vals.gather(1, by_client), dist.gather(1, by_client)
        picked = vals.gather(1, dist.sort(dim=1, stable=True).indices[:, :beta])
    return picked.T.contiguous().mean(dim=0)  # beta x c, as the definition lays it out


def closest_to_median_mean(updates: Sequence[Params], *, beta: int) -> Params:
    """Per coordinate, the mean of the `beta` values closest to the coordinate-wise median (Bulyan's stage 2);
    equal distances are broken by client order, so the result is deterministic."""
    if not 1 <= beta <= len(updates):
        raise ConfigError(f"bulyan: beta must be between 1 and {len(updates)}, got {beta}")
    return _coordinatewise(updates, lambda a: _closest_rule(a, beta))


def bulyan(updates: Sequence[Params], *, f: int) -> Params:
    """Bulyan (El Mhamdi et al. 2018): theta = n - 2f updates chosen by recursive Krum, then per coordinate the
    mean of the beta = theta - 2f values closest to their median."""
    _check(updates)
    chosen = [updates[i] for i in sorted(bulyan_select(updates, f=f))]
    return closest_to_median_mean(chosen, beta=len(chosen) - 2 * f)
