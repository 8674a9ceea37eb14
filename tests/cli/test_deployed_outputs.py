"""What a deployed run leaves behind, compared with the same job in simulation: a DP job whose budget runs out
stops cleanly (exit 0, the same rounds as the simulation, plots written), as docs/privacy.md promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.grpc_helpers import CLIENTS, free_port, make_certs, run_to_end, write_federation, write_job

DP = ('\n[dp]\nmode = "dpsgd"\nnoise_multiplier = 0.8\nmax_grad_norm = 1.0\ndelta = 1e-5\nreproducible = true\n'
      "budget = 7.5\n")  # 5.9 after round 1, 7.3 after 2, 8.4 after 3


@pytest.mark.slow
def test_a_deployed_dp_job_whose_budget_runs_out_stops_like_the_simulation(tmp_path: Path) -> None:
    from tessera.cli.hfl import run_job
    from tessera.core.config import load_job

    make_certs(tmp_path / "certs", ("server", *CLIENTS))
    fed = write_federation(tmp_path / "federation.toml", port=free_port())
    job = write_job(tmp_path / "job.toml", out=tmp_path / "out", rounds=8)
    job.write_text(job.read_text() + DP)
    assert "run stopped before round" in run_to_end(fed, job, args=("--plots",))
    deployed = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(deployed) == 2
    assert (tmp_path / "out" / "loss.png").is_file()

    cfg = load_job(job)
    data = cfg.model_dump()
    data["job"]["output_dir"] = str(tmp_path / "sim")
    simulated = run_job(type(cfg).model_validate(data), progress=False)
    assert [r["round"] for r in deployed] == [r["round"] for r in simulated.records]
    assert [r["epsilon"] for r in deployed] == [r["epsilon"] for r in simulated.records]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small `tessera lora` run exporting both bundles (and the plain transformers copy), for the tests below."""
    from tests.cli.test_mistakes import cli

    where = tmp_path_factory.mktemp("lora")
    out = where / "lora"
    r = cli(["lora", "--rounds", "1", "--clients", "2", "--train-size", "8", "--test-size", "4", "--hidden-size", "32",
             "--num-layers", "1", "--out", str(out), "--export", "both"], where)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_lora_writes_bundles_that_verify_from_another_folder(lora_run: Path, tmp_path: Path) -> None:
    from tests.cli.test_mistakes import cli

    out = lora_run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for kind in ("adapter", "merged"):
        v = cli(["verify", str(out / kind)], elsewhere)
        assert v.returncode == 0, v.stderr + v.stdout


def test_split_simulate_without_validation_prints_no_nan_and_plots_per_epoch(tmp_path: Path) -> None:
    from tests.cli.test_mistakes import ROOT, cli

    out = tmp_path / "split"
    args = ["split-simulate", "tests.e2e.grpc_helpers:SplitApp", "--label", "server", "--owner", "alice", "--owner",
            "bob", "--out", str(out)]
    r = cli(args, ROOT)
    assert r.returncode == 0, r.stderr
    assert "nan" not in r.stdout and "validation" not in r.stdout  # SplitApp.FIT has no validation split
    assert (out / "server" / "loss.png").is_file()
    again = cli(args, ROOT)  # the finished run is refused, not retrained over
    assert again.returncode == 2 and "already holds a run" in again.stderr


@pytest.mark.slow
def test_lora_merged_checkpoint_loads_as_plain_transformers_and_equals_the_bundle(lora_run: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tessera.export import load_bundle

    out = lora_run
    model = AutoModelForCausalLM.from_pretrained(out / "merged-hf", local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out / "merged-hf", local_files_only=True)
    ids = torch.tensor([tok("the weather today")["input_ids"]])
    mask = torch.ones_like(ids)
    bundle = load_bundle(out / "merged").eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, bundle(ids, mask))
