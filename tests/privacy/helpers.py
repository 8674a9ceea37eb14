"""Small builders shared by the privacy tests: equal-sized clients so DP noise and budgets line up."""

import functools
from typing import Any

import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tessera.core.models import MLP
from tessera.horizontal.simulation import JobParts
from tessera.horizontal.strategies import FedAvg, Strategy
from tessera.horizontal.task import SupervisedTask

DELTA = 1e-5


@functools.lru_cache
def rdp(sigma: float, q: float, steps: int) -> float:
    """Opacus' RDPAccountant given the history directly (independent of tessera's cached path): the oracle."""
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return float(acc.get_epsilon(delta=DELTA))


def make_parts(*, clients: int = 3, rows: int = 32, batch_size: int = 8, lr: float = 0.1,
               strategy: Strategy | None = None, seed: int = 0) -> JobParts:
    g = torch.Generator().manual_seed(seed)
    data = {f"c{i}": TensorDataset(torch.randn(rows, 5, generator=g), torch.randint(0, 3, (rows,), generator=g))
            for i in range(clients)}

    def data_fn(cid: str) -> tuple[DataLoader[Any], DataLoader[Any]]:
        return DataLoader(data[cid], batch_size=batch_size, shuffle=False), DataLoader(data[cid], batch_size=64)

    task = SupervisedTask(model_fn=lambda: MLP(5, 3, [8]), loss_fn=nn.CrossEntropyLoss(),
                          optimizer_fn=lambda p: torch.optim.SGD(p, lr=lr), data_fn=data_fn)
    return JobParts(task=task, strategy=strategy or FedAvg(), clients=list(data))
