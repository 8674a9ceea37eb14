"""`tessera demo llm --quick` end to end: the table's numbers are the summary's, and the PNG is written."""

import json
from pathlib import Path

from typer.testing import CliRunner

from tessera.cli.main import app


def test_demo_llm_quick_writes_summary_and_plot(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "llm", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "llm"
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "llm.png").stat().st_size > 10_000
    assert len(summary["clients"]) == 4 and summary["rounds"] == 2
    for c, v in summary["clients"].items():
        assert v["after"]["perplexity"] < v["before"]["perplexity"], c
        assert f"{v['after']['perplexity']:.2f}" in result.output
    # bytes: the full-model column is the measured adapter traffic plus (full - adapter) per params message
    per_msg = summary["full_model_tensor_bytes"] - summary["adapter_tensor_bytes"]
    msgs = 4 * 2 + 4  # FitIns + FitRes per client, EvaluateIns per client
    assert summary["full_model_bytes_per_round"][0] == summary["bytes_per_round"][0] + msgs * per_msg
