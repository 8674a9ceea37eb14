"""Robust aggregation cost: server time of one aggregate_fit per strategy vs FedAvg, by number of clients.

Model: MLP 1000-1000-10 (1,011,010 float32 parameters). Client updates are the global params plus Gaussian noise,
so every rule does its full work (no early exits). f = (n - 3) // 4 Byzantine clients tolerated (the most Bulyan
allows) for Krum, Multi-Krum and Bulyan; trimmed mean beta = 0.2. Each cell is the median of `--repeats` calls,
in process CPU time (everything runs on one thread, and the development machine is shared: wall time there swings
with other people's jobs).
ratio = the slowest of FedMedian / TrimmedMean / Bulyan over FedAvg at the largest client count (100 clients; 50
with --quick); target <= 5.

"gram floor" (Krum, Multi-Krum, Bulyan): what the float64 Gram matrix's multiply-adds alone cost, n(n+1)/2 dot
products of the model's length at this machine's float64 matrix-product peak (a 2000 x 2000 product, one thread,
measured in the same process), over FedAvg: no exact Krum-family rule can go below it here.
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


def dgemm_peak() -> float:
    """Float64 multiply-add rate (flop/s) of one thread on a large square product: best of 3."""
    a = torch.randn(2000, 2000, dtype=torch.float64)
    best = min(cpu_median(lambda: a @ a, 1) for _ in range(3))
    return 2 * 2000**3 / best


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
    peak = dgemm_peak()
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
            gram = n * (n + 1) * num_params / peak / times[("fedavg", n)] if "krum" in name or name == "bulyan" else "-"
            rows.append([n, name, times[(name, n)], times[(name, n)] / times[("fedavg", n)], gram])
    top = sizes[-1]
    ratio = max(times[(name, top)] for name in ("fedmedian", "trimmedmean", "bulyan")) / times[("fedavg", top)]
    columns = ["clients", "strategy", "seconds per aggregation", "x fedavg", "gram floor x fedavg"]
    report("robust_cost", columns, rows, ratio=ratio,
           ratio_means=f"slowest of median / trimmed mean / Bulyan over FedAvg at {top} clients, "
                                    f"{num_params:,} params (target <= 5)",
           extra={"num_params": num_params, "threads": 1, "dgemm_flops_per_s": peak})


if __name__ == "__main__":
    main()
