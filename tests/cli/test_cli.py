"""The command line: a job runs and resumes; bad input gives one clear line and no traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.horizontal.checkpoint import load_checkpoint

JOB = """
[job]
name = "t"
rounds = {rounds}
seed = 1
output_dir = "{out}"
[data]
dataset = "digits"
num_clients = 4
partition = "iid"
[model]
hidden = [16]
[train]
batch_size = 64
[strategy]
{strategy}
"""


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tessera", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def write_job(tmp: Path, strategy: str = 'name = "fedavg"', rounds: int = 2) -> Path:
    job = tmp / "job.toml"
    job.write_text(JOB.format(rounds=rounds, out=(tmp / "out").as_posix(), strategy=strategy))
    return job


@pytest.mark.slow
def test_simulate_writes_metrics_plots_checkpoint_and_resumes(tmp_path: Path) -> None:
    r = run(["simulate", str(write_job(tmp_path, rounds=2))], tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert {"metrics.jsonl", "checkpoint.tsr", "loss.png", "accuracy.png", "bytes.png"} <= {p.name for p in
                                                                                            out.iterdir()}
    r = run(["simulate", str(write_job(tmp_path, rounds=3)), "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr
    rounds = [json.loads(s)["round"] for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]
    assert load_checkpoint(out)["round"] == 3


@pytest.mark.parametrize(
    ("strategy", "needle"),
    [
        ('name = "fedavgx"', "strategy.name: unknown strategy 'fedavgx'"),
        ('name = "fedavg"\nfraction_fit = -0.5', "strategy.fraction_fit: must be between 0 and 1"),
        ('name = "fedavg"\nlearning_rate = 3', "strategy.learning_rate: not an option of fedavg"),
    ],
)
def test_bad_job_gives_one_clear_line(tmp_path: Path, strategy: str, needle: str) -> None:
    r = run(["simulate", str(write_job(tmp_path, strategy))], tmp_path)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr + r.stdout and len(r.stderr.strip().splitlines()) == 1


def test_unknown_job_key_and_model_mismatch_are_named(tmp_path: Path) -> None:
    job = write_job(tmp_path)
    job.write_text(job.read_text().replace("[train]", "[train]\nepochs = 3"))
    r = run(["simulate", str(job)], tmp_path)
    assert r.returncode == 2 and "train.epochs: unknown key" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_checkpoint_of_a_different_model_is_refused_by_name(tmp_path: Path) -> None:
    assert run(["simulate", str(write_job(tmp_path))], tmp_path).returncode == 0
    job = write_job(tmp_path)
    job.write_text(job.read_text().replace("hidden = [16]", "hidden = [32]"))
    r = run(["simulate", str(job), "--resume"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "params: 'fc0.weight' is torch.float32 (16, 64), expected torch.float32 (32, 64)" in r.stderr
