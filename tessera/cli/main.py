"""The `tessera` command: each area's module registers its commands; `tessera demo NAME` runs a demo."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from tessera.core.errors import TesseraError
from tessera.core.logging import setup_logging

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import UsageError
    from typer.exceptions import Abort
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import Abort, UsageError  # type: ignore[assignment]

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
DEBUG_ENV = "TESSERA_DEBUG"


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="show the traceback behind an error message")] = False
          ) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


def _fail(line: str, code: int) -> None:
    """End the command with ONE line on stderr (the traceback too with --debug or TESSERA_DEBUG=1)."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exc()
    typer.secho("error: " + " ".join(line.split()), fg=typer.colors.RED, err=True)
    sys.exit(code)


def main() -> None:
    """Exit codes: 0 done, 2 a user mistake (one line naming the key, flag or file and the fix), 1 anything
    unexpected (one line; rerun with --debug for the traceback), 130 interrupted before the command started."""
    setup_logging("WARNING")
    try:
        rc = app(standalone_mode=False)
    except UsageError as exc:
        if not exc.format_message():  # no arguments: the help was printed
            sys.exit(exc.exit_code)
        cmd = exc.ctx.command_path if exc.ctx is not None else "tessera"
        _fail(f"{exc.format_message()} (see `{cmd} --help`)", 2)
    except Abort:
        sys.exit(130)
    except TesseraError as exc:
        _fail(str(exc), 2)
    except OSError as exc:  # a path the user gave that cannot be read or written
        _fail(f"{exc}; check the path (rerun with --debug for the traceback)", 2)
    except Exception as exc:  # the last line of defence: one line, the traceback on request
        _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
