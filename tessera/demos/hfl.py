"""`tessera demo hfl` (the default demo): FedAvg vs FedProx on digits over 10 Dirichlet(0.5) clients, run as job
configs through the same path as `tessera simulate job.toml`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tessera.core.config import JobConfig, validate
from tessera.core.metrics import History, plot_history
from tessera.demos import JobBuilder
from tessera.horizontal.simulation import simulate

console = Console()


def rounds_table(runs: dict[str, History], title: str) -> Table:
    """Loss and accuracy per round, one column pair per run (also what `tessera simulate` prints)."""
    table = Table(title=title)
    table.add_column("round", justify="right")
    for name in runs:
        table.add_column(f"{name} loss", justify="right")
        table.add_column(f"{name} acc", justify="right")
    n = max(len(h) for h in runs.values())
    for i in range(n):
        row = [str(i + 1)]
        for h in runs.values():
            r = h.records[i] if i < len(h.records) else {}
            acc = r.get("eval_metrics", {}).get("accuracy")
            row += [f"{r.get('train_loss', float('nan')):.4f}", "-" if acc is None else f"{acc:.3f}"]
        table.add_row(*row)
    return table


def run_config(cfg: JobConfig, build_parts: JobBuilder, *, progress: bool = True) -> History:
    """A job config without plugins, as `tessera simulate` runs it: metrics.jsonl, checkpoint and plots."""
    history, _ = simulate(build_parts(cfg), rounds=cfg.job.rounds, seed=cfg.job.seed, output_dir=cfg.job.output_dir,
                          backend=cfg.job.backend, backend_options=cfg.ray if cfg.job.backend == "ray" else None,
                          progress=progress, checkpoint_every=cfg.job.checkpoint_every)
    plot_history(history, cfg.job.output_dir)
    return history


def demo_hfl(out: Path, quick: bool, build_parts: JobBuilder) -> None:
    """Digits across 10 Dirichlet(0.5) clients, an MLP, FedAvg vs FedProx; a table, plots and JSON."""
    rounds = 3 if quick else 20
    runs: dict[str, History] = {}
    t0 = time.perf_counter()
    for name, strategy in (("fedavg", {"name": "fedavg"}), ("fedprox", {"name": "fedprox", "proximal_mu": 0.1})):
        cfg = validate(JobConfig, {
            "job": {"name": f"demo-{name}", "rounds": rounds, "seed": 0, "output_dir": str(out / name)},
            "data": {"dataset": "digits", "num_clients": 10, "partition": "dirichlet", "alpha": 0.5,
                     "central_test_fraction": 0.2},
            "model": {"name": "mlp", "hidden": [64]},
            # several local epochs on skewed data: client drift is what FedProx's proximal term counters
            "train": {"local_epochs": 5, "batch_size": 16, "lr": 0.05},
            "strategy": strategy,
        }, source="demo")
        console.print(f"[bold]{name}[/bold]: 10 clients, Dirichlet(0.5) label skew, {rounds} rounds")
        runs[name] = run_config(cfg, build_parts)
    console.print(rounds_table(runs, "digits, 10 non-IID clients"))
    summary = {n: {"final_eval_accuracy": h.last.get("eval_metrics", {}).get("accuracy"),
                   "final_central_accuracy": h.last.get("central_metrics", {}).get("accuracy"),
                   "bytes_per_round": h.last.get("bytes_up", 0) + h.last.get("bytes_down", 0)} for n, h in runs.items()}
    plots = plot_history(runs, out, prefix="compare_")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for n, s in summary.items():
        console.print(f"{n}: final accuracy {s['final_central_accuracy']:.3f} (central test set), "
                      f"{s['final_eval_accuracy']:.3f} (clients' test sets)")
    console.print(f"done in {time.perf_counter() - t0:.0f} s; plots: {', '.join(str(p) for p in plots)}")
