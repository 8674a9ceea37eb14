"""Round time and peak memory vs the number of virtual clients (10 sampled per round), in-process vs Ray.

Each (backend, clients) point runs in a fresh process so its peak RSS is its own. Clients are virtual: a client's
data (32 digits rows drawn by a seeded generator) is built only when it is sampled, so what grows with the total
number of clients is only the id list. Round 1 (imports, actor warm-up) is reported apart from the median of
the later rounds. A last point per backend samples 100 of 10,000 clients: that is what round time follows.
`ratio` = Ray's median round time at 10,000 clients / at 100 clients (near 1: cost follows the clients sampled,
not the clients that exist).

    .venv/bin/python benchmarks/scale.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report

from tessera.core.errors import ConfigError
from tessera.horizontal.job import Extension
from tessera.horizontal.simulation import JobParts

os.environ.setdefault("COLUMNS", "160")  # a wide table even when stdout is not a terminal
CLIENTS = (100, 1_000, 10_000)
SAMPLED = 10
MORE_SAMPLED = 100  # one more point per backend: 10,000 clients with 100 sampled, to show what cost does follow
RAY = {"num_cpus": 2, "num_actors": 2, "object_store_memory": "128MiB"}


class TreeMemory(Extension):
    """Extension measuring, after each round, the summed RSS of this process and every process it started (Ray's
    GCS, raylet, agents and actors). RSS, unlike PSS/USS, does not depend on what else runs on the machine;
    library pages shared by these processes count once per process."""

    name = "tree_memory"

    def __init__(self) -> None:
        self.peak_mb = 0.0

    def on_round_end(self, rnd: int, record: dict[str, Any]) -> None:
        import psutil

        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak_mb = max(self.peak_mb, total / 1024**2)


@functools.cache
def _digits() -> tuple[Any, Any]:
    import torch

    from tessera.core.datasets import digits

    x, y = digits()
    return torch.from_numpy(x), torch.from_numpy(y)


class VirtualDigits:
    """data_fn of `num_clients` virtual clients whose rows are drawn from digits only when a client runs.

    Client `v<i>` gets `rows` training and `test_rows` test rows chosen by a generator seeded with (seed, i), so
    no per-client data exists until the client is sampled, on whichever process runs it.
    """

    def __init__(self, num_clients: int, *, rows: int = 32, test_rows: int = 8, batch_size: int = 32,
                 seed: int = 0) -> None:
        self.num_clients, self.rows, self.test_rows = num_clients, rows, test_rows
        self.batch_size, self.seed = batch_size, seed

    def clients(self) -> list[str]:
        width = len(str(self.num_clients - 1))
        return [f"v{i:0{width}d}" for i in range(self.num_clients)]

    def __call__(self, cid: str) -> tuple[Any, Any]:
        from torch.utils.data import DataLoader, TensorDataset

        if not (cid.startswith("v") and cid[1:].isdigit() and int(cid[1:]) < self.num_clients):
            raise ConfigError(f"unknown virtual client {cid!r}; ids are v0..v{self.num_clients - 1}")
        x, y = _digits()
        pick = np.random.default_rng([self.seed, int(cid[1:])]).choice(len(y), self.rows + self.test_rows)
        tr, te = pick[: self.rows], pick[self.rows :]
        train = DataLoader(TensorDataset(x[tr], y[tr]), batch_size=self.batch_size, shuffle=True)
        return train, DataLoader(TensorDataset(x[te], y[te]), batch_size=256)


def virtual_digits_parts(num_clients: int, *, sampled: int = 10, seed: int = 0, hidden: tuple[int, ...] = (64,),
                         lr: float = 0.1) -> JobParts:
    """FedAvg over `num_clients` virtual digits clients, exactly `sampled` of them per round, no evaluation."""
    import torch
    from torch import nn

    from tessera.core.models import MLP
    from tessera.horizontal.strategies import FedAvg
    from tessera.horizontal.task import SupervisedTask

    data = VirtualDigits(num_clients, seed=seed)
    task = SupervisedTask(model_fn=functools.partial(MLP, 64, 10, hidden), loss_fn=nn.CrossEntropyLoss(),
                          optimizer_fn=functools.partial(torch.optim.SGD, lr=lr), data_fn=data)
    strategy = FedAvg(fraction_fit=0.0, min_fit_clients=sampled, fraction_evaluate=0.0)
    return JobParts(task=task, strategy=strategy, clients=data.clients())


def one(backend: str, clients: int, sampled: int, rounds: int) -> dict[str, object]:
    """Run one configuration in this process and return its measurements."""
    import torch

    from tessera.horizontal.simulation import simulate

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    parts = virtual_digits_parts(clients, sampled=sampled, seed=0)
    probe = TreeMemory()
    history, _ = simulate(parts, rounds=rounds, seed=0, backend=backend,
                          backend_options=RAY if backend == "ray" else None,
                          on_server=lambda server: server.extensions.append(probe))
    wall = time.perf_counter() - t0
    seconds = [r["seconds"] for r in history.records]
    ray = history.last.get("ray", {})
    return {"backend": backend, "clients": clients, "sampled": history.last["clients_sampled"],
            "failed": sum(r["clients_failed"] for r in history.records), "round_seconds": seconds,
            "first_round_s": seconds[0], "median_round_s": statistics.median(seconds[1:]),
            "setup_s": wall - sum(seconds),
            "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "actor_peak_mb": ray.get("actor_peak_rss_mb"), "pool_peak_mb": ray.get("pool_peak_rss_mb"),
            "all_processes_rss_mb": probe.peak_mb}


def run_child(backend: str, clients: int, sampled: int, rounds: int) -> dict[str, object]:
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1", "OMP_NUM_THREADS": "1"}
    args = ["--one", backend, str(clients), str(sampled), "--rounds", str(rounds)]
    proc = subprocess.run([sys.executable, __file__, *args],
                          capture_output=True, text=True, env=env, timeout=900, check=False)
    lines = [s for s in proc.stdout.splitlines() if s.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{backend} with {clients} clients failed:\n{proc.stderr[-3000:]}")
    result: dict[str, object] = json.loads(lines[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4 rounds per point instead of 20")
    ap.add_argument("--one", nargs=3, metavar=("BACKEND", "CLIENTS", "SAMPLED"), help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=20, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), int(args.one[2]), args.rounds)))
        return
    rounds = 4 if args.quick else args.rounds
    points = [(n, SAMPLED) for n in CLIENTS] + [(CLIENTS[-1], MORE_SAMPLED)]
    results = [run_child(b, n, k, rounds) for b in ("inprocess", "ray") for n, k in points]
    rows = [[r["backend"], r["clients"], r["sampled"], r["failed"], r["median_round_s"], r["first_round_s"],
             r["setup_s"], r["driver_peak_mb"], "-" if r["actor_peak_mb"] is None else r["actor_peak_mb"],
             "-" if r["pool_peak_mb"] is None else r["pool_peak_mb"], r["all_processes_rss_mb"]] for r in results]
    ray_time = {r["clients"]: float(r["median_round_s"])  # type: ignore[arg-type]
                for r in results if r["backend"] == "ray" and r["sampled"] == SAMPLED}
    ratio = ray_time[CLIENTS[-1]] / ray_time[CLIENTS[0]]
    report("scale", ["backend", "clients", "sampled/round", "failed", "median round s", "round 1 s", "setup s",
                     "driver peak MiB", "actor peak MiB", "all actors MiB", "all processes RSS MiB"], rows, ratio=ratio,
           ratio_means=f"Ray median round time at {CLIENTS[-1]:,} clients / at {CLIENTS[0]:,} clients "
                       f"({SAMPLED} sampled per round; near 1 = cost follows clients sampled, not total)",
           extra={"rounds": rounds, "ray_options": RAY, "results": results})


if __name__ == "__main__":
    main()
