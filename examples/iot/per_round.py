"""IoT devices that see new readings every round: each round a device trains on a different subset of its
data, of a different size, under DP-SGD with one accountant per device for the whole federation.

Two spellings of the same job:
- `with_task`: a Task whose `data_fn(client_id, round)` returns that round's subset (tessera asks every round);
- `with_flmodel`: FLModel, one `fit(rounds=1)` per round with that round's arrays; the same DPSGD plugin object
  keeps every device's accountant, so epsilon composes across the calls.

Run: python examples/iot/per_round.py
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tessera
from tessera.horizontal.job import JobParts
from tessera.horizontal.simulation import simulate
from tessera.horizontal.strategies import FedAvg
from tessera.horizontal.task import SupervisedTask
from tessera.privacy import DPSGD

DEVICES = ["sensor0", "sensor1", "sensor2"]
ROUNDS = 4


def readings(device: str, rnd: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows `device` holds in round `rnd`: a fresh subset whose size changes from round to round."""
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng([DEVICES.index(device), rnd])
    size = int(rng.integers(60, 140))
    rows = rng.choice(len(y), size=size, replace=False)
    return (x[rows] / 16.0).astype(np.float32), y[rows].astype(np.int64)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def plugin() -> DPSGD:
    return DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, reproducible=True)


def with_task(rounds: int = ROUNDS) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    def data_fn(device: str, rnd: int) -> tuple[DataLoader[Any], None]:
        x, y = readings(device, rnd)
        return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=16), None

    task = SupervisedTask(model_fn=model, loss_fn=nn.CrossEntropyLoss(),
                          optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.2), data_fn=data_fn)
    parts = JobParts(task=task, strategy=FedAvg(fraction_evaluate=0.0), clients=list(DEVICES))
    history, params = simulate(parts, rounds=rounds, seed=0, plugins=[plugin()])
    return history.records, params


def with_flmodel(rounds: int = ROUNDS) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    fl = tessera.FLModel(parties=DEVICES, model=model(), loss_fn=nn.CrossEntropyLoss(),
                         optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.2), dp=plugin(), seed=0)
    records: list[dict[str, Any]] = []
    for rnd in range(1, rounds + 1):
        data = [readings(d, rnd) for d in DEVICES]
        history = fl.fit(x=[x for x, _ in data], y=[y for _, y in data], rounds=1, batch_size=16)
        records += history.records[-1:]
    return records, {k: v.detach().clone() for k, v in fl.model.state_dict().items()}


if __name__ == "__main__":
    records, _ = with_task()
    for r in records:
        print(f"round {r['round']}: epsilon " + ", ".join(f"{d}={e:.2f}" for d, e in sorted(r["epsilon"].items())))
