"""Partitioners cover every row exactly once and skew as claimed."""

import numpy as np
import pytest

from tessera.core.errors import ConfigError
from tessera.horizontal.partition import dirichlet, iid, partition, quantity, shards

LABELS = np.repeat(np.arange(10), 50)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards", "quantity"])
def test_every_row_exactly_once_and_seeded(scheme: str) -> None:
    a = partition(LABELS, 10, scheme=scheme, rng=np.random.default_rng(1), alpha=0.5)
    b = partition(LABELS, 10, scheme=scheme, rng=np.random.default_rng(1), alpha=0.5)
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(len(LABELS)))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_small_alpha_gives_fewer_classes_per_client() -> None:
    def classes(parts: list[np.ndarray]) -> float:
        return float(np.mean([len(np.unique(LABELS[p])) for p in parts]))

    skewed = dirichlet(LABELS, 10, 0.1, np.random.default_rng(0))
    flat = dirichlet(LABELS, 10, 100.0, np.random.default_rng(0))
    assert classes(skewed) < 5 < classes(flat)


def test_shards_give_each_client_two_label_blocks() -> None:
    parts = shards(LABELS, 10, 2, np.random.default_rng(0))
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)


def test_iid_sizes_are_balanced_and_quantity_sizes_are_not() -> None:
    assert {len(p) for p in iid(500, 10, np.random.default_rng(0))} == {50}
    sizes = [len(p) for p in quantity(500, 10, 0.5, np.random.default_rng(0))]
    assert sum(sizes) == 500 and max(sizes) > 2 * min(sizes)


def test_bad_partition_requests_are_refused() -> None:
    with pytest.raises(ConfigError, match="fewer clients"):
        iid(3, 5, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="unknown scheme"):
        partition(LABELS, 2, scheme="zipf", rng=np.random.default_rng(0))
