"""`tessera demo secagg --quick` runs end to end and its table says what the protocol guarantees."""

import json
from pathlib import Path

import pytest

from tests.fixtures import run_demo


@pytest.mark.slow
def test_demo_quick(tmp_path: Path) -> None:
    out, _ = run_demo("secagg", tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert set(runs) == {"plain (no dropout)", "plain, 30% dropout", "secagg+, 30% dropout", "ckks, 30% dropout"}
    base = runs["plain, 30% dropout"]
    for name in ("secagg+, 30% dropout", "ckks, 30% dropout"):
        assert abs(runs[name]["final_accuracy"] - base["final_accuracy"]) <= 0.01
        assert runs[name]["clients_succeeded"] == base["clients_succeeded"] == [7] * summary["rounds"]
    assert runs["secagg+, 30% dropout"]["bytes_up"] > base["bytes_up"]  # keys, shares and masks cost bytes
    assert (out / "secagg.png").stat().st_size > 10_000
