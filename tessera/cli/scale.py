"""`tessera demo scale`: 1,000 virtual clients on the Ray backend, 10% sampled per round, digits MLP.

The demo runs the same path as `tessera simulate job.toml --backend ray` (a job config through `run_job`) and
shows round time and memory per round. `virtual_digits_parts` builds the lazily materialised federations the
benchmark (benchmarks/scale.py) runs with up to 10,000 clients.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from tessera.core.config import JobConfig, validate
from tessera.core.errors import ConfigError
from tessera.core.metrics import History
from tessera.horizontal.simulation import JobParts

console = Console()


@functools.cache
def _digits() -> tuple[Any, Any]:
    import torch

    from tessera.core.datasets import digits

    x, y = digits()
    return torch.from_numpy(x), torch.from_numpy(y)


def shifted_digits() -> tuple[np.ndarray, np.ndarray]:
    """Digits and its 8 one-pixel shifts (16,173 rows, 64 features, 10 classes): enough rows for 1,000 clients.

    Use it from job.toml as `data.dataset = "tessera.cli.scale:shifted_digits"`.
    """
    from tessera.core.datasets import digits

    x, y = digits()
    padded = np.pad(x.reshape(-1, 8, 8), ((0, 0), (1, 1), (1, 1)))
    views = [padded[:, 1 + dy : 9 + dy, 1 + dx : 9 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return np.concatenate(views).reshape(-1, 64).astype(np.float32), np.tile(y, len(views))


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


def scale_job(num_clients: int, *, rounds: int, out: Path, backend: str, fraction: float = 0.1,
              ray: dict[str, Any] | None = None) -> JobConfig:
    """The job.toml of the demo: shifted digits over `num_clients` IID clients, MLP(64-64-10), `fraction` sampled
    per round, SGD with 10 local epochs, accuracy on a central 20% held out."""
    return validate(JobConfig, {
        "job": {"name": f"scale-{backend}", "rounds": rounds, "seed": 0, "output_dir": str(out / backend),
                "backend": backend},
        "data": {"dataset": "tessera.cli.scale:shifted_digits", "num_clients": num_clients, "partition": "iid",
                 "central_test_fraction": 0.2},
        "model": {"name": "mlp", "hidden": [64]},
        "train": {"local_epochs": 10, "batch_size": 16, "lr": 0.5},
        "strategy": {"name": "fedavg", "fraction_fit": fraction, "fraction_evaluate": 0.0},
        "ray": ray or {"num_cpus": 2, "num_actors": 2, "object_store_memory": "256MiB"},
    }, source="demo scale")


def _table(runs: dict[str, History]) -> Table:
    table = Table(title="round time and peak RSS (acc: central test set; MiB: peak RSS of the Ray driver, the "
                        "largest actor, all actors)")
    for col in ("run", "round", "sampled", "ok", "failed", "s", "acc", "driver MiB", "actor MiB", "pool MiB"):
        table.add_column(col, justify="right")
    for name, hist in runs.items():
        for r in hist:
            ray = r.get("ray", {})
            acc = r.get("central_metrics", {}).get("accuracy")
            table.add_row(name, str(r["round"]), str(r["clients_sampled"]), str(r["clients_succeeded"]),
                          str(r["clients_failed"]), f"{r['seconds']:.2f}", "-" if acc is None else f"{acc:.3f}",
                          *(f"{ray[k]:.0f}" if k in ray else "-" for k in
                            ("driver_peak_rss_mb", "actor_peak_rss_mb", "pool_peak_rss_mb")))
    return table


def _plot(runs: dict[str, History], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, hist) in enumerate(runs.items()):
        left.plot([r["round"] for r in hist], [r["seconds"] for r in hist], marker="o", color=f"C{i}", label=name)
    left.set(title="round time (100 of 1,000 clients sampled)", xlabel="round", ylabel="seconds")
    left.set_ylim(bottom=0)
    ray = runs.get("ray")
    if ray is not None:
        for key, label, style in (("driver_peak_rss_mb", "driver peak", "-"), ("actor_peak_rss_mb",
                                  "largest actor peak", "--"), ("pool_peak_rss_mb", "all actors (sum of peaks)", ":")):
            right.plot([r["round"] for r in ray], [r["ray"][key] for r in ray], marker="o", linestyle=style,
                       label=label)
    right.set(title="Ray backend memory (peak RSS)", xlabel="round", ylabel="MiB")
    right.set_ylim(bottom=0)
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo_scale(out: Path, quick: bool = False) -> None:
    """1,000 digits clients, 10% sampled per round, on Ray (2 actors) and in-process; table, PNG, summary.json."""
    from tessera.cli.hfl import run_job

    num_clients, rounds = 1000, (3 if quick else 5)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, History] = {}
    for backend in ("ray", "inprocess"):  # Ray first: the driver's peak RSS is then the Ray run's own
        console.print(f"[bold]{backend}[/bold]: {num_clients} clients, 10% sampled per round, {rounds} rounds")
        t0 = time.perf_counter()
        runs[backend] = run_job(scale_job(num_clients, rounds=rounds, out=out, backend=backend), progress=False)
        console.print(f"  {time.perf_counter() - t0:.1f} s including start-up")
    console.print(_table(runs))
    _plot(runs, out / "scale.png")
    summary = {name: {"clients": num_clients, "rounds": len(h),
                      "sampled_per_round": [r["clients_sampled"] for r in h],
                      "failed": sum(r["clients_failed"] for r in h),
                      "round_seconds": [r["seconds"] for r in h],
                      "final_central_accuracy": h.last.get("central_metrics", {}).get("accuracy"),
                      "ray": h.last.get("ray")} for name, h in runs.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"plot: {out / 'scale.png'}; summary: {out / 'summary.json'}")


def register(app: typer.Typer, demos: dict[str, Callable[[Path, bool], None]]) -> None:
    demos["scale"] = demo_scale

    @app.command(name="scale-report")
    def scale_report(metrics: Annotated[Path, typer.Argument(help="metrics.jsonl of a run")]) -> None:
        """Per-round time, clients and peak memory (driver and Ray actors) of a run, from its metrics.jsonl."""
        console.print(_table({metrics.parent.name or "run": History.from_jsonl(metrics)}))
