"""`tessera demo scale`: 1,000 virtual clients on the Ray backend, 10% sampled per round, digits MLP.

The demo runs the same path as `tessera simulate job.toml --backend ray` (a job config built by the CLI's job
reader) and shows round time and memory per round. `report_table` also serves `tessera scale-report`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tessera.core.config import JobConfig, validate
from tessera.core.metrics import History
from tessera.demos import JobBuilder

console = Console()


def scale_job(num_clients: int, *, rounds: int, out: Path, backend: str, fraction: float = 0.1,
              ray: dict[str, Any] | None = None) -> JobConfig:
    """The job.toml of the demo: shifted digits over `num_clients` IID clients, MLP(64-64-10), `fraction` sampled
    per round, SGD with 10 local epochs, accuracy on a central 20% held out."""
    return validate(JobConfig, {
        "job": {"name": f"scale-{backend}", "rounds": rounds, "seed": 0, "output_dir": str(out / backend),
                "backend": backend},
        "data": {"dataset": "shifted_digits", "num_clients": num_clients, "partition": "iid",
                 "central_test_fraction": 0.2},
        "model": {"name": "mlp", "hidden": [64]},
        "train": {"local_epochs": 10, "batch_size": 16, "lr": 0.5},
        "strategy": {"name": "fedavg", "fraction_fit": fraction, "fraction_evaluate": 0.0},
        "ray": ray or {"num_cpus": 2, "num_actors": 2, "object_store_memory": "256MiB"},
    }, source="demo scale")


def report_table(runs: dict[str, History]) -> Table:
    table = Table(title="round time and peak RSS (acc: central test set, else federated evaluation; MiB: peak "
                        "RSS of the Ray driver, the largest actor, all actors)")
    for col in ("run", "round", "sampled", "ok", "failed", "s", "acc", "driver MiB", "actor MiB", "pool MiB"):
        table.add_column(col, justify="right")
    for name, hist in runs.items():
        for r in hist:
            ray = r.get("ray", {})
            acc = r.get("central_metrics", {}).get("accuracy", r.get("eval_metrics", {}).get("accuracy"))
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


def demo_scale(out: Path, quick: bool, build_parts: JobBuilder) -> None:
    """1,000 digits clients, 10% sampled per round, on Ray (2 actors) and in-process; table, PNG, summary.json."""
    from tessera.demos.hfl import run_config

    num_clients, rounds = 1000, (3 if quick else 5)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, History] = {}
    for backend in ("ray", "inprocess"):  # Ray first: the driver's peak RSS is then the Ray run's own
        console.print(f"[bold]{backend}[/bold]: {num_clients} clients, 10% sampled per round, {rounds} rounds")
        t0 = time.perf_counter()
        cfg = scale_job(num_clients, rounds=rounds, out=out, backend=backend)
        runs[backend] = run_config(cfg, build_parts, progress=False)
        console.print(f"  {time.perf_counter() - t0:.1f} s including start-up")
    console.print(report_table(runs))
    _plot(runs, out / "scale.png")
    summary = {name: {"clients": num_clients, "rounds": len(h),
                      "sampled_per_round": [r["clients_sampled"] for r in h],
                      "failed": sum(r["clients_failed"] for r in h),
                      "round_seconds": [r["seconds"] for r in h],
                      "final_central_accuracy": h.last.get("central_metrics", {}).get("accuracy"),
                      "ray": h.last.get("ray")} for name, h in runs.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"plot: {out / 'scale.png'}; summary: {out / 'summary.json'}")

