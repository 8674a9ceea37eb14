"""Split one data set's rows across clients: IID, Dirichlet label skew, label shards, quantity skew.

Each function returns one sorted index array per client, covering every row exactly once, drawn from the
`numpy.random.Generator` it is given (same generator state, same split).
"""

from __future__ import annotations

import numpy as np

from tessera.core.errors import ConfigError


def _check(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"num_clients must be at least 1, got {num_clients}")
    if n < num_clients:
        raise ConfigError(f"cannot split {n} rows across {num_clients} clients; use fewer clients")


def iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    _check(n, num_clients)
    return [np.sort(p) for p in np.array_split(rng.permutation(n), num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, *,
              min_size: int = 2, max_tries: int = 100) -> list[np.ndarray]:
    """Label skew: for each class, its rows are split by proportions ~ Dir(alpha) (Hsu et al. 2019).

    Small alpha gives clients few classes. Redraws until every client has `min_size` rows.
    """
    labels = np.asarray(labels)
    _check(len(labels), num_clients)
    if alpha <= 0:
        raise ConfigError(f"data.alpha must be positive, got {alpha}")
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(idx)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ConfigError(f"Dirichlet(alpha={alpha}) left a client with fewer than {min_size} rows after "
                      f"{max_tries} draws; raise alpha or use fewer clients")


def shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """McMahan et al. 2017: sort by label, cut into num_clients * shards_per_client shards, deal them out."""
    labels = np.asarray(labels)
    _check(len(labels), num_clients * shards_per_client)
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_clients * shards_per_client)
    deal = rng.permutation(len(pieces))
    return [np.sort(np.concatenate([pieces[j] for j in deal[i::num_clients]])) for i in range(num_clients)]


def quantity(
    n: int, num_clients: int, alpha: float, rng: np.random.Generator, *, min_size: int = 2
) -> list[np.ndarray]:
    """Quantity skew: client sizes ~ Dir(alpha) * n (at least `min_size` each), rows otherwise IID."""
    _check(n, num_clients * min_size)
    props = rng.dirichlet([alpha] * num_clients)
    sizes = min_size + np.floor(props * (n - min_size * num_clients)).astype(int)
    sizes[-1] = n - sizes[:-1].sum()
    perm = rng.permutation(n)
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def partition(labels: np.ndarray, num_clients: int, *, scheme: str, rng: np.random.Generator, alpha: float = 0.5,
              shards_per_client: int = 2) -> list[np.ndarray]:
    """Dispatch on the job.toml `data.partition` value."""
    if scheme == "iid":
        return iid(len(labels), num_clients, rng)
    if scheme == "dirichlet":
        return dirichlet(labels, num_clients, alpha, rng)
    if scheme == "shards":
        return shards(labels, num_clients, shards_per_client, rng)
    if scheme == "quantity":
        return quantity(len(labels), num_clients, alpha, rng)
    raise ConfigError(f"data.partition: unknown scheme {scheme!r}; use iid, dirichlet, shards or quantity")
