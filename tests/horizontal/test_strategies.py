"""Aggregation maths against numbers computed by hand."""

import math

import pytest
import torch

from tessera.core.errors import ConfigError
from tessera.horizontal.strategies import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi
from tessera.horizontal.strategies.aggregate import weighted_mean
from tessera.runtime.messages import FitRes


def res(value: float, n: int) -> tuple[str, FitRes]:
    return ("c", FitRes(params={"w": torch.tensor([value]), "steps": torch.tensor([4])}, num_examples=n))


CURRENT = {"w": torch.tensor([1.0]), "steps": torch.tensor([2])}


def test_weighted_mean_by_hand() -> None:
    u = [{"a": torch.tensor([1.0, 2.0])}, {"a": torch.tensor([4.0, 8.0])}]
    out = weighted_mean(u, [1, 3])
    assert torch.allclose(out["a"], torch.tensor([(1 + 12) / 4, (2 + 24) / 4]))
    with pytest.raises(ValueError):
        weighted_mean(u, [0, 0])


def test_fedavg_is_the_example_weighted_mean_and_rounds_integer_buffers() -> None:
    out = FedAvg().aggregate_fit(1, [res(3.0, 1), res(5.0, 3)], CURRENT)
    assert out["w"].item() == pytest.approx((3 + 15) / 4)  # 4.5
    assert out["steps"].dtype == torch.int64 and out["steps"].item() == 4


def test_fedavg_server_lr_scales_the_mean_delta() -> None:
    out = FedAvg(server_lr=0.5).aggregate_fit(1, [res(3.0, 1), res(5.0, 3)], CURRENT)
    assert out["w"].item() == pytest.approx(1 + 0.5 * 3.5)


def test_fedprox_sends_mu_and_aggregates_like_fedavg() -> None:
    s = FedProx(proximal_mu=0.3)
    assert s.fit_config(1)["proximal_mu"] == 0.3
    assert s.aggregate_fit(1, [res(3.0, 1)], CURRENT)["w"].item() == pytest.approx(3.0)


def test_fedavgm_momentum_over_two_rounds() -> None:
    s = FedAvgM(server_lr=1.0, server_momentum=0.5)
    x1 = s.aggregate_fit(1, [res(3.0, 1)], CURRENT)  # delta 2 -> m = 2 -> x = 3
    assert x1["w"].item() == pytest.approx(3.0)
    x2 = s.aggregate_fit(2, [res(4.0, 1)], {**CURRENT, "w": x1["w"]})  # delta 1 -> m = 0.5*2 + 1 = 2 -> x = 5
    assert x2["w"].item() == pytest.approx(5.0)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_adaptive_server_optimisers_over_two_rounds(cls: type) -> None:
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    s = cls(eta=eta, beta_1=b1, beta_2=b2, tau=tau)
    d1, d2 = 2.0, -1.0
    x1 = s.aggregate_fit(1, [res(1.0 + d1, 1)], CURRENT)["w"].item()
    m1 = (1 - b1) * d1
    v1 = {"FedAdam": (1 - b2) * d1**2, "FedYogi": (1 - b2) * d1**2, "FedAdagrad": d1**2}[cls.__name__]
    assert x1 == pytest.approx(1.0 + eta * m1 / (math.sqrt(v1) + tau), rel=1e-6)
    x2 = s.aggregate_fit(2, [res(x1 + d2, 1)], {**CURRENT, "w": torch.tensor([x1])})["w"].item()
    m2 = b1 * m1 + (1 - b1) * d2
    if cls is FedAdam:
        v2 = b2 * v1 + (1 - b2) * d2**2
    elif cls is FedYogi:
        v2 = v1 - (1 - b2) * d2**2 * math.copysign(1, v1 - d2**2)
    else:
        v2 = v1 + d2**2
    assert x2 == pytest.approx(x1 + eta * m2 / (math.sqrt(v2) + tau), rel=1e-5)
    state = s.state_dict()
    assert state["m"]["w"].item() == pytest.approx(m2) and state["v"]["w"].item() == pytest.approx(v2)


def test_bad_strategy_options_name_the_key() -> None:
    with pytest.raises(ConfigError, match="fraction_fit"):
        FedAvg(fraction_fit=-0.1)
    with pytest.raises(ConfigError, match="min_available"):
        FedAvg(min_available=0)
    with pytest.raises(ConfigError, match="proximal_mu"):
        FedProx(proximal_mu=-1)


def test_sampling_is_seeded_and_respects_minimum() -> None:
    import numpy as np

    s = FedAvg(fraction_fit=0.3, min_fit_clients=4)
    clients = [f"c{i}" for i in range(10)]
    a = s.configure_fit(1, CURRENT, clients, np.random.default_rng([0, 1]))
    b = s.configure_fit(1, CURRENT, clients, np.random.default_rng([0, 1]))
    assert [c for c, _ in a] == [c for c, _ in b] and len(a) == 4
