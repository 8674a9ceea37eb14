"""Per-round records: metrics.jsonl on disk, History in memory, PNG curves for people."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tessera.core.logging import get_logger
from tessera.core.tracking import RecordLogger, make_loggers, step_of

log = get_logger(__name__)


class History:
    """The records of a run, one dict per round (the rows of metrics.jsonl)."""

    def __init__(self, records: Iterable[dict[str, Any]] = ()) -> None:
        self.records: list[dict[str, Any]] = list(records)

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __getitem__(self, key: str) -> list[Any]:
        """`history["eval_accuracy"]` -> that value for every round that has it (dotted keys reach nested maps)."""
        return [v for v in (_get(r, key) for r in self.records) if v is not None]

    @property
    def last(self) -> dict[str, Any]:
        return self.records[-1] if self.records else {}

    @classmethod
    def from_jsonl(cls, path: str | Path) -> History:
        with open(path, encoding="utf-8") as fh:
            return cls(json.loads(line) for line in fh if line.strip())

    def __repr__(self) -> str:
        return f"History(rounds={len(self)}, last={self.last})"


def _get(record: dict[str, Any], key: str) -> Any:
    cur: Any = record
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


class MetricsWriter:
    """Appends one JSON line per round and hands the same record to each logger (TensorBoard, MLflow).

    `loggers` are names ("tensorboard", "mlflow": written next to metrics.jsonl) or RecordLogger objects.
    `reset(records)` rewrites the file for a resumed run and tells the loggers where the run picks up.
    """

    def __init__(self, path: str | Path, *, loggers: Sequence[str | RecordLogger] = ()) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.loggers = make_loggers(loggers, self.path.parent)

    def write(self, record: dict[str, Any]) -> None:
        row = _jsonable(record)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
        for logger in self.loggers:
            logger.log(row)

    def reset(self, records: Sequence[dict[str, Any]] = ()) -> None:
        with open(self.path, "w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(_jsonable(r), sort_keys=True) + "\n")
        for logger in self.loggers:
            logger.resume(step_of(records[-1], len(records)) if records else 0)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item") and callable(x.item):
        return x.item()
    return x


# (file name, [(record key, label), ...], y label): the panels `plot_history` draws for a federated run
Panel = tuple[str, list[tuple[str, str]], str]
ROUND_PANELS: list[Panel] = [
    ("loss", [("train_loss", "train"), ("eval_loss", "federated eval"), ("central_loss", "central eval")], "loss"),
    ("accuracy", [("eval_metrics.accuracy", "federated eval"), ("central_metrics.accuracy", "central eval")],
     "accuracy"),
    ("bytes", [("bytes_up", "up (clients→server)"), ("bytes_down", "down (server→clients)")], "bytes per round"),
]


def plot_history(
    histories: Mapping[str, History] | History, out_dir: str | Path, *, prefix: str = "",
    panels: Sequence[Panel] = ROUND_PANELS, x: str = "round", title: str = "",
) -> list[Path]:
    """Write one PNG per panel (loss.png, accuracy.png, bytes.png by default), one line per named run and series,
    against the record key `x`; returns their paths. Panels with no data are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = histories if isinstance(histories, Mapping) else {"run": histories}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, series, ylabel in panels:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        drawn = 0
        styles = ["-", "--", ":"]
        for ci, (run, hist) in enumerate(runs.items()):
            for si, (key, label) in enumerate(series):
                ys = [(r[x], _get(r, key)) for r in hist.records if _get(r, key) is not None]
                if ys:
                    xs, vs = zip(*ys, strict=True)
                    # colour = run, line style = series, so overlapping runs stay distinguishable
                    ax.plot(xs, vs, linestyle=styles[si % 3], marker="o", markersize=3,
                            color=f"C{ci if len(runs) > 1 else si}",
                            label=f"{run}: {label}" if len(runs) > 1 else label)
                    drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}{name} per {x}" + (f" — {', '.join(runs)}" if len(runs) > 1 else ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{prefix}{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    log.info("wrote %d plots to %s", len(paths), out)
    return paths


def plot_curves(
    curves: dict[str, list[float]], path: str | Path, *, title: str, ylabel: str, xlabel: str = "round",
    ylim: tuple[float, float] | None = None, dashed: Callable[[str], bool] = lambda name: False,
) -> Path:
    """One line per named curve against round 1..n (a demo's comparison plot); `dashed` marks reference runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, "--" if dashed(name) else "-", marker="o", markersize=3,
                label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
