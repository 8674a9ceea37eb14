"""`tessera split-simulate` (run a split app, the file `tessera party --split` deploys over gRPC, with every party
in one process) and `tessera psi` (align ID files privately)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def register(app: typer.Typer) -> None:
    @app.command("split-simulate")
    def split_simulate(  # noqa: PLR0917 - one argument per CLI option
        split_app: Annotated[str, typer.Argument(help="module or .py file defining owner, label_party and FIT")],
        label: Annotated[str, typer.Option(help="the label party (the coordinator in federation.toml)")],
        owners: Annotated[list[str], typer.Option("--owner", help="a data owner; repeat for each")],
        out: Annotated[Path, typer.Option(help="folder with one subfolder per party")] = Path("runs/split"),
        resume: Annotated[bool, typer.Option(help="continue from the label party's checkpoint")] = False,
        overwrite: Annotated[bool, typer.Option(help="replace a run already in --out")] = False,
    ) -> None:
        """Run a split learning app in one process: the same file `tessera party --split` deploys over gRPC."""
        from tessera.core.runfolder import claim
        from tessera.vertical.deploy import load_split_app, run_split_inprocess
        from tessera.vertical.metrics import plot_split

        app_ = load_split_app(split_app)
        claim(out / label, resume=resume, overwrite=overwrite, where=f"--out {out}, label party {label}")
        trainer = run_split_inprocess(app_, label=label, owners=owners, out=out, resume=resume)
        trainer.close()
        plot_split(trainer.history, out / label)
        records = trainer.history.records
        validated = any("eval_loss" in r for r in records)  # no validation split: no validation columns
        table = Table(title=f"split learning: {label} (labels) + {', '.join(owners)}")
        cols = ("epoch", "train loss", *(("validation loss", "validation AUC") if validated else ()), "bytes up+down")
        for c in cols:
            table.add_column(c, justify="right")
        for r in records:
            auc, loss = r.get("eval_metrics", {}).get("auc"), r.get("eval_loss")
            val = ("-" if loss is None else f"{loss:.4f}", "-" if auc is None else f"{auc:.4f}") if validated else ()
            table.add_row(str(r["epoch"]), f"{r['train_loss']:.4f}", *val, str(r["bytes_up"] + r["bytes_down"]))
        console.print(table)
        console.print(f"metrics: {out / label / 'metrics.jsonl'}")

    @app.command("split-advise")
    def split_advise(
        model: Annotated[str, typer.Argument(help="model.py (defining `model`: an nn.Module or a function "
                                                  "returning one) or model.py:attr")],
        input_shape: Annotated[str, typer.Option(help="one row's shape, e.g. 30 or 1,28,28")],
        rows: Annotated[int, typer.Option(help="aligned training rows (for bytes per epoch)")] = 10_000,
    ) -> None:
        """For each cut of an nn.Sequential: embedding bytes per row and per epoch, FLOPs and params per side."""
        from tessera.core.errors import ConfigError
        from tessera.vertical.advise import advise, load_model, table

        try:
            shape = tuple(int(v) for v in input_shape.replace("x", ",").split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"--input-shape {input_shape!r}: give sizes like 30 or 1,28,28") from None
        found = table(advise(load_model(model), input_shape=shape, rows=rows))
        out = Table(title=f"split points ({rows:,} rows; pass the name to split_sequential(model, at=...))")
        for c in found[0] if found else []:
            out.add_column(c, justify="right")
        for r in found:
            out.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in r.values()))
        console.print(out)

    @app.command()
    def psi(
        ids: Annotated[list[str], typer.Option("--ids", help="party=path of a file with one ID per line; repeat")],
        out: Annotated[Path, typer.Option(help="folder for <party>.rows (aligned row numbers, one per line)")],
        leader: Annotated[str | None, typer.Option(help="party driving the protocol (default: the first)")] = None,
        workers: Annotated[int, typer.Option(help="processes per party for the curve work (e.g. 2 for 1M IDs)")] = 1,
    ) -> None:
        """Align ID files privately (ECDH PSI, simulated in one process): writes each party's aligned rows."""
        from tessera.core.errors import ConfigError
        from tessera.vertical.psi import intersect

        columns: dict[str, list[str]] = {}
        for spec in ids:
            party, sep, path = spec.partition("=")
            if not sep or not party:
                raise ConfigError(f"--ids {spec!r}: use party=path")
            columns[party] = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        rows = intersect(columns, leader=leader, workers=workers)
        out.mkdir(parents=True, exist_ok=True)
        for party, r in rows.items():
            (out / f"{party}.rows").write_text("".join(f"{i}\n" for i in r))
        console.print(f"{len(next(iter(rows.values())))} aligned rows; wrote {', '.join(f'{p}.rows' for p in rows)}")
