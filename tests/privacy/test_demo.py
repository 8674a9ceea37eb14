"""`tessera demo dp --quick`: the budget visibly ends the DP-SGD run; table, summary.json and dp.png are written."""

import json
from pathlib import Path

import pytest

from tessera.cli.dp import DEVICES, intrusion_parts
from tessera.cli.main import DEMOS


def test_traffic_windows_change_size_every_round() -> None:
    parts = intrusion_parts(base_rows=96, test_rows=10)
    sizes = []
    for rnd in (1, 2, 3):
        parts.windows["camera"].advance(rnd)  # type: ignore[attr-defined]
        sizes.append(len(parts.windows["camera"]))  # type: ignore[attr-defined]
    assert len(set(sizes)) == 3 and all(48 <= s <= 144 for s in sizes)
    assert parts.clients == list(DEVICES)


@pytest.mark.slow
def test_demo_dp_quick_shows_the_budget_stop(tmp_path: Path) -> None:
    DEMOS["dp"](tmp_path, True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "synthetic" in summary["data"]
    assert summary["non_private"]["rounds"] == summary["rounds_planned"]
    assert summary["dp_sgd"]["rounds"] < summary["rounds_planned"]  # the budget ended the run early
    assert "privacy budget exhausted" in summary["dp_sgd"]["stopped"]
    assert all(eps <= summary["budget_epsilon"] for eps in summary["dp_sgd"]["final_epsilon"].values())
    assert (tmp_path / "dp.png").stat().st_size > 10_000
    records = [json.loads(x) for x in (tmp_path / "dp_sgd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, summary["dp_sgd"]["rounds"] + 1))
    assert all(set(r["epsilon"]) <= set(DEVICES) for r in records)
