"""SecAgg+ and CKKS cost per round vs plain aggregation, by number of clients, model size and dropout rate.

Every protocol runs among in-process clients over the same wire path (InProcessBackend: each message encoded and
decoded as on a network), one process, clients one after another, so a "round" is the total compute of all
parties plus (de)serialisation; the network itself is not simulated, only counted (MB). Plain aggregation is:
every client sends its update as a FitRes, the server sums the survivors' updates.

    .venv/bin/python benchmarks/secagg_cost.py [--quick | --targets]

Rows "complete" use the complete graph (degree n - 1, classic SecAgg), the others the SecAgg+ degree chosen from
the dropout rate. `--targets` runs only issue 22's target rows: N=20 x 1M complete graph at 0% and 30% dropout
and 100 clients x 1M at 30% dropout.

"x cpu" is the same ratio in CPU seconds (all threads), steadier than wall time on a shared machine.
"consist. s" is the wall time of the consistency round (each survivor signs the survivor story; the server checks
the signatures), the round that the malicious-coordinator protection adds.

Headline: `ratio` = SecAgg+ / plain round time at 100 clients, 1M parameters, 30% dropout after masking
(--quick: 20 clients, 100k parameters, 30% dropout).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from common import best_of, report

from tessera.core.types import Params
from tessera.runtime.backend import InProcessBackend
from tessera.runtime.messages import FitIns, FitRes
from tessera.secagg import run_round
from tessera.secagg.ckks import simulate_ckks_round
from tessera.secagg.prg import PRG_NAME


class Updates(Sequence[Params]):
    """n deterministic random updates of `size` float32 values, built on demand (100 x 1M would be 400 MB)."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        g = torch.Generator().manual_seed(int(i))
        return {"w": torch.randn(self.size, generator=g) * 0.1}


class _PlainClients:
    def __init__(self, updates: Updates, drop: set[str]) -> None:
        self.updates, self.drop = updates, drop

    def handle(self, client: str, msg: Any) -> Any:
        if client in self.drop:
            raise ConnectionError("client went offline")
        return FitRes(params=self.updates[int(client.removeprefix("client"))], num_examples=1)


def plain_round(updates: Updates, dropped: set[int]) -> tuple[float, int, float]:
    """Median of 3 (it is short and noisy); bytes of one round; mean CPU seconds of one round."""
    clients = [f"client{i}" for i in range(len(updates))]
    backend = InProcessBackend(_PlainClients(updates, {clients[i] for i in dropped}))

    def one() -> None:
        replies = backend.exchange({c: FitIns(round=1, params={}) for c in clients})
        total = torch.zeros(updates.size, dtype=torch.float64)
        for r in replies.values():
            if isinstance(r, FitRes):
                total += r.params["w"].double()

    cpu0 = time.process_time()
    seconds, _ = best_of(one, 3)
    return seconds, backend.traffic.up // 3, (time.process_time() - cpu0) / 3


def secagg_round(updates: Updates, dropped: set[int], rate: float, *,
                 complete: bool = False) -> tuple[float, int, int, float, float]:
    """Round seconds (median of 3 like the plain round, where rounds are short: n x params <= 20M), bytes up,
    degree, the seconds of the consistency round (malicious-server protection), and the round's mean CPU seconds
    (all threads)."""
    repeats = 3 if len(updates) * updates.size <= 20_000_000 else 1
    reps = []

    def one() -> None:
        reps.append(run_round(updates, threshold=0.6, dropouts=dropped, clip=8.0, bits=32, seed=0,
                              dropout=max(rate, 0.05), degree=len(updates) - 1 if complete else None))

    cpu0 = time.process_time()
    seconds, _ = best_of(one, repeats)
    rep = reps[-1]
    return (seconds, rep.bytes_up, rep.server.state.setup.degree, rep.server.seconds.get("consistency", 0.0),
            (time.process_time() - cpu0) / repeats)


def ckks_round(updates: Updates, dropped: set[int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    _, _, backend = simulate_ckks_round(updates, dropouts=dropped)
    return time.perf_counter() - t0, backend.traffic.up


def cases(args: argparse.Namespace) -> list[tuple[int, int, float, bool]]:
    """(clients, params, dropout rate, complete graph) for each row."""
    if args.targets:
        return [(20, 1_000_000, 0.0, True), (20, 1_000_000, 0.3, True), (100, 1_000_000, 0.3, False)]
    clients = (5, 10, 20) if args.quick else (10, 50, 100)
    sizes = (10_000, 100_000) if args.quick else (100_000, 1_000_000)
    out = [(n, size, rate, False) for n in clients for size in sizes for rate in (0.0, 0.3)]
    if not args.quick:
        out[4:4] = [(20, 1_000_000, 0.0, True), (20, 1_000_000, 0.3, True)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--targets", action="store_true", help="only the N=20 complete-graph and 100 x 1M rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # dropouts are deliberate here
    ckks_max = (20, 10_000) if args.quick else (100, 100_000)  # CKKS rows up to this many clients / params
    head = (20, 100_000, 0.3) if args.quick else (100, 1_000_000, 0.3)
    first = 5 if args.quick else 10
    rows: list[list[Any]] = []
    headline = float("nan")
    for n, size, rate, complete in cases(args):
        updates = Updates(n, size)
        dropped = set(np.random.default_rng(n).choice(n, size=round(rate * n), replace=False).tolist())
        plain_s, plain_b, plain_cpu = plain_round(updates, dropped)
        sa_s, sa_b, degree, check_s, sa_cpu = secagg_round(updates, dropped, rate, complete=complete)
        row = ["secagg" + (" complete" if complete else ""), n, size, f"{rate:.0%}", degree, sa_s, plain_s,
               sa_s / plain_s, sa_cpu / plain_cpu, sa_b / n / 1e6, sa_b / plain_b, check_s]
        rows.append(row)
        print(row, flush=True)
        if (n, size, rate) == head and not complete:
            headline = sa_s / plain_s
        ckks_row = (n <= ckks_max[0] and size <= ckks_max[1]) or (n == first and not args.quick)
        if ckks_row and not complete and not args.targets:
            ck_s, ck_b = ckks_round(updates, dropped)
            rows.append(["ckks", n, size, f"{rate:.0%}", "-", ck_s, plain_s, ck_s / plain_s, "-",
                         ck_b / n / 1e6, ck_b / plain_b, "-"])
            print(rows[-1], flush=True)
    report("secagg_cost", ["proto", "n", "params", "drop", "deg", "round s", "plain s", "x time", "x cpu", "MB up/cl",
                           "x bytes", "consist. s"], rows, ratio=headline,
           ratio_means=f"SecAgg+ / plain round time at {head[0]} clients, {head[1]:,} params, "
                       f"{head[2]:.0%} dropout after masking (one process, all parties' compute)",
           extra={"quick": args.quick, "targets": args.targets, "threshold": 0.6, "bits": 32, "clip": 8.0,
                  "prg": PRG_NAME})


if __name__ == "__main__":
    main()
