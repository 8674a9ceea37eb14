"""`tessera demo split --quick` and `tessera psi` smoke tests, checked against what they must show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tessera.cli.main import app
from tessera.cli.split import demo_split


@pytest.mark.slow
def test_demo_split_quick(tmp_path: Path) -> None:
    demo_split(tmp_path, True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    # split learning equals centralised training epoch by epoch (same init, same batches)
    pairs = list(zip(summary["split_test_auc"], summary["centralised_test_auc"], strict=True))
    assert len(pairs) == 2 and all(abs(a - b) < 1e-6 for a, b in pairs)
    assert summary["psi"]["aligned"] == 569 - 40 - 30
    att = summary["attacks"]
    assert att["gradient noise"]["direction_attack_auc"] < att["none"]["direction_attack_auc"]
    assert (tmp_path / "split_demo.png").stat().st_size > 10_000


def test_psi_command_writes_aligned_rows(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("u1\nu2\nu3\nu4\n")
    (tmp_path / "b.txt").write_text("u4\nu9\nu2\n")
    result = CliRunner().invoke(app, ["psi", "--ids", f"alice={tmp_path / 'a.txt'}", "--ids",
                                      f"bob={tmp_path / 'b.txt'}", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    a = [["u1", "u2", "u3", "u4"][int(i)] for i in (tmp_path / "out" / "alice.rows").read_text().split()]
    b = [["u4", "u9", "u2"][int(i)] for i in (tmp_path / "out" / "bob.rows").read_text().split()]
    assert a == b and sorted(a) == ["u2", "u4"]
