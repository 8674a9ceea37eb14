"""`tessera simulate`, `tessera plot` and the default demo (FedAvg vs FedProx on non-IID digits)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tessera.core.config import JobConfig, load_job, validate
from tessera.core.metrics import History, plot_history
from tessera.horizontal.simulation import simulate

console = Console()


def run_job(cfg: JobConfig, *, resume: bool = False, progress: bool = True) -> History:
    from tessera.cli.jobs import build_parts, build_plugins

    parts = build_parts(cfg)
    history, _ = simulate(parts, rounds=cfg.job.rounds, seed=cfg.job.seed, output_dir=cfg.job.output_dir,
                          backend=cfg.job.backend, backend_options=cfg.ray if cfg.job.backend == "ray" else None,
                          resume=resume, progress=progress, plugins=build_plugins(cfg),
                          checkpoint_every=cfg.job.checkpoint_every)
    plot_history(history, cfg.job.output_dir)
    return history


def rounds_table(runs: dict[str, History], title: str) -> Table:
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


def demo_hfl(out: Path, quick: bool = False) -> None:
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
        runs[name] = run_job(cfg)
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


def register(app: typer.Typer, demos: dict[str, Callable[[Path, bool], None]]) -> None:
    demos["hfl"] = demo_hfl

    @app.command()
    def simulate_cmd(
        job: Annotated[Path, typer.Argument(help="job.toml")],
        resume: Annotated[bool, typer.Option(help="continue from the checkpoint in output_dir")] = False,
        rounds: Annotated[int | None, typer.Option(help="override job.rounds")] = None,
        output_dir: Annotated[Path | None, typer.Option(help="override job.output_dir")] = None,
        backend: Annotated[str | None, typer.Option(help="override job.backend: inprocess | ray")] = None,
    ) -> None:
        """Run a horizontal job from job.toml in simulation; writes metrics.jsonl, checkpoint and plots."""
        cfg = load_job(job)
        overrides: dict[str, Any] = {}
        if rounds is not None:
            overrides["rounds"] = rounds
        if output_dir is not None:
            overrides["output_dir"] = str(output_dir)
        if backend is not None:
            overrides["backend"] = backend
        if overrides:
            data = cfg.model_dump()
            data["job"].update(overrides)
            cfg = validate(JobConfig, data, source=str(job))
        history = run_job(cfg, resume=resume)
        console.print(rounds_table({cfg.job.name: history}, f"{cfg.job.name}"))
        console.print(f"metrics: {Path(cfg.job.output_dir) / 'metrics.jsonl'}")

    simulate_cmd.__name__ = "simulate"
    app.command(name="simulate")(simulate_cmd)

    @app.command()
    def plot(metrics: Annotated[Path, typer.Argument(help="metrics.jsonl")],
             out: Annotated[Path | None, typer.Option(help="folder for the PNGs")] = None) -> None:
        """Write loss/accuracy/bytes PNG curves from a metrics.jsonl."""
        paths = plot_history(History.from_jsonl(metrics), out or metrics.parent)
        for p in paths:
            console.print(str(p))
