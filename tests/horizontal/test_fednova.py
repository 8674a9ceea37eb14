"""FedNova's normalisation by hand, and deadline rounds giving each client the steps that fit its budget."""

from pathlib import Path

import pytest
import torch

from tessera.core.errors import ConfigError
from tessera.horizontal.simulation import JobParts, simulate
from tessera.horizontal.strategies import DeadlineRounds, FedAvg, FedNova
from tessera.horizontal.strategies.fednova import step_norm
from tessera.runtime.messages import FitRes

from .helpers import make_data, make_task, params_equal

CUR = {"w": torch.tensor([0.0]), "n": torch.tensor([1])}


def res(value: float, steps: float, n: int = 1) -> tuple[str, FitRes]:
    return ("c", FitRes(params={"w": torch.tensor([value]), "n": torch.tensor([3])}, num_examples=n,
                        metrics={"steps": steps}))


def test_fednova_by_hand() -> None:
    # p = (1/2, 1/2), tau = (1, 4): normalised deltas 2/1 and 4/4, tau_eff = 2.5 -> x = 2.5 * (1 + 0.5) = 3.75
    out = FedNova().aggregate_fit(1, [res(2.0, 1), res(4.0, 4)], CUR)
    assert out["w"].item() == pytest.approx(3.75)
    assert FedAvg().aggregate_fit(1, [res(2.0, 1), res(4.0, 4)], CUR)["w"].item() == pytest.approx(3.0)
    assert out["n"].item() == 3  # integer buffers (counters) take the plain example-weighted mean
    # example weights: p = (3/4, 1/4), tau_eff = 0.75 + 1 = 1.75 -> 1.75 * (0.75 * 2 + 0.25 * 1) = 3.0625
    assert FedNova().aggregate_fit(1, [res(2.0, 1, 3), res(4.0, 4, 1)], CUR)["w"].item() == pytest.approx(3.0625)
    assert FedNova(server_lr=0.5).aggregate_fit(1, [res(2.0, 1), res(4.0, 4)], CUR)["w"].item() == pytest.approx(1.875)


def test_fednova_with_equal_steps_is_fedavg() -> None:
    r = [res(2.0, 5, 2), res(-1.0, 5, 7), res(0.5, 5, 1)]
    fedavg = FedAvg().aggregate_fit(1, r, CUR)["w"].item()
    assert FedNova().aggregate_fit(1, r, CUR)["w"].item() == pytest.approx(fedavg)


def test_momentum_step_norm_by_hand() -> None:
    # rho = 0.5, tau = 2: a = ((1 - rho^2) / (1 - rho), 1) = (1.5, 1) -> ||a||_1 = 2.5
    assert step_norm(2, 0.5) == pytest.approx(2.5)
    assert step_norm(7, 0.0) == 7


def test_fednova_refuses_replies_without_steps() -> None:
    with pytest.raises(ConfigError, match="steps"):
        FedNova().aggregate_fit(1, [("c", FitRes(params={"w": torch.tensor([1.0])}, num_examples=1))],
                                {"w": torch.tensor([0.0])})


def test_deadline_caps_steps_by_speed_and_keeps_a_simulated_clock(tmp_path: Path) -> None:
    # clients of 24, 31, 38 rows, batch 8 -> 3, 4, 5 steps per epoch; 2 epochs -> 6, 8, 10 steps uncapped
    data = make_data(num_clients=3)
    speeds = {"c0": 1.0, "c1": 1.0, "c2": 0.2}
    kw = {"fraction_evaluate": 0.0, "local_config": {"local_epochs": 2}}
    dl = DeadlineRounds(FedNova(**kw), speeds=speeds, deadline=7.0)
    plan = dl.configure_fit(1, {"w": torch.zeros(1)}, list(data), __import__("numpy").random.default_rng(0))
    assert [ins.config["max_steps"] for _, ins in plan] == [7, 7, 1]  # floor(7 * speed), at least 1
    hist, _ = simulate(JobParts(task=make_task(data), strategy=dl, clients=list(data)), rounds=2,
                       output_dir=tmp_path / "dl")
    assert hist.last["train_metrics"]["steps"] == pytest.approx((6 * 24 + 7 * 31 + 1 * 38) / 93)  # 6, 7, 1 steps
    assert dl.round_times == [7.0, 7.0] and dl.clock == 14.0 and dl.updates == 6  # c0 6 s, c1 7 s, c2 5 s
    sync = DeadlineRounds(FedAvg(**kw), speeds=speeds)
    simulate(JobParts(task=make_task(data), strategy=sync, clients=list(data)), rounds=2)
    assert sync.round_times == [50.0, 50.0] and sync.updates == 6  # waits for c2: 10 steps at 0.2 step/s


def test_deadline_rounds_resume_exactly(tmp_path: Path) -> None:
    def parts() -> JobParts:
        data = make_data(num_clients=3)
        strategy = DeadlineRounds(FedNova(fraction_evaluate=0.0), speeds={"c0": 1, "c1": 2, "c2": 0.5}, deadline=4)
        return JobParts(task=make_task(data), strategy=strategy, clients=list(data))

    full_parts = parts()
    _, full = simulate(full_parts, rounds=4, seed=5, output_dir=tmp_path / "full")
    simulate(parts(), rounds=2, seed=5, output_dir=tmp_path / "cut")
    cut_parts = parts()
    _, resumed = simulate(cut_parts, rounds=4, seed=5, output_dir=tmp_path / "cut", resume=True)
    assert params_equal(full, resumed)
    a, b = full_parts.strategy, cut_parts.strategy
    assert isinstance(a, DeadlineRounds) and isinstance(b, DeadlineRounds)
    assert (a.clock, a.round_times, a.updates) == (b.clock, b.round_times, b.updates)


def test_deadline_refuses_unknown_clients_and_bad_speeds() -> None:
    with pytest.raises(ConfigError, match="positive"):
        DeadlineRounds(FedAvg(), speeds={"a": 0.0})
    with pytest.raises(ConfigError, match="no speed"):
        DeadlineRounds(FedAvg(), speeds={"a": 1.0}, deadline=1.0).budget("b")
