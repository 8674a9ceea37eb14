"""Small builders shared by the horizontal tests."""

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tessera.core.models import MLP
from tessera.horizontal.simulation import JobParts
from tessera.horizontal.strategies import FedAvg, Strategy
from tessera.horizontal.task import SupervisedTask


def make_data(num_clients: int = 3, rows: int = 24, features: int = 5, classes: int = 3,
              seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sizes = [rows + 7 * i for i in range(num_clients)]  # unequal sizes so weighting matters
    return {f"c{i}": (torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g))
            for i, n in enumerate(sizes)}


def make_task(data: dict[str, tuple[torch.Tensor, torch.Tensor]], *, batch_size: int = 8, lr: float = 0.1,
              hidden: tuple[int, ...] = (8,), features: int = 5, classes: int = 3, shuffle: bool = True,
              fail: set[str] | None = None) -> SupervisedTask:
    def data_fn(cid: str) -> tuple[DataLoader[Any], DataLoader[Any]]:
        if fail and cid in fail:
            raise RuntimeError(f"disk of {cid} is unplugged")
        x, y = data[cid]
        ds = TensorDataset(x, y)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle), DataLoader(ds, batch_size=64)

    return SupervisedTask(model_fn=lambda: MLP(features, classes, hidden), loss_fn=nn.CrossEntropyLoss(),
                          optimizer_fn=lambda p: torch.optim.SGD(p, lr=lr), data_fn=data_fn)


def make_parts(strategy: Strategy | None = None, **kw: Any) -> JobParts:
    data = make_data()
    return JobParts(task=make_task(data, **kw), strategy=strategy or FedAvg(), clients=list(data))


def params_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


__all__ = ["make_data", "make_parts", "make_task", "np", "params_equal"]
