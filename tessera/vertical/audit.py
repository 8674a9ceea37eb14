"""Activation privacy, measured: train one split model under a set of protections and run both attacks on it.

- Model inversion (`attacks.inversion_attack`): the label party decodes the data owner's features from the
  embeddings it receives, after training a decoder on `aux` rows whose features it knows.
- Label inference (`attacks.GradientSpy`): the data owner scores labels from the gradients it receives (norm and
  direction attacks, the larger AUC is reported).

The task: one data owner ("owner", all feature columns) and a label party without a base ("label"), so every bit
of accuracy and every leak goes through the protected embedding. `sweep` runs a list of settings for the plot of
attack success against accuracy (benchmarks/split_privacy.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tessera.runtime.backend import InProcessBackend
from tessera.vertical.attacks import GradientSpy, inversion_attack
from tessera.vertical.messages import ForwardIns
from tessera.vertical.model import ConcatFuse
from tessera.vertical.owner import DataOwner, OwnerGroup
from tessera.vertical.protections import Protections
from tessera.vertical.trainer import SplitTrainer


@dataclass(frozen=True)
class Task:
    """Rows split three ways: `train` (the model), `aux` (the attacker's known features), `target` (attacked)."""

    x: torch.Tensor
    y: torch.Tensor
    train: torch.Tensor
    aux: torch.Tensor
    target: torch.Tensor
    embedding: int = 16
    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05


@dataclass(frozen=True)
class Measured:
    name: str
    accuracy: float  # on the target rows
    inversion_r2: float  # model inversion success (0 = nothing recovered)
    label_auc: float  # label inference success (0.5 = chance)


def synthetic_task(*, rows: int = 800, cols: int = 8, seed: int = 0) -> Task:
    """Correlated Gaussian features, a linear-threshold label: a task the embedding must carry features for."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(rows, cols, generator=g) @ (torch.eye(cols) + mix)
    y = ((x @ torch.randn(cols, generator=g)) > 0).float().unsqueeze(1)
    perm = torch.randperm(rows, generator=g)
    half, quarter = rows // 2, rows // 4
    return Task(x=x, y=y, train=perm[:half], aux=perm[half : half + quarter], target=perm[half + quarter :])


def measure(name: str, protections: Protections, task: Task, *, seed: int = 0) -> Measured:
    """Train under `protections`, then attack: returns accuracy and both attacks' success."""
    torch.manual_seed(seed)
    cols = task.x.shape[1]
    base = nn.Sequential(nn.Linear(cols, 16), nn.ReLU(), nn.Linear(16, task.embedding), nn.Tanh())
    fuse = ConcatFuse(nn.Sequential(nn.Linear(task.embedding, 8), nn.ReLU(), nn.Linear(8, 1)))

    def opt(p: Any) -> torch.optim.Optimizer:
        return torch.optim.Adam(p, lr=task.lr)

    owner = DataOwner("owner", base, opt, data={"train": task.x[task.train], "all": task.x}, seed=seed,
                      embedding_dp=protections.embedding_dp, decorrelation=protections.decorrelation)
    spy = GradientSpy(OwnerGroup([owner]))
    trainer = SplitTrainer(fuse=fuse, loss_fn=nn.BCEWithLogitsLoss(), optimizer_fn=opt, label_party="label",
                           order=["owner"], backend=InProcessBackend(spy), protections=protections, seed=seed)
    trainer.add_split("train", y=task.y[task.train])
    trainer.fit(epochs=task.epochs, batch_size=task.batch_size)
    labels = spy.report(task.y[task.train])
    trainer.add_split("all", y=task.y)
    emb = trainer.backend.exchange({"owner": ForwardIns(step=0, split="all", rows=torch.arange(len(task.x)),
                                                        mode="eval")})["owner"].embedding
    with torch.no_grad():
        acc = float(((fuse([emb[task.target]]) > 0).float() == task.y[task.target]).float().mean())
    r2 = inversion_attack(emb[task.aux], task.x[task.aux], emb[task.target], task.x[task.target], seed=seed)
    return Measured(name=name, accuracy=acc, inversion_r2=r2,
                    label_auc=max(labels["norm_attack_auc"], labels["direction_attack_auc"]))


def sweep(settings: Sequence[tuple[str, Protections]], task: Task, *, seed: int = 0,
          progress: Callable[[Measured], None] | None = None) -> list[Measured]:
    out = []
    for name, prot in settings:
        out.append(measure(name, prot, task, seed=seed))
        if progress is not None:
            progress(out[-1])
    return out
