"""Module loggers and one console setup. Library code logs; it never prints, and never logs tensors or keys."""

from __future__ import annotations

import logging

_CONFIGURED = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def setup_logging(level: str | int = "INFO") -> None:
    """Route tessera's logs through rich once (the CLI calls this; libraries embedding tessera need not)."""
    global _CONFIGURED
    if _CONFIGURED:
        logging.getLogger("tessera").setLevel(level)
        return
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
    root = logging.getLogger("tessera")
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    _CONFIGURED = True
