"""SecAgg+ sparse neighbour graph (Bell et al. 2020): each client masks with and shares secrets among only
O(log n) neighbours, so per-client cost grows with log n instead of n.

The graph is a ring of the clients in a public pseudo-random order (seeded by the server's `graph_seed`); each
client is joined to the `degree / 2` nearest clients on either side. With degree >= n - 1 it is the complete graph
(classic SecAgg).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def share_threshold(threshold: float, degree: int) -> int:
    """Shares needed out of the degree + 1 holders (a client and its neighbours): ceil(threshold * (degree + 1))."""
    return max(2, math.ceil(threshold * (degree + 1) - 1e-9))


def _tail(k: int, p_alive: float, need: int) -> float:
    """P[Binomial(k, p_alive) < need]."""
    return sum(math.comb(k, i) * p_alive**i * (1 - p_alive) ** (k - i) for i in range(min(need, k + 1)))


def failure_probability(*, degree: int, threshold: int, dropout: float) -> float:
    """P[a dropped client's degree neighbours hold fewer than `threshold` of its shares] when each client drops
    independently with probability `dropout`: the chance the round must be abandoned because of one dropout."""
    return _tail(degree, 1 - dropout, threshold)


def default_degree(n: int, *, threshold: float, dropout: float, failure: float = 1e-6) -> int:
    """The smallest even degree >= 2 log2(n) at which, if each client drops with probability `dropout`, a dropped
    client's neighbours still hold `threshold` of its shares with probability >= 1 - failure (else complete)."""
    if n <= 2:
        return n - 1
    k = 2 * math.ceil(math.log2(n))
    while k < n - 1:
        if _tail(k, 1 - dropout, share_threshold(threshold, k)) <= failure:
            return k
        k += 2
    return n - 1


def _ring_order(n: int, degree: int, graph_seed: int) -> list[int]:
    if degree < 2 or degree % 2:
        raise ValueError(f"a sparse neighbour graph needs an even degree >= 2, got {degree}")
    return list(np.random.default_rng(graph_seed).permutation(n).tolist())


def neighbours_of(clients: Sequence[str], me: str, *, degree: int, graph_seed: int) -> tuple[str, ...]:
    """`neighbours(...)[me]` in O(n): what one client needs (the coordinator computes the whole graph)."""
    n = len(clients)
    if degree >= n - 1:
        return tuple(x for x in clients if x != me)
    order = _ring_order(n, degree, graph_seed)
    p = order.index(clients.index(me))
    near = {order[(p + d) % n] for d in range(-degree // 2, degree // 2 + 1) if d}
    return tuple(clients[i] for i in sorted(near))


def neighbours(clients: Sequence[str], *, degree: int, graph_seed: int) -> dict[str, tuple[str, ...]]:
    """Each client's neighbours (sorted by position in `clients`); symmetric, no self loops."""
    n = len(clients)
    if degree >= n - 1:
        return {c: tuple(x for x in clients if x != c) for c in clients}
    order = _ring_order(n, degree, graph_seed)
    pos = {clients[i]: p for p, i in enumerate(order)}
    index = {c: i for i, c in enumerate(clients)}
    out: dict[str, tuple[str, ...]] = {}
    for c in clients:
        near = {clients[order[(pos[c] + d) % n]] for d in range(-degree // 2, degree // 2 + 1) if d}
        out[c] = tuple(sorted(near, key=index.__getitem__))
    return out
