"""Robust aggregation rules and strategies against numbers computed by hand."""

from pathlib import Path

import pytest
import torch

from tessera.cli.jobs import build_strategy
from tessera.core.config import JobConfig, validate
from tessera.core.errors import ConfigError
from tessera.horizontal.strategies import (
    STRATEGIES,
    Bulyan,
    ClipUpdates,
    FedAvg,
    FedMedian,
    Krum,
    MultiKrum,
    TrimmedMean,
    aggregate,
    clip_update,
)
from tessera.runtime.messages import FitRes


def pts(*values: float | tuple[float, ...]) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor(v if isinstance(v, tuple) else (v,), dtype=torch.float32)} for v in values]


def results(*values: float) -> list[tuple[str, FitRes]]:
    return [(f"c{i}", FitRes(params=p, num_examples=1)) for i, p in enumerate(pts(*values))]


CUR = {"w": torch.tensor([0.0])}


# ------------------------------------------------------------------------------------------------------ median
def test_median_odd_even_and_ties_by_hand() -> None:
    assert aggregate.median(pts(1, 5, 3))["w"].item() == 3
    assert aggregate.median(pts(1, 3, 5, 100))["w"].item() == 4  # even: mean of the middle two
    assert aggregate.median(pts(2, 7, 2, 1))["w"].item() == 2  # tie in the middle: 2 and 2
    out = aggregate.median(pts((1, 10), (2, -10), (3, 0), (4, 5)))["w"]
    assert out.tolist() == [2.5, 2.5]  # coordinate-wise: [1,2,3,4] -> 2.5, [-10,0,5,10] -> 2.5


def test_median_keeps_dtypes_and_rounds_integer_buffers() -> None:
    u = [{"w": torch.tensor([1.0], dtype=torch.float16), "n": torch.tensor([v])} for v in (1, 2, 4, 9)]
    out = aggregate.median(u)
    assert out["w"].dtype == torch.float16 and out["n"].dtype == torch.int64 and out["n"].item() == 3  # 3.0


def test_blocking_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    u = [{"a": torch.randn(7, 5, generator=g), "b": torch.randn(3, generator=g)} for _ in range(6)]
    whole = aggregate.median(u), aggregate.trimmed_mean(u, beta=0.2), aggregate.sq_distances(u)
    monkeypatch.setattr(aggregate, "_BLOCK", 7)  # blocks of one or two columns
    blocked = aggregate.median(u), aggregate.trimmed_mean(u, beta=0.2), aggregate.sq_distances(u)
    for k in u[0]:
        assert torch.equal(whole[0][k], blocked[0][k]) and torch.allclose(whole[1][k], blocked[1][k])
    flat = torch.stack([torch.cat([p["a"].reshape(-1), p["b"]]).double() for p in u])
    assert torch.allclose(blocked[2], torch.cdist(flat, flat).pow(2), atol=1e-9)  # oracle: direct distances


# ------------------------------------------------------------------------------------------------ trimmed mean
def test_trimmed_mean_by_hand() -> None:
    assert aggregate.trimmed_mean(pts(1, 2, 3, 100), beta=0.25)["w"].item() == 2.5  # drop 1 and 100
    assert aggregate.trimmed_mean(pts(1, 2, 3, 100), beta=0.2)["w"].item() == 26.5  # floor(0.8) = 0: plain mean
    assert aggregate.trimmed_mean(pts(-50, 1, 2, 3, 4, 5, 6, 7, 8, 90), beta=0.1)["w"].item() == pytest.approx(4.5)
    with pytest.raises(ConfigError, match="beta"):
        aggregate.trimmed_mean(pts(1, 2), beta=0.5)


# -------------------------------------------------------------------------------------------------------- krum
def test_krum_scores_and_selected_index_by_hand() -> None:
    u = pts(0, 1, 3, 50)
    # f=0: n - f - 2 = 2 nearest: 0 -> 1+9, 1 -> 1+4, 3 -> 4+9, 50 -> 47^2+49^2
    assert aggregate.krum_scores(u, f=0) == [10.0, 5.0, 13.0, 47.0**2 + 49.0**2]
    assert aggregate.krum_select(u, f=0) == [1]
    assert aggregate.krum(u, f=0)["w"].item() == 1.0
    assert aggregate.krum_select(u, f=0, m=2) == [1, 0]
    assert aggregate.krum(u, f=0, m=2)["w"].item() == 0.5  # Multi-Krum: mean of the two best


def test_krum_ties_break_by_index_and_bad_f_is_refused() -> None:
    assert aggregate.krum_select(pts(0, 1, 2, 50), f=1) == [0]  # 0, 1, 2 all score 1
    with pytest.raises(ConfigError, match="n - f - 2"):
        aggregate.krum_select(pts(0, 1, 2), f=1)
    with pytest.raises(ConfigError, match="m must be"):
        aggregate.krum_select(pts(0, 1, 2, 3), f=0, m=5)


# ------------------------------------------------------------------------------------------------------ bulyan
def test_bulyan_selection_and_result_by_hand() -> None:
    u = pts((0, 0), (1, 3), (2, 1), (3, 2), (9, 9), (100, -50), (-100, 50))
    # n=7, f=1: Krum (4, 3, 2, 1, 1 neighbours) picks 3 (score 105), then 1 (115), 2 (118), 0 (162, tie with 4 ->
    # lower index), then 4 (11762, tie with 5 -> lower index). theta=5, beta=3: per coordinate the 3 values
    # closest to the median: x [0,1,2,3,9] -> {2,1,3}, y [0,3,1,2,9] -> {2,3,1}.
    assert aggregate.bulyan_select(u, f=1) == [3, 1, 2, 0, 4]
    assert aggregate.bulyan(u, f=1)["w"].tolist() == [2.0, 2.0]
    with pytest.raises(ConfigError, match="4f \\+ 3"):
        aggregate.bulyan(u, f=2)


def test_closest_to_median_mean_breaks_distance_ties_by_client_order() -> None:
    # median 5; distances 4, 1, 0, 4, 15 -> 5, 4 and the first of the tied (1, 9): 1
    assert aggregate.closest_to_median_mean(pts(1, 4, 5, 9, 20), beta=3)["w"].item() == pytest.approx(10 / 3)


# -------------------------------------------------------------------------------------------------- strategies
def test_strategies_apply_their_rule_and_server_lr() -> None:
    r = results(0, 1, 3, 50, 2)
    assert FedMedian().aggregate_fit(1, r, CUR)["w"].item() == 2
    assert TrimmedMean(beta=0.2).aggregate_fit(1, r, CUR)["w"].item() == 2  # mean of 1, 2, 3
    k = Krum(f=1)
    # scores (2 nearest): 0 -> 1+4, 1 -> 1+1, 3 -> 1+4, 50 -> 47^2+48^2, 2 -> 1+1: tie 1 vs 2 -> index 1 (value 1)
    assert k.aggregate_fit(1, r, CUR)["w"].item() == 1 and k.selected == ["c1"]
    mk = MultiKrum(f=1)  # m = n - f = 4: everything but the 50
    assert mk.aggregate_fit(1, r, CUR)["w"].item() == 1.5 and sorted(mk.selected) == ["c0", "c1", "c2", "c4"]
    half = FedMedian(server_lr=0.5).aggregate_fit(1, r, {"w": torch.tensor([1.0])})
    assert half["w"].item() == 1.5  # 1 + 0.5 * (2 - 1)
    b = Bulyan(f=1)
    out = b.aggregate_fit(1, results(0, 1, 3, 50, 2, 4, -40), CUR)
    assert out["w"].item() == 2 and b.selected == ["c0", "c1", "c2", "c4", "c5"]  # 0..4; 3 closest to 2


def test_clip_update_by_hand_and_leaves_small_updates_untouched() -> None:
    cur = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor([3])}
    big = {"w": torch.tensor([4.0, 5.0]), "n": torch.tensor([7])}  # delta (3, 4), norm 5
    out = clip_update(big, cur, max_norm=2.5)
    assert out["w"].tolist() == [2.5, 3.0] and out["n"].item() == 7
    assert clip_update(big, cur, max_norm=5.0) is big


def test_clip_wrapper_bounds_a_scaled_attack_before_fedavg() -> None:
    r = results(1, 1, 1000)
    plain = FedAvg().aggregate_fit(1, r, CUR)["w"].item()
    clipped = ClipUpdates(FedAvg(min_available=2), max_norm=2.0)
    assert plain == pytest.approx(334.0)
    assert clipped.aggregate_fit(1, r, CUR)["w"].item() == pytest.approx(4 / 3)  # (1 + 1 + 2) / 3
    assert clipped.min_available == 2 and clipped.name == "clip(fedavg)"
    # unclipped, 0.5 and 1.5 tie (distance 1) and Krum keeps 0.5; clipped to 2, 1000 becomes the neighbour of 1.5
    assert Krum(f=0).aggregate_fit(1, results(0.5, 1.5, 1000), CUR)["w"].item() == 0.5
    assert Krum(max_update_norm=2.0, f=0).aggregate_fit(1, results(0.5, 1.5, 1000), CUR)["w"].item() == 1.5


def test_bad_options_are_refused_with_the_key() -> None:
    with pytest.raises(ConfigError, match=r"strategy\.beta"):
        TrimmedMean(beta=0.6)
    with pytest.raises(ConfigError, match=r"strategy\.f"):
        Krum(f=-1)
    with pytest.raises(ConfigError, match="max_update_norm"):
        FedMedian(max_update_norm=0.0)


# ------------------------------------------------------------------------------------------------- job.toml path
@pytest.mark.parametrize(("name", "kwargs", "attr"), [
    ("krum", {"f": 2}, ("f", 2)), ("multikrum", {"f": 1, "m": 3}, ("m", 3)), ("bulyan", {"f": 1}, ("f", 1)),
    ("fedmedian", {"max_update_norm": 5.0}, ("max_update_norm", 5.0)), ("trimmedmean", {"beta": 0.3}, ("beta", 0.3)),
    ("scaffold", {"local_lr": 0.05}, ("local_lr", 0.05)), ("fednova", {"local_momentum": 0.9}, ("local_momentum", 0.9)),
    ("fedbuff", {"buffer_size": 4}, ("buffer_size", 4)),
])
def test_job_toml_builds_each_strategy_with_its_kwargs(name: str, kwargs: dict[str, object],
                                                       attr: tuple[str, object], tmp_path: Path) -> None:
    cfg = validate(JobConfig, {"strategy": {"name": name, **kwargs}, "train": {"local_epochs": 3}}, source="t")
    s = build_strategy(cfg)
    assert type(s) is STRATEGIES[name] and getattr(s, attr[0]) == attr[1]
    assert s.fit_config(1)["local_epochs"] == 3
    bad = validate(JobConfig, {"strategy": {"name": name, "nonsense": 1}}, source="t")
    with pytest.raises(ConfigError, match="not an option"):
        build_strategy(bad)
