"""`tessera demo split --quick` and `tessera psi` smoke tests, checked against what they must show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tessera.cli.main import app
from tessera.core.errors import ConfigError
from tests.fixtures import run_demo


@pytest.mark.slow
def test_demo_split_quick(tmp_path: Path) -> None:
    out, _ = run_demo("split", tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    # split learning equals centralised training epoch by epoch (same init, same batches)
    pairs = list(zip(summary["split_test_auc"], summary["centralised_test_auc"], strict=True))
    assert len(pairs) == 2 and all(abs(a - b) < 1e-6 for a, b in pairs)
    assert summary["psi"]["aligned"] == 569 - 40 - 30
    att = summary["attacks"]
    assert att["gradient noise"]["direction_attack_auc"] < att["none"]["direction_attack_auc"]
    assert (out / "split_demo.png").stat().st_size > 10_000


def test_psi_command_writes_aligned_rows(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("u1\nu2\nu3\nu4\n")
    (tmp_path / "b.txt").write_text("u4\nu9\nu2\n")
    result = CliRunner().invoke(app, ["psi", "--ids", f"alice={tmp_path / 'a.txt'}", "--ids",
                                      f"bob={tmp_path / 'b.txt'}", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    a = [["u1", "u2", "u3", "u4"][int(i)] for i in (tmp_path / "out" / "alice.rows").read_text().split()]
    b = [["u4", "u9", "u2"][int(i)] for i in (tmp_path / "out" / "bob.rows").read_text().split()]
    assert a == b and sorted(a) == ["u2", "u4"]


def test_split_simulate_runs_the_docs_split_app_and_resumes(tmp_path: Path) -> None:
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "vertical.md").read_text()
    source = next(b for b in re.findall(r"```python\n(.*?)```", doc, flags=re.S) if "def label_party" in b)
    (tmp_path / "credit_app.py").write_text(source)
    args = ["split-simulate", str(tmp_path / "credit_app.py"), "--label", "alice", "--owner", "bob",
            "--out", str(tmp_path / "run")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    records = [json.loads(line) for line in (tmp_path / "run" / "alice" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3] and "auc" in records[-1]["eval_metrics"]
    assert (tmp_path / "run" / "bob" / "ckpt-1.tsr").exists() and (tmp_path / "run" / "alice" / "score.png").exists()
    # resuming a finished 3-epoch run trains nothing more and keeps the same records
    again = CliRunner().invoke(app, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert [json.loads(line) for line in (tmp_path / "run" / "alice" / "metrics.jsonl").read_text().splitlines()
            ] == records


def test_split_advise_prints_every_cut_with_its_bytes(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(
        "from collections import OrderedDict\nfrom torch import nn\n"
        "model = nn.Sequential(OrderedDict(fc0=nn.Linear(30, 64), act0=nn.ReLU(), fc1=nn.Linear(64, 8), "
        "out=nn.Linear(8, 1)))\n")
    result = CliRunner().invoke(app, ["split-advise", str(tmp_path / "m.py"), "--input-shape", "30",
                                      "--rows", "1000"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ("fc0", "act0", "fc1"):
        assert name in result.output
    assert f"{1000 * (2 * 8 * 4 + 8):,}" in result.output and f"{1000 * (2 * 64 * 4 + 8):,}" in result.output
    bad = CliRunner().invoke(app, ["split-advise", str(tmp_path / "m.py"), "--input-shape", "a,b"])
    assert isinstance(bad.exception, ConfigError) and "--input-shape" in str(bad.exception)
