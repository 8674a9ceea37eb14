"""Experiment trackers: each round's record (the same one metrics.jsonl gets) as scalars in TensorBoard or MLflow.

A record is flattened to scalar series named by their path: `train_loss`, `eval_metrics/accuracy`,
`epsilon/alice`, `bytes_up`, `seconds`, ... against the step `round` (or `epoch` for split learning). Values that
metrics.jsonl cannot hold as numbers (strings, lists such as `failures`, non-finite floats, which it writes as
null) are not logged, so every logged value equals the one in metrics.jsonl.

>>> writer = MetricsWriter(out / "metrics.jsonl", loggers=["tensorboard"])   # events in out/tensorboard
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tessera.core.errors import ConfigError
from tessera.core.logging import get_logger

log = get_logger(__name__)
LOGGERS = ("tensorboard", "mlflow")  # the names `loggers=[...]` and job.toml accept
STEP_KEYS = ("round", "epoch")  # the record key that counts steps, first found wins


class RecordLogger(ABC):
    """Receives every record written to metrics.jsonl (already JSON-safe), in order."""

    @abstractmethod
    def log(self, record: Mapping[str, Any]) -> None: ...

    def resume(self, step: int) -> None:  # noqa: B027 (optional hook)
        """The run restarts after `step` (a resumed checkpoint): anything logged for later steps is stale."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Flush and release files; the logger is not used afterwards."""


def scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a record by path (`eval_metrics/accuracy`), step keys and non-finite values left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, prefix=f"{name}/"))
        elif _is_number(value) and math.isfinite(value) and not (not prefix and key in STEP_KEYS):
            out[name] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def step_of(record: Mapping[str, Any], index: int) -> int:
    """The record's step: its `round` (or `epoch`), else its position in the run (1-based)."""
    for key in STEP_KEYS:
        if isinstance(record.get(key), int):
            return int(record[key])
    return index


class TensorBoardLogger(RecordLogger):
    """Event files under `log_dir` (`tensorboard --logdir <output_dir>/tensorboard`), flushed every record."""

    def __init__(self, log_dir: str | Path) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("loggers=['tensorboard'] needs the tensorboard package: pip install tensorboard==2.21.0")
        self.log_dir = Path(log_dir)
        self._writer: Any = None
        self._purge_step: int | None = None
        self._count = 0

    def _open(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a crashed run logged past its checkpoint, so a resumed run shows one curve.
            self._writer = SummaryWriter(str(self.log_dir), purge_step=self._purge_step)
        return self._writer

    def log(self, record: Mapping[str, Any]) -> None:
        self._count += 1
        writer, step = self._open(), step_of(record, self._count)
        for name, value in scalars(record).items():
            writer.add_scalar(name, value, global_step=step)
        writer.flush()

    def resume(self, step: int) -> None:
        self.close()
        self._purge_step, self._count = step + 1, step

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def mlflow_store_uri(store_dir: str | Path) -> str:
    """A local store in `store_dir`: SQLite `mlflow.db` (MLflow 3 refuses plain file stores by default), or the
    `store_dir` file store where SQLAlchemy is missing (mlflow-skinny)."""
    store = Path(store_dir).resolve()
    if importlib.util.find_spec("sqlalchemy") is not None and importlib.util.find_spec("alembic") is not None:
        return f"sqlite:///{store / 'mlflow.db'}"
    return store.as_uri()


class MLflowLogger(RecordLogger):
    """One MLflow run in a local store under `store_dir` (`mlflow ui --backend-store-uri <mlflow_store_uri>`)."""

    def __init__(self, store_dir: str | Path, *, experiment: str = "tessera", run_name: str | None = None) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        store = Path(store_dir).resolve()
        store.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = mlflow_store_uri(store)
        try:
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else \
                self.client.create_experiment(experiment, artifact_location=(store / "artifacts").as_uri())
            self.run_id: str = self.client.create_run(exp_id, run_name=run_name).info.run_id
        except MlflowException as exc:
            raise ConfigError(f"MLflow cannot open a local store at {self.tracking_uri} ({exc}); install the full "
                              "mlflow package (it brings SQLAlchemy for a SQLite store) or drop 'mlflow' from "
                              "loggers") from exc
        self._count = 0

    def log(self, record: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        self._count += 1
        step, now = step_of(record, self._count), int(time.time() * 1000)
        metrics = [Metric(key=k, value=v, timestamp=now, step=step) for k, v in scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def resume(self, step: int) -> None:
        self._count = step

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def make_loggers(specs: Sequence[str | RecordLogger], out_dir: str | Path) -> list[RecordLogger]:
    """Loggers by name ("tensorboard" -> out_dir/tensorboard, "mlflow" -> out_dir/mlruns) or given objects.

    MLflow is optional: when it is not installed, "mlflow" is skipped with a warning and the run goes on.
    """
    out: list[RecordLogger] = []
    for spec in specs:
        if isinstance(spec, RecordLogger):
            out.append(spec)
        elif spec == "tensorboard":
            out.append(TensorBoardLogger(Path(out_dir) / "tensorboard"))
        elif spec == "mlflow":
            if importlib.util.find_spec("mlflow") is None:
                log.warning("loggers: 'mlflow' skipped, MLflow is not installed (pip install mlflow to log there); "
                            "metrics.jsonl and any other logger still get every record")
                continue
            out.append(MLflowLogger(Path(out_dir) / "mlruns"))
        else:
            check_specs([spec])
    return out


def check_specs(specs: Sequence[str | RecordLogger]) -> None:
    """Refuse unknown logger names up front (before a run starts), with the closest known name."""
    for spec in specs:
        if not isinstance(spec, RecordLogger) and spec not in LOGGERS:
            close = difflib.get_close_matches(str(spec).lower(), LOGGERS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"loggers: unknown logger {spec!r}; {hint}use any of {list(LOGGERS)} "
                              "or a tessera.core.tracking.RecordLogger")
