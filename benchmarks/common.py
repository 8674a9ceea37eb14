"""Shared benchmark plumbing: timing, a rich table, JSON output and the closing `ratio X` line."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Median wall time of `repeats` calls (and all samples)."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples


def report(name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, ratio: float,
           ratio_means: str, extra: dict[str, Any] | None = None) -> None:
    """Print the table, write results/NAME.json, and end with the line `ratio X`."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=name)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    console = Console()
    console.print(table)
    console.print(f"ratio = {ratio_means}")
    RESULTS.mkdir(exist_ok=True)
    payload = {"benchmark": name, "columns": list(columns), "rows": [list(r) for r in rows], "ratio": ratio,
               "ratio_means": ratio_means, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               **(extra or {})}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    print(f"ratio {ratio:.4f}")
