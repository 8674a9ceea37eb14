"""The `tessera` command. Each area registers its commands and demos from its own module."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from tessera.core.errors import TesseraError
from tessera.core.logging import setup_logging

app = typer.Typer(help="tessera: privacy-preserving federated learning for PyTorch", pretty_exceptions_enable=False,
                  no_args_is_help=True)
DEMOS: dict[str, Callable[[Path, bool], None]] = {}


def _register_all() -> None:
    from tessera.cli import hfl

    hfl.register(app, DEMOS)
    import importlib

    # Areas built on the foundation register their commands the same way; a missing module is skipped so the
    # core CLI works while an area is being built.
    for area in ("robust", "secagg", "dp", "split", "export", "grpc", "llm", "scale"):
        try:
            mod = importlib.import_module(f"tessera.cli.{area}")
        except ModuleNotFoundError as exc:
            if exc.name != f"tessera.cli.{area}":
                raise
            continue
        mod.register(app, DEMOS)


@app.command()
def demo(
    name: Annotated[str, typer.Argument(help="which demo: hfl (default), robust, dp, split, llm, ...")] = "hfl",
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(help="fewer rounds, for a smoke test")] = False,
) -> None:
    """Run a self-contained demo on data that ships with the packages (no download)."""
    if name not in DEMOS:
        raise TesseraError(f"unknown demo {name!r}; choose one of {sorted(DEMOS)}")
    DEMOS[name](out / name, quick)


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
