"""Robust aggregation cost: server time of one aggregate_fit per strategy vs FedAvg, by number of clients.

Model: MLP 1000-1000-10 (1,011,010 float32 parameters). Client updates are the global params plus Gaussian noise,
so every rule does its full work (no early exits). f = (n - 3) // 4 Byzantine clients tolerated (the most Bulyan
allows) for Krum, Multi-Krum and Bulyan; trimmed mean beta = 0.2. Each cell is the median of `--repeats` calls,
in process CPU time (everything runs on one thread, and the development machine is shared: wall time there swings
with other people's jobs).
ratio = the slowest of FedMedian / TrimmedMean / Bulyan over FedAvg at the largest client count (100 clients; 50
with --quick); target <= 5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report

from tessera.core.models import MLP
from tessera.core.types import get_params
from tessera.horizontal.strategies import Bulyan, FedAvg, FedMedian, Krum, MultiKrum, Strategy, TrimmedMean
from tessera.runtime.messages import FitRes


def strategies(n: int) -> dict[str, Strategy]:
    f = max(0, (n - 3) // 4)
    return {"fedavg": FedAvg(), "fedmedian": FedMedian(), "trimmedmean": TrimmedMean(beta=0.2), "krum": Krum(f=f),
            "multikrum": MultiKrum(f=f), "bulyan": Bulyan(f=f)}


def cpu_median(fn: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        samples.append(time.process_time() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="10 and 50 clients, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [10, 50] if args.quick else [10, 50, 100]
    repeats = 1 if args.quick else args.repeats
    torch.manual_seed(0)
    current = get_params(MLP(1000, 10, (1000,)))
    num_params = sum(t.numel() for t in current.values())
    rows: list[list[object]] = []
    times: dict[tuple[str, int], float] = {}
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        results = [(f"c{i}", FitRes(params={k: v + 0.01 * torch.randn(v.shape, generator=gen)
                                            for k, v in current.items()}, num_examples=100)) for i in range(n)]
        for name, strategy in strategies(n).items():
            t = cpu_median(lambda s=strategy, r=results: s.aggregate_fit(1, r, current), repeats)
            times[(name, n)] = t
        for name in strategies(n):
            rows.append([n, name, times[(name, n)], times[(name, n)] / times[("fedavg", n)]])
    top = sizes[-1]
    ratio = max(times[(name, top)] for name in ("fedmedian", "trimmedmean", "bulyan")) / times[("fedavg", top)]
    report("robust_cost", ["clients", "strategy", "seconds per aggregation", "x fedavg"], rows, ratio=ratio,
           ratio_means=f"slowest of median / trimmed mean / Bulyan over FedAvg at {top} clients, "
                                    f"{num_params:,} params (target <= 5)",
           extra={"num_params": num_params, "threads": 1})


if __name__ == "__main__":
    main()
