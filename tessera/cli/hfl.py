"""`tessera simulate` (a job.toml in one process or on Ray) and `tessera plot` (PNG curves from metrics.jsonl)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from tessera.core.config import SECTIONS, JobConfig, read_toml, to_toml, validate
from tessera.core.errors import ConfigError, ShapeMismatch
from tessera.core.metrics import History, plot_history
from tessera.core.runfolder import claim
from tessera.demos.hfl import rounds_table
from tessera.horizontal.scheduling import Scheduling
from tessera.horizontal.server import Server
from tessera.horizontal.simulation import simulate

console = Console()


def run_job(cfg: JobConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
            source: Path | None = None) -> History:
    """Build the job, check one batch through the model, claim the output folder (a run already there needs
    `resume` or `overwrite`), simulate, plot. `source` (the job.toml) names the file in error messages."""
    from tessera.cli.jobs import build_parts, build_plugins, build_scheduling, preflight

    parts = build_parts(cfg)
    where = f"{source}: " if source is not None else ""
    try:
        preflight(parts)
    except ShapeMismatch as exc:
        raise ShapeMismatch(f"{where}[model] {cfg.model.name!r} does not fit [data] {cfg.data.dataset!r}: {exc}") \
            from None
    except ConfigError as exc:
        raise ConfigError(f"{where}[model]/[data]: {exc}") from None
    claim(cfg.job.output_dir, resume=resume, overwrite=overwrite, where="job.output_dir")
    history, _ = simulate(parts, rounds=cfg.job.rounds, seed=cfg.job.seed, output_dir=cfg.job.output_dir,
                          backend=cfg.job.backend, backend_options=cfg.ray if cfg.job.backend == "ray" else None,
                          resume=resume, progress=progress, plugins=build_plugins(cfg),
                          checkpoint_every=cfg.job.checkpoint_every, loggers=cfg.job.loggers(),
                          on_server=lambda server: _schedule(server, build_scheduling(cfg)))
    plot_history(history, cfg.job.output_dir)
    return history


def _schedule(server: Server, policy: Scheduling | None) -> None:
    if policy is not None:  # [schedule]: deadline rounds or asynchronous FedBuff instead of synchronous rounds
        server.scheduling = policy


def metrics_file(path: Path) -> Path:
    """A metrics.jsonl argument that exists, or one line naming it."""
    if not path.is_file():
        hint = f"; did you mean {path / 'metrics.jsonl'}?" if (path / "metrics.jsonl").is_file() else \
            "; give the metrics.jsonl a run wrote in its output folder"
        raise ConfigError(f"{path}: no such file{hint}")
    return path


def register(app: typer.Typer) -> None:
    @app.command()
    def simulate_cmd(  # noqa: PLR0917 - one argument per CLI option
        job: Annotated[Path, typer.Argument(help="job.toml")],
        resume: Annotated[bool, typer.Option(help="continue from the checkpoint in output_dir")] = False,
        overwrite: Annotated[bool, typer.Option(help="replace a run already in output_dir")] = False,
        rounds: Annotated[int | None, typer.Option(help="override job.rounds")] = None,
        output_dir: Annotated[Path | None, typer.Option(help="override job.output_dir")] = None,
        backend: Annotated[str | None, typer.Option(help="override job.backend: inprocess | ray")] = None,
        print_config: Annotated[bool, typer.Option(help="print the resolved job (defaults included) and exit")] = False,
    ) -> None:
        """Run a horizontal job from job.toml in simulation; writes metrics.jsonl, checkpoint and plots."""
        from tessera.cli.jobs import load_job_file

        cfg = load_job_file(job, warn_missing=not print_config)
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
        if print_config:
            raw = read_toml(job)
            missing = [f"[{name}]" for name in SECTIONS if name not in raw]
            if missing:
                typer.echo(f"# {job} has no {', '.join(missing)}: the defaults below are what the job runs with")
            typer.echo(to_toml(cfg), nl=False)
            return
        history = run_job(cfg, resume=resume, overwrite=overwrite, source=job)
        console.print(rounds_table({cfg.job.name: history}, f"{cfg.job.name}"))
        console.print(f"metrics: {Path(cfg.job.output_dir) / 'metrics.jsonl'}")

    simulate_cmd.__name__ = "simulate"
    app.command(name="simulate")(simulate_cmd)

    @app.command()
    def plot(metrics: Annotated[Path, typer.Argument(help="metrics.jsonl")],
             out: Annotated[Path | None, typer.Option(help="folder for the PNGs")] = None) -> None:
        """Write loss/accuracy/bytes PNG curves from a metrics.jsonl."""
        paths = plot_history(History.from_jsonl(metrics_file(metrics)), out or metrics.parent)
        for p in paths:
            console.print(str(p))

    @app.command(name="dp-plot")
    def dp_plot(
        metrics: Annotated[Path, typer.Argument(help=escape("metrics.jsonl of a run with [dp]"))],
        baseline: Annotated[Path | None, typer.Option(help="metrics.jsonl of a non-private run to compare")] = None,
        budget: Annotated[float | None, typer.Option(help="epsilon budget line to draw")] = None,
        out: Annotated[Path | None, typer.Option(help="PNG path (default: dp.png next to metrics)")] = None,
    ) -> None:
        """Plot accuracy and each party's cumulative epsilon against round from a run's metrics.jsonl."""
        from tessera.demos.dp import plot_dp

        private = History.from_jsonl(metrics_file(metrics))
        if not private["epsilon"]:
            raise ConfigError(f"{metrics}: no round has an 'epsilon' record; was the run made with a [dp] section?")
        plain = History.from_jsonl(metrics_file(baseline)) if baseline is not None else History()
        path = plot_dp(plain, private, out or metrics.parent / "dp.png", budget=budget,
                       rounds=max(len(private), len(plain)))
        typer.echo(str(path))

    @app.command(name="scale-report")
    def scale_report(metrics: Annotated[Path, typer.Argument(help="metrics.jsonl of a run")]) -> None:
        """Per-round time, clients and peak memory (driver and Ray actors) of a run, from its metrics.jsonl."""
        from tessera.demos.scale import report_table

        history = History.from_jsonl(metrics_file(metrics))
        console.print(report_table({metrics.parent.name or "run": history}))
