"""Small builders shared by the vertical tests: joined data split by columns, and the centralised oracle."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tessera.vertical.model import ConcatFuse, SplitModel
from tessera.vertical.trainer import batch_order

COLUMNS = {"alice": 4, "bob": 6}


def make_data(rows: int = 60, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {p: torch.randn(rows, c, generator=g) for p, c in COLUMNS.items()}
    w = {p: torch.randn(c, generator=g) for p, c in COLUMNS.items()}
    logit = sum(x[p] @ w[p] for p in COLUMNS)
    return x, (logit > 0).float().unsqueeze(1)


def make_split(seed: int = 0, emb: int = 3) -> tuple[dict[str, nn.Module], nn.Module]:
    torch.manual_seed(seed)
    bases: dict[str, nn.Module] = {p: nn.Sequential(OrderedDict(fc=nn.Linear(c, emb), act=nn.Tanh()))
                                   for p, c in COLUMNS.items()}
    fuse = ConcatFuse(nn.Sequential(nn.Linear(emb * len(COLUMNS), 4), nn.ReLU(), nn.Linear(4, 1)))
    return bases, fuse


def train_central(model: SplitModel, x: dict[str, torch.Tensor], y: torch.Tensor, *, epochs: int, batch_size: int,
                  optimizer_fn: Callable[[Any], torch.optim.Optimizer], seed: int = 0,
                  shuffle: bool = True) -> list[float]:
    """Plain PyTorch training of the composed model on the joined data, in split training's batch order."""
    opt = optimizer_fn(model.parameters())
    loss_fn = nn.BCEWithLogitsLoss()
    losses = []
    model.train()
    for epoch in range(epochs):
        perm = batch_order(seed=seed, epoch=epoch, n=len(y), shuffle=shuffle)
        total = 0.0
        for i in range(0, len(y), batch_size):
            rows = perm[i : i + batch_size]
            loss = loss_fn(model({p: v[rows] for p, v in x.items()}), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
        losses.append(total / len(y))
    return losses


def composed(bases: dict[str, nn.Module], fuse: nn.Module, label_party: str = "alice") -> SplitModel:
    return SplitModel(copy.deepcopy(bases), copy.deepcopy(fuse), label_party=label_party)
