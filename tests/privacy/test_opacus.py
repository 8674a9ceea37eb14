"""DPTrainer: wrap once, load by value, recompute sampling rates, clip as promised, and match vanilla SGD / Opacus."""

import logging
import warnings
from typing import Any

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tessera.core.errors import ConfigError, PrivacyBudgetExceeded
from tessera.core.models import MLP
from tessera.core.types import get_params
from tessera.privacy import DPConfig, DPTrainer
from tessera.privacy.opacus import hook_count, round_generators

DELTA = 1e-5


def sgd(lr: float = 0.1) -> Any:
    return lambda p: torch.optim.SGD(p, lr=lr)


def data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def random_params(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def test_wrapped_once_no_prefix_and_global_params_loaded_by_value() -> None:
    # Prepare
    model = MLP(5, 3, [8])
    trainer = DPTrainer(model, sgd(), config=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    loader = DataLoader(data(32), batch_size=8)
    own_keys = list(model.state_dict())
    hooks = hook_count(model)
    assert hooks == 2 * 2  # Opacus: one forward + one backward hook per trainable layer (2 Linear)
    for rnd in range(5):
        # Execute: a new global model each round
        glob = random_params(model, rnd)
        trainer.load_params(glob)
        # Assert: the underlying module holds the global params by value, not by reference
        for k, v in model.state_dict().items():
            assert torch.equal(v, glob[k]) and v.data_ptr() != glob[k].data_ptr()
        trainer.train(loader, loss_fn=nn.CrossEntropyLoss(), seed=rnd)
        update = trainer.params()
        assert list(update) == own_keys and not any(k.startswith("_module.") for k in update)
        assert not torch.equal(update["fc0.weight"], glob["fc0.weight"])  # it trained
    assert hook_count(model) == hooks  # no stacked hooks after 5 rounds
    assert len(model.autograd_grad_sample_hooks) == hooks
    assert trainer.rounds == 5
    assert sum(n for _, _, n in trainer.ledger.history["local"]) == 5 * 4


class GrowingTraffic(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A client's window of network traffic: its size changes between rounds."""

    def __init__(self) -> None:
        self.full = data(200)
        self.size = 40

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.full[i]


def test_sample_rate_recomputed_when_dataset_changes(caplog: pytest.LogCaptureFixture) -> None:
    ds = GrowingTraffic()
    loader = DataLoader(ds, batch_size=8)
    trainer = DPTrainer(MLP(5, 3, [8]), sgd(), config=DPConfig(noise_multiplier=1.2))

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        warnings.warn("user code warns", UserWarning, stacklevel=2)
        return nn.functional.cross_entropy(out, y)

    seen = []
    with caplog.at_level(logging.INFO, logger="tessera.privacy.opacus"):
        for size in (40, 64, 20):
            ds.size = size
            with pytest.warns(UserWarning, match="user code warns"):  # not swallowed by DPTrainer
                trainer.train(loader, loss_fn=loss_fn)
            seen.append((trainer.sample_rate, trainer.optimizer.expected_batch_size, trainer.dataset_size))
    # Oracle: Opacus' make_private convention q = 1/len(loader), expected batch = int(n q), an epoch = int(1/q) steps
    assert seen == [(1 / 5, 8, 40), (1 / 8, 8, 64), (1 / 3, 6, 20)]
    assert trainer.ledger.history["local"] == [(1.2, 1 / 5, 5), (1.2, 1 / 8, 8), (1.2, 1 / 3, 3)]
    acc = RDPAccountant()
    acc.history = [(1.2, 1 / 5, 5), (1.2, 1 / 8, 8), (1.2, 1 / 3, 3)]
    assert trainer.ledger.epsilon("local") == pytest.approx(acc.get_epsilon(delta=DELTA), abs=1e-9)
    changes = [r for r in caplog.records if "sample rate" in r.getMessage()]
    assert len(changes) == 2  # 40 -> 64 and 64 -> 20 reported


def test_noise_zero_huge_clip_equals_plain_sgd_on_the_same_poisson_batches() -> None:
    # Prepare: the same start, the same data
    torch.manual_seed(1)
    model = MLP(5, 3, [8])
    ref = MLP(5, 3, [8])
    ref.load_state_dict(model.state_dict())
    loader = DataLoader(data(40), batch_size=8)
    trainer = DPTrainer(model, sgd(0.5), config=DPConfig(noise_multiplier=0.0, max_grad_norm=1e6, reproducible=True))
    # Execute: tessera DP-SGD, no noise, clipping inactive
    metrics = trainer.train(loader, loss_fn=nn.CrossEntropyLoss(), epochs=2, seed=7)
    # Oracle: vanilla SGD over the very same Poisson batches, gradient = sum of per-example grads / expected batch
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    batches = DPDataLoader.from_data_loader(loader, generator=round_generators(7)[0])
    steps = 0
    for _ in range(2):
        for xb, yb in batches:
            opt.zero_grad()
            (nn.functional.cross_entropy(ref(xb), yb, reduction="sum") / 8).backward()
            opt.step()
            steps += 1
    assert metrics["steps"] == steps == 10
    assert metrics["epsilon"] == float("inf") and "local" not in trainer.ledger.history  # no noise, no privacy
    for k, v in get_params(ref).items():
        torch.testing.assert_close(trainer.params()[k], v, rtol=0, atol=1e-6)


def per_example_clipped_mean(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bounds: list[float] | float
                             ) -> dict[str, torch.Tensor]:
    """Hand-computed DP-SGD gradient (no noise): per-example grads, clipped flat or per tensor, averaged."""
    names = [n for n, _ in model.named_parameters()]
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
        if isinstance(bounds, float):
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
            grads = {n: g * min(1.0, bounds / (float(norm) + 1e-6)) for n, g in grads.items()}
        else:
            grads = {n: grads[n] * min(1.0, b / (float(grads[n].norm()) + 1e-6)) for n, b in zip(names, bounds,
                                                                                                  strict=True)}
        for n in names:
            total[n] += grads[n]
    return {n: t / len(x) for n, t in total.items()}


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_clipping_bound_matches_hand_computed_per_example_clipping(clipping: str) -> None:
    # Prepare: one full-batch step (q = 1), no noise, a clip bound far below the raw gradient norms
    model = MLP(5, 3, [8])
    ref = MLP(5, 3, [8])
    ref.load_state_dict(model.state_dict())
    ds = data(12)
    clip = 0.05
    trainer = DPTrainer(model, sgd(1.0), config=DPConfig(noise_multiplier=0.0, max_grad_norm=clip,
                                                          clipping=clipping))  # type: ignore[arg-type]
    before = get_params(model)
    # Execute
    trainer.train(DataLoader(ds, batch_size=12), loss_fn=nn.CrossEntropyLoss())
    step = {k: before[k] - v for k, v in trainer.params().items()}  # lr = 1: the step is the DP gradient
    # Assert: equals hand clipping, and the bound holds (flat: whole step <= C; per layer: each tensor <= C/sqrt(4))
    bounds: list[float] | float = clip if clipping == "flat" else [clip / 2.0] * 4
    expected = per_example_clipped_mean(ref, *ds.tensors, bounds)
    for k, v in step.items():
        torch.testing.assert_close(v, expected[k], rtol=1e-4, atol=1e-7)
    if clipping == "flat":
        assert float(torch.sqrt(sum(s.pow(2).sum() for s in step.values()))) <= clip + 1e-6
    else:
        assert all(float(s.norm()) <= clip / 2 + 1e-6 for s in step.values())


def test_target_epsilon_becomes_noise_for_planned_rounds_and_budget_stops_the_next() -> None:
    loader = DataLoader(data(40), batch_size=10)
    cfg = DPConfig(target_epsilon=2.0, planned_rounds=4, delta=DELTA, reproducible=True)
    trainer = DPTrainer(MLP(5, 3, [8]), sgd(), config=cfg)
    for rnd in range(4):
        trainer.train(loader, loss_fn=nn.CrossEntropyLoss(), seed=rnd)
    # Oracle: Opacus' own search for 4 rounds x 4 steps at q = 1/4
    assert trainer.noise_multiplier == get_noise_multiplier(target_epsilon=2.0, target_delta=DELTA, sample_rate=0.25,
                                                            steps=16, accountant="rdp")
    eps = trainer.ledger.epsilon("local")
    assert 2.0 - 0.05 < eps <= 2.0
    before = trainer.params()
    with pytest.raises(PrivacyBudgetExceeded, match="nothing was run"):
        trainer.train(loader, loss_fn=nn.CrossEntropyLoss(), seed=9)
    assert trainer.ledger.epsilon("local") == eps
    assert all(torch.equal(v, trainer.params()[k]) for k, v in before.items())


def test_epsilon_equals_opacus_privacy_engine_alone() -> None:
    # Opacus alone: make_private once, three epochs, its own accountant
    torch.manual_seed(0)
    model = MLP(5, 3, [8])
    loader = DataLoader(data(48), batch_size=12)
    engine = PrivacyEngine(accountant="rdp")
    pm, opt, dl = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      data_loader=loader, noise_multiplier=0.9, max_grad_norm=1.0)
    for _ in range(3):
        for xb, yb in dl:
            opt.zero_grad()
            nn.functional.cross_entropy(pm(xb), yb).backward()
            opt.step()
    # tessera: three rounds of one epoch each
    trainer = DPTrainer(MLP(5, 3, [8]), sgd(), config=DPConfig(noise_multiplier=0.9, delta=DELTA))
    for _ in range(3):
        trainer.train(loader, loss_fn=nn.CrossEntropyLoss())
    assert trainer.ledger.epsilon("local") == pytest.approx(engine.get_epsilon(delta=DELTA), abs=1e-9)


def test_unsupported_layers_and_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="GroupNorm"):
        DPTrainer(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)), sgd(), config=DPConfig(noise_multiplier=1.0))
    with pytest.raises(ConfigError, match="exactly one"):
        DPConfig()
    with pytest.raises(ConfigError, match="planned_rounds"):
        DPConfig(target_epsilon=3.0)
    with pytest.raises(ConfigError, match="no privacy"):
        DPConfig(noise_multiplier=0.0, budget=1.0)
    with pytest.raises(ConfigError, match="max_grad_norm"):
        DPConfig(noise_multiplier=1.0, max_grad_norm=0.0)


def test_round_loss_is_the_example_weighted_mean_of_the_step_losses() -> None:
    # Prepare: a loss function that records what each step saw (the oracle, summed in Python floats)
    seen: list[tuple[float, int]] = []

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(out, y)
        seen.append((float(loss), len(y)))
        return loss

    trainer = DPTrainer(MLP(5, 3, [8]), sgd(), config=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    # Execute: two epochs of Poisson batches (some may be empty: a noise-only step with no loss)
    metrics = trainer.train(DataLoader(data(40), batch_size=8), loss_fn=loss_fn, epochs=2, seed=3)
    # Assert
    kept = [(v, n) for v, n in seen if n]
    assert metrics["steps"] == 10.0 and kept
    assert metrics["loss"] == pytest.approx(sum(v * n for v, n in kept) / sum(n for _, n in kept), rel=1e-6)
