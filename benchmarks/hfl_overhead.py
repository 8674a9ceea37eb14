"""HFL simulation overhead: tessera in-process FedAvg vs the same local training as a plain PyTorch loop.

10 clients (IID digits), 5 rounds, 1 local epoch, MLP 64-64-10, SGD. Both sides train every client from the
same params with the same seeds and data order, then average by example count; the final params are checked
bit-identical so the ratio compares identical work. This is issue 22's "digits job (10 clients, 5 rounds)" too.

The two sides run in interleaved pairs; each run's process CPU time is recorded beside its wall time (the machine
is shared: CPU time is what another process's load does not inflate). ratio = median of the paired tessera /
plain PyTorch CPU-time ratios (target <= 1.05); the wall-time ratio is reported beside it. `--profile` writes a
pyinstrument profile of the tessera side to results/hfl_overhead_profile.txt.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, report

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
        global_params = {k: sum(p[k].double() * (n / total) for p, n in new).float()  # type: ignore[union-attr]
                         for k in global_params}
    return global_params


def tessera_run(task: SupervisedTask) -> dict[str, torch.Tensor]:
    parts = JobParts(task=task, strategy=FedAvg(fraction_evaluate=0.0), clients=[f"c{i}" for i in range(CLIENTS)])
    return simulate(parts, rounds=ROUNDS, seed=SEED)[1]


def timed(fn: Any) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def profile(task: SupervisedTask, runs: int = 10) -> None:
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005)
    with profiler:
        for _ in range(runs):
            tessera_run(task)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hfl_overhead_profile.txt").write_text(profiler.output_text(unicode=False, color=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also profile the tessera side (pyinstrument)")
    args = ap.parse_args()
    repeats = 2 if args.quick else args.repeats
    torch.set_num_threads(1)
    data, task = setup()
    start = initial_params(task, SEED)
    ref, got = plain(data, start), tessera_run(task)
    max_diff = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    assert max_diff == 0.0, f"tessera and the plain loop disagree by {max_diff}: not the same work"
    if args.profile:
        profile(task)
    # Interleave the two so drift on a shared machine hits both alike; ratios are medians of paired ratios.
    plain_s: list[tuple[float, float]] = []
    tessera_s: list[tuple[float, float]] = []
    for _ in range(repeats):
        plain_s.append(timed(lambda: plain(data, start)))
        tessera_s.append(timed(lambda: tessera_run(task)))

    def paired(i: int) -> float:
        return statistics.median(t[i] / p[i] for t, p in zip(tessera_s, plain_s, strict=True))

    def row(name: str, s: list[tuple[float, float]]) -> list[Any]:
        return [name, statistics.median(w for w, _ in s), min(w for w, _ in s), statistics.median(c for _, c in s)]

    cpu_ratios = sorted(t[1] / p[1] for t, p in zip(tessera_s, plain_s, strict=True))
    spread = [cpu_ratios[0], *statistics.quantiles(cpu_ratios, n=4, method="inclusive"), cpu_ratios[-1]]
    print(f"wall-time ratio {paired(0):.4f} (median of paired wall times); paired CPU ratios min / q1 / median / "
          f"q3 / max: {' / '.join(f'{x:.4f}' for x in spread)}")
    report("hfl_overhead", ["run", "median wall s", "min wall s", "median CPU s"],
           [row("plain PyTorch loop", plain_s), row("tessera FedAvg (in-process)", tessera_s)],
           ratio=paired(1), ratio_means="median of paired tessera / plain PyTorch CPU times (target <= 1.05)",
           extra={"clients": CLIENTS, "rounds": ROUNDS, "max_param_diff": max_diff, "repeats": repeats,
                  "wall_ratio": paired(0),
                  "paired_cpu_ratio_min_q1_median_q3_max": spread})


if __name__ == "__main__":
    main()
