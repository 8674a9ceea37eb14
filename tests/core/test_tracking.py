"""Trackers get the records of metrics.jsonl: read back from TensorBoard's event files (and MLflow's store)."""

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import tessera
from tessera.core import tracking
from tessera.core.config import JobConfig, validate
from tessera.core.errors import ConfigError
from tessera.core.metrics import MetricsWriter
from tessera.core.tracking import scalars
from tessera.horizontal.simulation import simulate

from ..horizontal.helpers import make_parts


def events(log_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def record(rnd: int) -> dict[str, Any]:
    return {"round": rnd, "train_loss": 1.0 / rnd, "train_metrics": {"accuracy": 0.5 + rnd / 100},
            "eval_loss": 0.9 / rnd, "eval_metrics": {"accuracy": 0.6}, "central_loss": float("nan"),
            "clients_sampled": 3, "failures": [{"client": "c1", "reason": "timeout"}], "bytes_up": 1000 * rnd,
            "bytes_down": 2000, "seconds": 0.0123, "epsilon": {"alice": 0.25 * rnd, "bob": float("inf")}}


def test_scalars_are_the_numeric_leaves_metrics_jsonl_holds() -> None:
    # round is the step, not a series; failures (a list), nan and inf (null in metrics.jsonl) are left out
    assert scalars(record(2)) == {
        "train_loss": 0.5, "train_metrics/accuracy": 0.52, "eval_loss": 0.45, "eval_metrics/accuracy": 0.6,
        "clients_sampled": 3.0, "bytes_up": 2000.0, "bytes_down": 2000.0, "seconds": 0.0123, "epsilon/alice": 0.5}


def test_tensorboard_holds_every_record_of_metrics_jsonl(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path / "metrics.jsonl", loggers=["tensorboard"])
    for rnd in (1, 2, 3):
        writer.write(record(rnd))
    writer.close()
    got = events(tmp_path / "tensorboard")
    rows = jsonl(tmp_path / "metrics.jsonl")
    want = {(k, r["round"]): v for r in rows for k, v in scalars(r).items()}
    assert {(k, step) for k, s in got.items() for step in s} == set(want)
    assert all(got[k][step] == np.float32(v) for (k, step), v in want.items())  # event files hold float32
    assert got["epsilon/alice"] == {1: 0.25, 2: 0.5, 3: 0.75} and "epsilon/bob" not in got  # inf: null in jsonl


def test_a_resumed_run_hides_the_rounds_logged_after_its_checkpoint(tmp_path: Path) -> None:
    first = MetricsWriter(tmp_path / "metrics.jsonl", loggers=["tensorboard"])
    for rnd in (1, 2, 3):
        first.write(record(rnd))
    first.close()
    resumed = MetricsWriter(tmp_path / "metrics.jsonl", loggers=["tensorboard"])
    resumed.reset([record(1)])  # the checkpoint held round 1; rounds 2 and 3 run again
    again = {**record(2), "train_loss": 7.0}
    resumed.write(again)
    resumed.close()
    assert events(tmp_path / "tensorboard")["train_loss"] == {1: 1.0, 2: 7.0}


def test_flmodel_logs_its_rounds_to_tensorboard(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(40, 4)).astype(np.float32) for _ in range(2)]
    ys = [rng.integers(0, 3, 40) for _ in range(2)]
    torch.manual_seed(0)
    fl = tessera.FLModel(parties=["alice", "bob"], model=nn.Linear(4, 3), loss_fn=nn.CrossEntropyLoss(),
                         optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1), output_dir=tmp_path,
                         loggers=["tensorboard"])
    fl.fit(x=xs, y=ys, rounds=2, batch_size=16, validation_data=(xs, ys))
    fl.fit(x=xs, y=ys, rounds=1, batch_size=16)  # a second fit continues the same curves
    rows = jsonl(tmp_path / "metrics.jsonl")
    got = events(tmp_path / "tensorboard")
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key, value in scalars(r).items():
            assert got[key][r["round"]] == np.float32(value), key
    assert set(got["eval_metrics/accuracy"]) == {1, 2} and set(got["bytes_up"]) == {1, 2, 3}


def test_a_job_resumed_from_its_checkpoint_keeps_one_curve(tmp_path: Path) -> None:
    simulate(make_parts(), rounds=2, seed=0, output_dir=tmp_path, loggers=["tensorboard"])
    simulate(make_parts(), rounds=3, seed=0, output_dir=tmp_path, loggers=["tensorboard"], resume=True)
    rows, got = jsonl(tmp_path / "metrics.jsonl"), events(tmp_path / "tensorboard")
    assert [r["round"] for r in rows] == [1, 2, 3] and set(got["train_loss"]) == {1, 2, 3}
    assert all(got[k][r["round"]] == np.float32(v) for r in rows for k, v in scalars(r).items())


def test_loggers_are_named_or_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        MetricsWriter(tmp_path / "m.jsonl", loggers=["tensorbord"])
    with pytest.raises(ConfigError, match="output_dir"):
        tessera.FLModel(parties=["a"], model=nn.Linear(2, 1), loss_fn=nn.MSELoss(),
                        optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1), loggers=["tensorboard"])
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    with caplog.at_level(logging.WARNING, logger="tessera.core.tracking"):
        writer = MetricsWriter(tmp_path / "m.jsonl", loggers=["mlflow", "tensorboard"])
    assert [type(lg).__name__ for lg in writer.loggers] == ["TensorBoardLogger"]
    assert "'mlflow' skipped, MLflow is not installed" in caplog.text


def test_job_toml_switches_trackers_on() -> None:
    cfg = validate(JobConfig, {"job": {"tensorboard": True}}, source="job.toml")
    assert cfg.job.loggers() == ("tensorboard",)
    assert validate(JobConfig, {}, source="job.toml").job.loggers() == ()


def test_mlflow_local_store_holds_the_same_values(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    writer = MetricsWriter(tmp_path / "metrics.jsonl", loggers=["mlflow"])
    for rnd in (1, 2):
        writer.write(record(rnd))
    writer.close()
    logger = writer.loggers[0]
    assert isinstance(logger, tracking.MLflowLogger)
    client = MlflowClient(tracking_uri=tracking.mlflow_store_uri(tmp_path / "mlruns"))
    for r in jsonl(tmp_path / "metrics.jsonl"):
        for key, value in scalars(r).items():
            history = {m.step: m.value for m in client.get_metric_history(logger.run_id, key)}
            assert history[r["round"]] == pytest.approx(value, rel=1e-12), key
