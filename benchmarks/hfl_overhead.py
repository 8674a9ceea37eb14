"""HFL simulation overhead: tessera in-process FedAvg vs the same local training as a plain PyTorch loop.

10 clients (IID digits), 5 rounds, 1 local epoch, MLP 64-64-10, SGD. Both sides train every client from the
same params with the same seeds and data order, then average by example count; the final params are checked
equal so the ratio compares identical work. ratio = tessera time / plain PyTorch time (target <= 1.10).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, report

from tessera.core.datasets import digits
from tessera.core.models import MLP
from tessera.core.types import get_params, set_params
from tessera.horizontal.client import client_seed
from tessera.horizontal.partition import iid
from tessera.horizontal.simulation import JobParts, initial_params, simulate
from tessera.horizontal.strategies import FedAvg
from tessera.horizontal.task import SupervisedTask

CLIENTS, ROUNDS, BATCH, LR, SEED = 10, 5, 16, 0.05, 0


def setup() -> tuple[dict[str, TensorDataset], SupervisedTask]:
    x, y = digits()
    parts = iid(len(y), CLIENTS, np.random.default_rng(SEED))
    data = {f"c{i}": TensorDataset(torch.from_numpy(x[p]), torch.from_numpy(y[p])) for i, p in enumerate(parts)}

    def data_fn(cid: str) -> tuple[DataLoader[Any], None]:
        return DataLoader(data[cid], batch_size=BATCH, shuffle=True), None

    task = SupervisedTask(model_fn=lambda: MLP(64, 10, (64,)), loss_fn=nn.CrossEntropyLoss(),
                          optimizer_fn=lambda p: torch.optim.SGD(p, lr=LR), data_fn=data_fn)
    return data, task


def plain(data: dict[str, TensorDataset], start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a user writes by hand: loop over clients, train locally, average state dicts by example count."""
    model = MLP(64, 10, (64,))
    loss_fn = nn.CrossEntropyLoss()
    global_params = {k: v.clone() for k, v in start.items()}
    loaders = {c: DataLoader(ds, batch_size=BATCH, shuffle=True) for c, ds in data.items()}
    for rnd in range(1, ROUNDS + 1):
        new: list[tuple[dict[str, torch.Tensor], int]] = []
        for cid, loader in loaders.items():
            set_params(model, global_params)
            torch.default_generator.manual_seed(client_seed(SEED, rnd, cid))  # CPU-only seeding, as tessera does
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            for xb, yb in loader:
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
            new.append((get_params(model), len(loader.dataset)))  # type: ignore[arg-type]
        total = sum(n for _, n in new)
        global_params = {k: sum(p[k].double() * (n / total) for p, n in new).float()  # type: ignore[misc]
                         for k in global_params}
    return global_params


def tessera_run(task: SupervisedTask) -> dict[str, torch.Tensor]:
    parts = JobParts(task=task, strategy=FedAvg(fraction_evaluate=0.0), clients=[f"c{i}" for i in range(CLIENTS)])
    return simulate(parts, rounds=ROUNDS, seed=SEED)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    repeats = 2 if args.quick else args.repeats
    torch.set_num_threads(1)
    data, task = setup()
    start = initial_params(task, SEED)
    ref, got = plain(data, start), tessera_run(task)
    max_diff = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    assert max_diff < 1e-5, f"tessera and the plain loop disagree by {max_diff}: not the same work"
    # Interleave the two so drift on a shared machine hits both alike; the ratio is the median of paired ratios.
    s_plain: list[float] = []
    s_tessera: list[float] = []
    for _ in range(repeats):
        s_plain += best_of(lambda: plain(data, start), 1)[1]
        s_tessera += best_of(lambda: tessera_run(task), 1)[1]
    t_plain, t_tessera = statistics.median(s_plain), statistics.median(s_tessera)
    ratio = statistics.median(t / p for t, p in zip(s_tessera, s_plain, strict=True))
    report("hfl_overhead", ["run", "median s", "min s", "max s"],
           [["plain PyTorch loop", t_plain, min(s_plain), max(s_plain)],
            ["tessera FedAvg (in-process)", t_tessera, min(s_tessera), max(s_tessera)]],
           ratio=ratio, ratio_means="median of paired tessera / plain PyTorch times (target <= 1.10)",
           extra={"clients": CLIENTS, "rounds": ROUNDS, "max_param_diff": max_diff, "repeats": repeats})


if __name__ == "__main__":
    main()
