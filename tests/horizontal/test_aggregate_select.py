"""Selection-based robust aggregation against the plain sort-based definitions, bit for bit.

The references below are the textbook rules written the obvious way (a full float64 sort across clients per
coordinate, Krum's distances by a pairwise loop): `aggregate` must give exactly their values, with ties, even
counts, integer and half-precision inputs, and any block size, and must never write to its inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.core.types import Params
from tessera.horizontal.strategies import aggregate


# ------------------------------------------------------------------------------------------------- references
def _stack(updates: list[Params], key: str) -> torch.Tensor:
    return torch.stack([u[key].reshape(-1).double() for u in updates])


def _cast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(like.dtype) if like.is_floating_point() else x.round().to(like.dtype)


def _ref_median_col(s: torch.Tensor) -> torch.Tensor:
    s = s.sort(dim=0).values
    n = s.shape[0]
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def ref_median(updates: list[Params]) -> Params:
    return {k: _cast(_ref_median_col(_stack(updates, k)).reshape(r.shape), r) for k, r in updates[0].items()}


def ref_trimmed_mean(updates: list[Params], beta: float) -> Params:
    n, cut = len(updates), int(beta * len(updates))
    return {k: _cast(_stack(updates, k).sort(dim=0).values[cut : n - cut].mean(dim=0).reshape(r.shape), r)
            for k, r in updates[0].items()}


def ref_closest_to_median_mean(updates: list[Params], beta: int) -> Params:
    out = {}
    for k, r in updates[0].items():
        s = _stack(updates, k)
        order = (s - _ref_median_col(s)).abs().sort(dim=0, stable=True).indices[:beta]
        out[k] = _cast(s.gather(0, order).mean(dim=0).reshape(r.shape), r)
    return out


def naive_krum_scores(updates: list[Params], f: int) -> list[float]:
    flat = [torch.cat([t.reshape(-1).double() for t in u.values() if t.is_floating_point()]) for u in updates]
    n = len(flat)
    d = [[float(((flat[i] - flat[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    return [sum(sorted(d[i][j] for j in range(n) if j != i)[: n - f - 2]) for i in range(n)]


def assert_identical(got: Params, want: Params) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), (k, got[k], want[k])


def copies(updates: list[Params]) -> list[Params]:
    return [{k: t.clone() for k, t in u.items()} for u in updates]


# ------------------------------------------------------------------------------------------------- generators
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32]


def make(n: int, shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator, *, levels: int = 0) -> list[Params]:
    """n updates; `levels` > 0 draws from that few distinct values, so ties are everywhere."""
    out = []
    for _ in range(n):
        if levels:
            x = torch.randint(-levels, levels + 1, shape, generator=g).double() * 0.5
        else:
            x = torch.randn(shape, generator=g, dtype=torch.float64) * 10
        out.append({"w": x.to(dtype), "b": (x.reshape(-1)[:3] * 7).to(dtype)})
    return out


CASES = [(n, dtype, levels) for n in (1, 2, 3, 4, 7, 10, 16, 21, 30) for dtype in DTYPES for levels in (0, 2)]


@pytest.mark.parametrize(("n", "dtype", "levels"), CASES)
def test_median_and_trimmed_mean_equal_the_sort_reference(n: int, dtype: torch.dtype, levels: int) -> None:
    g = torch.Generator().manual_seed(n * 100 + levels)
    u = make(n, (5, 9), dtype, g, levels=levels)
    before = copies(u)
    assert_identical(aggregate.median(u), ref_median(u))
    for beta in (0.0, 0.1, 0.25, 0.49):
        assert_identical(aggregate.trimmed_mean(u, beta=beta), ref_trimmed_mean(u, beta))
    for beta_n in range(1, n + 1):
        assert_identical(aggregate.closest_to_median_mean(u, beta=beta_n), ref_closest_to_median_mean(u, beta_n))
    for a, b in zip(u, before, strict=True):  # inputs untouched
        assert_identical(a, b)


def test_explicit_ties_and_even_counts() -> None:
    def w(*v: float) -> list[Params]:
        return [{"w": torch.tensor([float(x)])} for x in v]

    assert aggregate.median(w(2, 2, 2, 2))["w"].item() == 2
    assert aggregate.median(w(1, 2, 2, 9))["w"].item() == 2  # middle two tie
    assert aggregate.median(w(3, 1, 3, 1))["w"].item() == 2  # two tied pairs, mean of 1 and 3
    assert aggregate.median(w(-0.0, 0.0))["w"].item() == 0
    assert aggregate.trimmed_mean(w(5, 5, 1, 5, 5), beta=0.2)["w"].item() == 5
    # median 5; 3 and 7 tie at distance 2 for the last slot: client order keeps 7 (index 1) before 3 (index 3)
    assert aggregate.closest_to_median_mean(w(5, 7, 100, 3, 5), beta=3)["w"].item() == pytest.approx(17 / 3)
    u = w(5, 7, 100, 3, 5, 3, 7)
    for beta in range(1, 8):
        assert_identical(aggregate.closest_to_median_mean(u, beta=beta), ref_closest_to_median_mean(u, beta))


@pytest.mark.parametrize("block", [1, 7, 64])
def test_any_block_size_gives_the_same_bits(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(block)
    u = make(6, (13, 11), torch.float32, g) + make(1, (13, 11), torch.float32, g, levels=1)
    monkeypatch.setattr(aggregate, "_BLOCK", block)  # blocks of one or a few columns
    assert_identical(aggregate.median(u), ref_median(u))
    assert_identical(aggregate.trimmed_mean(u, beta=0.2), ref_trimmed_mean(u, 0.2))
    assert_identical(aggregate.closest_to_median_mean(u, beta=3), ref_closest_to_median_mean(u, 3))


def test_views_and_converted_sources_mix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks read contiguous CPU tensors in place (numpy views) and convert the rest slice by slice: a
    transposed (non-contiguous) tensor, a float16 client among float32 ones (the float64 path) and Krum's float64
    blocks all give the reference's bits, at any block size."""
    g = torch.Generator().manual_seed(5)
    u = make(7, (6, 4), torch.float32, g)
    u[2] = {"w": u[2]["w"].T.contiguous().T, "b": u[2]["b"]}  # same values, column-major memory
    assert not u[2]["w"].is_contiguous()
    mixed = [*u[:4], {k: t.half() for k, t in u[4].items()}, *u[5:]]
    for block in (aggregate._BLOCK, 16):
        monkeypatch.setattr(aggregate, "_BLOCK", block)
        for case in (u, mixed):
            assert_identical(aggregate.median(case), ref_median(case))
            assert_identical(aggregate.trimmed_mean(case, beta=0.2), ref_trimmed_mean(case, 0.2))
            assert_identical(aggregate.closest_to_median_mean(case, beta=3), ref_closest_to_median_mean(case, 3))
            assert aggregate.krum_scores(case, f=1) == pytest.approx(naive_krum_scores(case, 1), rel=1e-12, abs=1e-9)


floats32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
values = st.one_of(floats32, st.sampled_from([-2.0, -1.0, 0.0, 1.0, 3.0]))  # a small alphabet: ties everywhere


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.integers(1, 40).flatmap(lambda n: st.lists(st.lists(values, min_size=2, max_size=2), min_size=n,
                                                     max_size=n)), st.sampled_from([0.0, 0.15, 0.34]))
def test_property_any_float32_values(rows: list[list[float]], beta: float) -> None:
    u = [{"w": torch.tensor(r, dtype=torch.float32)} for r in rows]
    assert_identical(aggregate.median(u), ref_median(u))
    assert_identical(aggregate.trimmed_mean(u, beta=beta), ref_trimmed_mean(u, beta))
    for b in {1, max(1, len(u) // 2), len(u)}:  # more than 24 clients take the windowed search
        assert_identical(aggregate.closest_to_median_mean(u, beta=b), ref_closest_to_median_mean(u, b))


# ------------------------------------------------------------------------------------------------------- krum
@pytest.mark.parametrize("seed", range(4))
def test_block_krum_scores_equal_the_naive_pairwise_computation(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(seed)
    n, f = 9, 2
    u = [{"a": torch.randn(8, 6, generator=g) + 3, "b": torch.randn(5, generator=g), "n": torch.tensor([i])}
         for i in range(n)]
    u[0] = {k: v * 20 if v.is_floating_point() else v for k, v in u[0].items()}  # one outlier
    before = copies(u)
    want = naive_krum_scores(u, f)
    for block in (aggregate._BLOCK, 5):
        monkeypatch.setattr(aggregate, "_BLOCK", block)
        got = aggregate.krum_scores(u, f=f)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-9)
        assert aggregate.krum_select(u, f=f, m=n) == sorted(range(n), key=lambda i: (want[i], i))
    for a, b in zip(u, before, strict=True):
        assert_identical(a, b)


@pytest.mark.parametrize("n", [51, 52])
def test_closest_to_median_merge_path_and_its_fallback(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Float32 with small beta takes the merge of the 2 beta values around the median; rows with ties at the
    edge (here every third coordinate drawn from 3 values) go to the general search. Both equal the reference."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 300, generator=g)
    x[:, ::3] = torch.randint(-1, 2, (n, 100), generator=g).float()
    x[: n // 2, 1::7] = -0.0  # signed zeros tied with the median
    u = [{"w": r.clone()} for r in x]
    general_rows: list[int] = []
    general = aggregate._closest_general

    def counted(a: np.ndarray, beta: int) -> torch.Tensor:
        general_rows.append(a.shape[0])
        return general(a, beta)

    monkeypatch.setattr(aggregate, "_closest_general", counted)
    for beta in (1, 2, 4, 5, 16):
        assert_identical(aggregate.closest_to_median_mean(u, beta=beta), ref_closest_to_median_mean(u, beta))
    assert 5 * 100 <= sum(general_rows) < 5 * 200  # the tied third and some signed-zero columns, not the rest
