"""`tessera demo dp --quick`: the budget visibly ends the DP-SGD run; table, summary.json and dp.png are written.
And data windows that change size every round are accounted at each round's sampling rate."""

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tessera.cli.main import app
from tessera.core.errors import ConfigError
from tessera.horizontal.simulation import simulate
from tessera.privacy import DPSGD
from tests.fixtures import Window, run_demo, window_parts

DEVICES = ("camera", "thermostat", "doorbell", "hub", "plug")  # the demo's synthetic IoT devices


def test_windows_change_size_every_round() -> None:
    parts, windows = window_parts(base_rows=96)
    sizes = []
    for rnd in (1, 2, 3):
        windows["c0"].advance(rnd)
        sizes.append(len(windows["c0"]))
    assert len(set(sizes)) == 3 and all(48 <= s <= 144 for s in sizes)
    assert parts.clients == list(windows)


@pytest.mark.slow
def test_demo_dp_quick_shows_the_budget_stop(tmp_path: Path) -> None:
    out, _ = run_demo("dp", tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert "synthetic" in summary["data"]
    assert summary["non_private"]["rounds"] == summary["rounds_planned"]
    assert summary["dp_sgd"]["rounds"] < summary["rounds_planned"]  # the budget ended the run early
    assert "privacy budget exhausted" in summary["dp_sgd"]["stopped"]
    assert all(eps <= summary["budget_epsilon"] for eps in summary["dp_sgd"]["final_epsilon"].values())
    assert (out / "dp.png").stat().st_size > 10_000
    records = [json.loads(x) for x in (out / "dp_sgd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, summary["dp_sgd"]["rounds"] + 1))
    assert all(set(r["epsilon"]) <= set(DEVICES) for r in records)
    # `tessera dp-plot` redraws it from the metrics files; a run without DP is refused
    runner = CliRunner()
    png = tmp_path / "again.png"
    res = runner.invoke(app, ["dp-plot", str(out / "dp_sgd" / "metrics.jsonl"), "--baseline",
                              str(out / "non_private" / "metrics.jsonl"), "--budget", "3", "--out", str(png)])
    assert res.exit_code == 0, res.output
    assert png.stat().st_size > 10_000
    res = runner.invoke(app, ["dp-plot", str(out / "non_private" / "metrics.jsonl")])
    assert isinstance(res.exception, ConfigError) and "no round has an 'epsilon'" in str(res.exception)


def test_changing_windows_are_accounted_at_each_rounds_sampling_rate() -> None:
    # Oracle: Opacus' convention q = 1/len(loader) = 1/ceil(len(window)/32) for the window of that round
    parts, windows = window_parts(base_rows=64)
    dp = DPSGD(noise_multiplier=2.0, reproducible=True)
    simulate(parts, rounds=2, seed=0, plugins=[dp])
    for i, name in enumerate(list(windows)[:2]):
        expected = []
        for rnd in (1, 2):
            window = Window(i, seed=0, base_rows=64)
            window.advance(rnd)
            batches = math.ceil(len(window) / 32)
            expected.append((2.0, 1 / batches, batches))
        merged = expected if expected[0][1] != expected[1][1] else [(2.0, expected[0][1], 2 * expected[0][2])]
        assert dp.ledger.history[name] == merged
