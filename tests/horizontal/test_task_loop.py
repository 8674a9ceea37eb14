"""SupervisedTask.train against the loop it replaced (losses kept as tensors, every step through scaled_step).

Oracle: the reference below is the previous implementation, written out; the new loop (loss read per step on the
CPU, backward and step called directly when there is no scaler or correction) must give the same params to the
bit and the same loss metric to the bit, for the plain loop, a step cap, FedProx's term and SCAFFOLD's correction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tessera.core.device import scaled_step
from tessera.core.types import Metrics
from tessera.horizontal.task import SupervisedTask, _train_metrics


def _reference_train(task: SupervisedTask, model: nn.Module, loader: DataLoader[Any],
                     config: Mapping[str, Any]) -> Metrics:
    epochs = int(config.get("local_epochs", 1))
    max_steps = int(config.get("max_steps", 0)) or None
    mu = float(config.get("proximal_mu", 0.0))
    correction = config.get("grad_correction")
    named = dict(model.named_parameters())
    anchor = {k: p.detach().clone() for k, p in named.items()} if mu > 0 else None
    optimizer = task.optimizer_fn([p for p in model.parameters() if p.requires_grad])
    model.train()
    losses: list[torch.Tensor] = []
    sizes: list[int] = []
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss_fn(model(xb), yb)
            objective = loss
            if anchor is not None:
                objective = loss + 0.5 * mu * sum((named[k] - anchor[k]).pow(2).sum() for k in anchor)
            with scaled_step(None, optimizer, objective):
                if correction is not None:
                    for k, p in named.items():
                        if p.grad is not None and k in correction:
                            p.grad.add_(correction[k])
            losses.append(loss.detach())
            sizes.append(len(yb))
            if max_steps is not None and len(losses) >= max_steps:
                return _train_metrics(losses, sizes)
    return _train_metrics(losses, sizes)


def _setup() -> tuple[SupervisedTask, DataLoader[Any]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(70, 6, generator=g), torch.randint(0, 3, (70,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # 70 rows: a short last batch
    task = SupervisedTask(model_fn=lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
                          loss_fn=nn.CrossEntropyLoss(),
                          optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                          data_fn=lambda cid: (loader, None))
    return task, loader


def _correction(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: 0.01 * torch.randn(p.shape, generator=g) for k, p in model.named_parameters()}


@pytest.mark.parametrize("extra", ["none", "max_steps", "proximal_mu", "grad_correction"])
def test_the_loop_gives_the_bits_of_the_previous_one(extra: str) -> None:
    task, loader = _setup()
    torch.manual_seed(3)
    start = task.model_fn().state_dict()
    models = []
    for _ in range(2):
        model = task.model_fn()
        model.load_state_dict(start)
        models.append(model)
    config: dict[str, Any] = {"local_epochs": 2}
    if extra == "max_steps":
        config["max_steps"] = 7
    elif extra == "proximal_mu":
        config["proximal_mu"] = 0.5
    elif extra == "grad_correction":
        config["grad_correction"] = _correction(models[0])
    got = task.train(models[0], loader, config)
    want = _reference_train(task, models[1], loader, config)
    assert got == want  # loss (float64 sum in step order) and steps, to the bit
    for (k, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        assert torch.equal(a, b), k


class _FrozenNorm(nn.Module):
    """A module whose train() does more than set the flag (keeps its norm layer in eval, as fine-tuning code does)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(6)
        self.calls = 0

    def train(self, mode: bool = True) -> _FrozenNorm:
        self.calls += 1
        super().train(mode)
        self.norm.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norm(x)
        return out


def test_train_puts_the_model_in_training_mode_as_model_train_does() -> None:
    task, loader = _setup()
    model = task.model_fn()
    model.get_submodule("1").eval()  # one submodule left in eval (after an evaluate or a dry run)
    task.train(model, loader, {"max_steps": 1})
    assert all(m.training for m in model.modules())
    frozen = _FrozenNorm()
    custom = nn.Sequential(frozen, nn.Linear(6, 3))
    custom_task = SupervisedTask(model_fn=lambda: custom, loss_fn=nn.CrossEntropyLoss(),
                                 optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1), data_fn=lambda cid: (loader, None))
    for _ in range(2):  # already in training mode: an overriding train() still runs, every time
        custom_task.train(custom, loader, {"max_steps": 1})
    assert frozen.calls == 2 and not frozen.norm.training and custom.get_submodule("1").training
