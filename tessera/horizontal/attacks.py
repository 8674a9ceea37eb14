"""Simulated Byzantine clients, for tests, demos and robustness experiments. Never part of a real deployment.

`UpdateAttack` is a client Mod: the clients it names train honestly, then replace their update y (from the
global x) before it leaves:

    sign_flip    x - scale (y - x)          (a gradient-ascent client, scaled up)
    scale        x + scale (y - x)
    gaussian     x + N(0, std^2)            (noise instead of an update; seeded by the round's client seed)
    nan / inf    y with every float entry NaN / +Inf
    wrong_shape  y with one tensor one element longer

`LabelFlipTask` wraps a Task so the named clients train on labels y -> num_classes - 1 - y (data poisoning: the
update looks like an honest one). NaN/Inf and wrong shapes are refused by the server's `validate_fit` and counted
as failures; the others are what robust aggregators are for.

>>> from tessera.horizontal.attacks import AttackKind, UpdateAttack
>>> mod = UpdateAttack(AttackKind.SIGN_FLIP, clients=frozenset({"c0", "c1", "c2"}), scale=10.0)
>>> # JobParts(..., mods=[mod])
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tessera.core.errors import ConfigError
from tessera.core.types import Metrics, Params
from tessera.horizontal.client import CallNext, ClientContext
from tessera.horizontal.task import Task, task_get_params, task_set_params
from tessera.runtime.messages import FitIns, FitRes


class AttackKind(StrEnum):
    SIGN_FLIP = "sign_flip"
    SCALE = "scale"
    GAUSSIAN = "gaussian"
    NAN = "nan"
    INF = "inf"
    WRONG_SHAPE = "wrong_shape"


def corrupt(kind: AttackKind, current: Params, honest: Params, *, scale: float = 10.0, std: float = 1.0,
            seed: int = 0) -> Params:
    """The update a Byzantine client sends instead of `honest` (pure; float tensors only are touched)."""
    gen = torch.Generator().manual_seed(seed)
    out: Params = {}
    grown = False
    for k, x in current.items():
        y = honest[k]
        if not x.is_floating_point():
            out[k] = y
        elif kind is AttackKind.SIGN_FLIP:
            out[k] = (x.double() - scale * (y.double() - x.double())).to(x.dtype)
        elif kind is AttackKind.SCALE:
            out[k] = (x.double() + scale * (y.double() - x.double())).to(x.dtype)
        elif kind is AttackKind.GAUSSIAN:
            out[k] = (x.double() + std * torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(x.dtype)
        elif kind is AttackKind.NAN:
            out[k] = torch.full_like(y, float("nan"))
        elif kind is AttackKind.INF:
            out[k] = torch.full_like(y, float("inf"))
        elif kind is AttackKind.WRONG_SHAPE and not grown:
            out[k] = torch.cat([y.reshape(-1), y.new_zeros(1)])
            grown = True
        else:
            out[k] = y
    return out


@dataclass(frozen=True)
class UpdateAttack:
    """A client Mod: clients in `clients` corrupt their fit replies with `kind` (see the module docstring)."""

    kind: AttackKind
    clients: frozenset[str]
    scale: float = 10.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.kind, AttackKind):
            object.__setattr__(self, "kind", AttackKind(self.kind))
        object.__setattr__(self, "clients", frozenset(self.clients))

    def __call__(self, msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
        reply = call_next(msg, ctx)
        if ctx.client not in self.clients or not isinstance(msg, FitIns) or not isinstance(reply, FitRes):
            return reply
        seed = int(msg.config.get("seed", 0))
        params = corrupt(self.kind, msg.params, reply.params, scale=self.scale, std=self.std, seed=seed)
        return FitRes(params=params, num_examples=reply.num_examples, metrics=reply.metrics, extras=reply.extras)


class _FlippedLabels(Dataset[Any]):
    def __init__(self, inner: Dataset[Any], num_classes: int) -> None:
        self.inner, self.num_classes = inner, num_classes

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        x, y = self.inner[i]
        return x, self.num_classes - 1 - y


class LabelFlipTask:
    """Wraps a Task: the named clients train on flipped labels (their test data stays honest)."""

    def __init__(self, task: Task, *, clients: Collection[str], num_classes: int) -> None:
        if num_classes < 2:
            raise ConfigError(f"LabelFlipTask: num_classes must be at least 2, got {num_classes}")
        self.task, self.clients, self.num_classes = task, frozenset(clients), num_classes

    def model_fn(self) -> nn.Module:
        return self.task.model_fn()

    def data_fn(self, client_id: str, round: int) -> tuple[DataLoader[Any], DataLoader[Any] | None]:
        train, test = self.task.data_fn(client_id, round)
        if client_id not in self.clients:
            return train, test
        flipped = DataLoader(_FlippedLabels(train.dataset, self.num_classes), batch_size=train.batch_size,
                             sampler=train.sampler, drop_last=train.drop_last, collate_fn=train.collate_fn)
        return flipped, test

    def train(self, model: nn.Module, loader: DataLoader[Any], config: Mapping[str, Any]) -> Metrics:
        return self.task.train(model, loader, config)

    def evaluate(self, model: nn.Module, loader: DataLoader[Any]) -> tuple[float, Metrics]:
        return self.task.evaluate(model, loader)

    def get_params(self, model: nn.Module) -> Params:
        return task_get_params(self.task, model)

    def set_params(self, model: nn.Module, params: Params) -> None:
        task_set_params(self.task, model, params)
