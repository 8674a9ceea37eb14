"""`tessera demo grpc --quick` smoke test: the deployed run equals the simulation and both impostors are refused."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fixtures import run_demo


def test_grpc_demo_quick_matches_simulation_and_refuses_impostors(tmp_path: Path) -> None:
    out, _ = run_demo("grpc", tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["max_param_diff"] == 0.0
    assert [r["train_loss"] for r in summary["grpc"]] == [r["train_loss"] for r in summary["simulation"]]
    refused = summary["refused"]
    assert "could not reach the coordinator" in refused["alice, certificate from another CA"]
    assert "PERMISSION_DENIED" in refused["mallory's genuine certificate, claiming bob"]
    assert (out / "grpc_vs_simulation.png").stat().st_size > 10_000
