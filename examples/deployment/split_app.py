"""A split-learning app for `tessera party --split examples/deployment/split_app.py`.

Breast-cancer rows, split by columns: alice holds the first 15 features, bob the other 15, and the coordinator
("server", the label party) holds the diagnosis and the fuse model. Each party runs only its own function:

    tessera party --federation examples/deployment/federation_split.toml --name server --split \
        examples/deployment/split_app.py --out runs/split/server
    tessera party --federation examples/deployment/federation_split.toml --name alice --split \
        examples/deployment/split_app.py --out runs/split/alice          # and bob likewise

In a real deployment each organisation loads its own columns here (rows already aligned with
`tessera.vertical.psi.intersect`); this example slices one public data set so it runs anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tessera.core.datasets import breast_cancer
from tessera.runtime.backend import Backend
from tessera.vertical import ConcatFuse, DataOwner, SplitTrainer

COLUMNS = {"alice": slice(0, 15), "bob": slice(15, 30)}
EMBEDDING = 4
FIT: dict[str, Any] = {"epochs": 5, "batch_size": 64}  # SplitTrainer.fit arguments


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = breast_cancer()
    return torch.from_numpy(x), torch.from_numpy(y).float().unsqueeze(1)


def owner(name: str, out: Path) -> DataOwner:
    """A data owner: its base model on its own columns; state (base + optimiser) saved under `out`."""
    x, _ = _rows()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(list(COLUMNS).index(name))
        base = nn.Sequential(nn.Linear(15, EMBEDDING), nn.ReLU())
    return DataOwner(name, base, lambda p: torch.optim.SGD(p, lr=0.1), data={"train": x[:, COLUMNS[name]]},
                     state_dir=out)


def label_party(name: str, backend: Backend, out: Path) -> SplitTrainer:
    """The label party: labels, the fuse head, the loss; metrics and checkpoints go to `out`."""
    _, y = _rows()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100)
        fuse = ConcatFuse(nn.Linear(EMBEDDING * len(COLUMNS), 1))
    trainer = SplitTrainer(fuse=fuse, loss_fn=nn.BCEWithLogitsLoss(), optimizer_fn=lambda p: torch.optim.SGD(
        p, lr=0.1), label_party=name, order=list(COLUMNS), backend=backend, output_dir=out)
    trainer.add_split("train", y=y)
    return trainer
