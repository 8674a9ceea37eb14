"""Task: what a user writes to run their single-machine training federated.

A Task says how to build the model, how to train and evaluate it on a DataLoader, and which data a client holds.
`SupervisedTask` is the standard loop (loss, optimizer, epochs) so most users write no Task class at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from tessera.core.types import Metrics, Params, get_params, set_params

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFn = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]


class Task(Protocol):
    """Optional methods `get_params(model) -> Params` and `set_params(model, params)` choose which tensors travel
    (LoRA sends adapters only); without them the whole state dict does."""

    def model_fn(self) -> nn.Module: ...

    def data_fn(self, client_id: str) -> tuple[DataLoader[Any], DataLoader[Any] | None]: ...

    def train(self, model: nn.Module, loader: DataLoader[Any], config: Mapping[str, Any]) -> Metrics: ...

    def evaluate(self, model: nn.Module, loader: DataLoader[Any]) -> tuple[float, Metrics]: ...


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose argmax (or >0 for a single logit) equals the label."""
    if logits.ndim == 1 or logits.shape[-1] == 1:
        pred = (logits.reshape(-1) > 0).long()
    else:
        pred = logits.argmax(dim=-1)
    return float((pred == y.reshape(-1).long()).float().mean())


class SupervisedTask:
    """The standard supervised loop, configured per round by the strategy.

    Round config keys it honours: `local_epochs`, `max_steps` (stop after that many optimizer steps: deadline
    rounds), `proximal_mu` (FedProx: adds mu/2 ||w - w_global||^2), and `grad_correction` (a Params added to the
    gradients before every step: SCAFFOLD's c - c_i).
    """

    def __init__(
        self,
        *,
        model_fn: Callable[[], nn.Module],
        loss_fn: LossFn,
        optimizer_fn: OptimizerFn,
        data_fn: Callable[[str], tuple[DataLoader[Any], DataLoader[Any] | None]],
        metrics: Mapping[str, MetricFn] | None = None,
    ) -> None:
        self._model_fn = model_fn
        self.loss_fn = loss_fn
        self.optimizer_fn = optimizer_fn
        self._data_fn = data_fn
        self.metrics = dict(metrics) if metrics is not None else {"accuracy": accuracy}

    def model_fn(self) -> nn.Module:
        return self._model_fn()

    def data_fn(self, client_id: str) -> tuple[DataLoader[Any], DataLoader[Any] | None]:
        return self._data_fn(client_id)

    def train(self, model: nn.Module, loader: DataLoader[Any], config: Mapping[str, Any]) -> Metrics:
        epochs = int(config.get("local_epochs", 1))
        max_steps = int(config.get("max_steps", 0)) or None
        mu = float(config.get("proximal_mu", 0.0))
        correction: Mapping[str, torch.Tensor] | None = config.get("grad_correction")
        named = dict(model.named_parameters())
        anchor = {k: p.detach().clone() for k, p in named.items()} if mu > 0 else None
        optimizer = self.optimizer_fn([p for p in model.parameters() if p.requires_grad])
        model.train()
        steps, total, count = 0, 0.0, 0
        for _ in range(epochs):
            for xb, yb in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss_fn(model(xb), yb)
                objective = loss
                if anchor is not None:
                    prox = sum((named[k] - anchor[k]).pow(2).sum() for k in anchor)
                    objective = loss + 0.5 * mu * prox
                objective.backward()  # type: ignore[no-untyped-call]
                if correction is not None:
                    for k, p in named.items():
                        if p.grad is not None and k in correction:
                            p.grad.add_(correction[k])
                optimizer.step()
                total += float(loss.detach()) * len(yb)
                count += len(yb)
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    return {"loss": total / max(count, 1), "steps": float(steps)}
        return {"loss": total / max(count, 1), "steps": float(steps)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader[Any]) -> tuple[float, Metrics]:
        model.eval()
        total, count = 0.0, 0
        outs, ys = [], []
        for xb, yb in loader:
            out = model(xb)
            total += float(self.loss_fn(out, yb)) * len(yb)
            count += len(yb)
            outs.append(out)
            ys.append(yb)
        if count == 0:
            return float("nan"), {}
        logits, y = torch.cat(outs), torch.cat(ys)
        return total / count, {name: fn(logits, y) for name, fn in self.metrics.items()}


def task_get_params(task: Task, model: nn.Module) -> Params:
    fn = getattr(task, "get_params", None)
    return fn(model) if fn is not None else get_params(model)


def task_set_params(task: Task, model: nn.Module, params: Params) -> None:
    fn = getattr(task, "set_params", None)
    if fn is not None:
        fn(model, params)
    else:
        set_params(model, params)
