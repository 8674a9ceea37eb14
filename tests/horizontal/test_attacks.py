"""Attack simulation: each attack by hand, bad updates never aggregated, robust aggregators under sign flip."""

import pytest
import torch

from tessera.horizontal.attacks import AttackKind, LabelFlipTask, UpdateAttack, corrupt
from tessera.horizontal.simulation import JobParts, simulate
from tessera.horizontal.strategies import FedAvg, FedMedian, Krum, TrimmedMean
from tests.fixtures import accuracy_curve, byzantine_run

from .helpers import make_data, make_task, params_equal

X = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([5])}
Y = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor([6])}  # honest delta (1, -2)


def test_each_attack_by_hand() -> None:
    assert corrupt(AttackKind.SIGN_FLIP, X, Y, scale=10)["w"].tolist() == [-9.0, 22.0]  # x - 10 (y - x)
    assert corrupt(AttackKind.SCALE, X, Y, scale=3)["w"].tolist() == [4.0, -4.0]  # x + 3 (y - x)
    assert torch.isnan(corrupt(AttackKind.NAN, X, Y)["w"]).all()
    assert torch.isinf(corrupt(AttackKind.INF, X, Y)["w"]).all()
    assert corrupt(AttackKind.WRONG_SHAPE, X, Y)["w"].shape == (3,)
    noise = corrupt(AttackKind.GAUSSIAN, X, Y, std=2.0, seed=3)["w"] - X["w"]
    expected = 2.0 * torch.randn(2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(noise.double(), expected, atol=1e-6)  # seeded: the same noise on every backend
    for kind in AttackKind:
        assert corrupt(kind, X, Y)["n"].item() == 6  # integer buffers are left alone


@pytest.mark.parametrize("kind", [AttackKind.NAN, AttackKind.INF, AttackKind.WRONG_SHAPE])
def test_invalid_update_never_reaches_the_global_params(kind: AttackKind) -> None:
    # Oracle: the run with the attacker equals, bit for bit, the run where the attacker is not in the federation.
    data = make_data(num_clients=3)
    attack = UpdateAttack(kind, clients=frozenset({"c1"}))
    attacked = JobParts(task=make_task(data), strategy=FedAvg(fraction_evaluate=0.0), clients=list(data),
                        mods=[attack])
    hist, params = simulate(attacked, rounds=3, seed=1)
    honest = JobParts(task=make_task(data), strategy=FedAvg(fraction_evaluate=0.0), clients=["c0", "c2"])
    _, reference = simulate(honest, rounds=3, seed=1)
    assert params_equal(params, reference)
    assert all(r["clients_failed"] == 1 and r["clients_succeeded"] == 2 for r in hist)
    reason = hist.last["failures"][0]["reason"]
    assert reason.startswith("rejected:") and ("NaN" in reason or "expected" in reason)


def test_label_flip_flips_only_the_named_clients_training_labels() -> None:
    data = make_data(num_clients=2)
    task = LabelFlipTask(make_task(data, shuffle=False), clients={"c0"}, num_classes=3)
    (train0, test0), (train1, _) = task.data_fn("c0", 1), task.data_fn("c1", 1)
    y0 = torch.cat([yb for _, yb in train0])
    assert torch.equal(y0, 2 - data["c0"][1])
    assert torch.equal(torch.cat([yb for _, yb in train1]), data["c1"][1])
    assert test0 is not None and torch.equal(torch.cat([yb for _, yb in test0]), data["c0"][1])


def test_label_flip_clients_train_and_move_the_model_differently() -> None:
    data = make_data(num_clients=2)
    flip = JobParts(task=LabelFlipTask(make_task(data), clients={"c0"}, num_classes=3),
                    strategy=FedAvg(fraction_evaluate=0.0), clients=list(data))
    clean = JobParts(task=make_task(data), strategy=FedAvg(fraction_evaluate=0.0), clients=list(data))
    assert not params_equal(simulate(flip, rounds=1)[1], simulate(clean, rounds=1)[1])


@pytest.mark.slow
def test_three_of_ten_sign_flip_clients_break_fedavg_but_not_robust_aggregators() -> None:
    # digits, 10 IID clients, 3 sign-flip x10; 15 rounds, 2 local epochs, MLP(32), same seed for every run.
    # Measured: clean FedAvg 0.950, attacked FedAvg 0.109 (a constant prediction), median 0.936, Krum 0.928,
    # trimmed mean 0.930 on 360 held-out digits.
    kw = {"fraction_evaluate": 0.0, "local_config": {"local_epochs": 2}}
    run = {"rounds": 15, "batch_size": 16, "lr": 0.2, "seed": 0}
    clean = accuracy_curve(byzantine_run(FedAvg(**kw), byzantine=0, **run))[-1]
    attacked = accuracy_curve(byzantine_run(FedAvg(**kw), **run))[-1]
    assert clean > 0.9
    assert attacked < 0.5
    for strategy in (FedMedian(**kw), Krum(f=3, **kw), TrimmedMean(beta=0.3, **kw)):
        acc = accuracy_curve(byzantine_run(strategy, **run))[-1]
        assert abs(acc - clean) <= 0.05, (strategy.name, acc, clean)
