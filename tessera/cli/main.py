"""The `tessera` command: each area's module registers its commands; `tessera demo NAME` runs a demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from tessera.core.errors import TesseraError
from tessera.core.logging import setup_logging

app = typer.Typer(help="tessera: privacy-preserving federated learning for PyTorch", pretty_exceptions_enable=False,
                  no_args_is_help=True)


def _register_all() -> None:
    from tessera.cli import export, grpc, hfl, llm, split

    for area in (hfl, export, split, grpc, llm):
        area.register(app)


def _demo_help() -> str:
    from tessera.demos import DEMOS

    return "which demo: " + "; ".join(f"{name} ({d.help})" for name, d in DEMOS.items())


@app.command()
def demo(
    name: Annotated[str, typer.Argument(help=_demo_help())] = "hfl",
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(help="fewer rounds, for a smoke test")] = False,
) -> None:
    """Run a self-contained demo on data that ships with the packages or is generated (no download)."""
    from tessera import demos
    from tessera.cli.jobs import build_parts

    demos.run(name, out / name, quick=quick, build_parts=build_parts)


_register_all()


def main() -> None:
    setup_logging("WARNING")
    try:
        app()
    except TesseraError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
