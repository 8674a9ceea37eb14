"""`tessera export` / `inspect` / `verify`, and the export demo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tessera.core.config import JobConfig, validate
from tessera.core.errors import ExportError
from tessera.export import load_bundle
from tessera.horizontal.checkpoint import load_checkpoint


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tessera", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tessera.cli.jobs import build_parts
    from tessera.horizontal.simulation import simulate

    tmp = tmp_path_factory.mktemp("job")
    job = {"job": {"name": "t", "rounds": 1, "seed": 1, "output_dir": str(tmp / "out")},
           "data": {"dataset": "digits", "num_clients": 3, "partition": "iid", "central_test_fraction": 0.2},
           "model": {"hidden": [16]}, "train": {"batch_size": 64}, "strategy": {"name": "fedavg"}}
    simulate(build_parts(validate(JobConfig, job, source="test")), rounds=1, seed=1, output_dir=tmp / "out")
    toml = tmp / "job.toml"
    toml.write_text("\n".join(f"[{k}]\n" + "\n".join(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())
                              for k, v in job.items()))
    result = CliRunner().invoke(_app(), ["export", str(toml), "--out", str(tmp / "bundle")])
    assert result.exit_code == 0, result.output
    return tmp / "bundle"


def test_export_writes_the_checkpointed_model_with_its_provenance(exported: Path) -> None:

    state = load_checkpoint(exported.parent / "out")
    loaded = load_bundle(exported)
    assert all(torch.equal(v, state["params"][k]) for k, v in loaded.state_dict().items())
    result = CliRunner().invoke(_app(), ["inspect", str(exported)])
    assert result.exit_code == 0, result.output
    assert "tessera.core.models:MLP" in result.output and "fedavg / 1" in result.output
    assert "client0, client1, client2" in result.output


def test_verify_in_a_fresh_process_is_bit_exact_and_tampering_fails(exported: Path,
                                                                                 tmp_path: Path) -> None:
    r = run(["verify", str(exported), "--json"], tmp_path)  # the CLI's own process: a fresh one
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["exact"] and report["files_checked"] == 2
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-3] ^= 0x10
    (bad / "model.safetensors").write_bytes(bytes(data))
    result = CliRunner().invoke(_app(), ["verify", str(bad)])
    assert result.exit_code != 0 and isinstance(result.exception, ExportError)
    assert "hash mismatch: model.safetensors" in str(result.exception)


@pytest.mark.slow
def test_export_demo_quick(tmp_path: Path) -> None:
    from tests.fixtures import run_demo

    out, _ = run_demo("export", tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["variant"]: r for r in summary["bundles"]}
    assert rows["float32"]["bit_exact"] and rows["float32"]["max_abs_error"] == 0.0
    assert not rows["float16"]["bit_exact"] and rows["float16"]["verified"]
    assert rows["float16"]["max_abs_error"] <= rows["float16"]["atol"]
    assert rows["float32 + onnx"]["onnx_error"] < 1e-4
    ho = summary["handover"]
    assert ho["interrupted"] == "TransportError" and 0 < ho["resumed_bytes"] < ho["total_bytes"] and ho["exact"]
    assert (out / "export.png").stat().st_size > 10_000


def _app():  # the typer app, imported late so collection stays cheap
    from tessera.cli.main import app

    return app


def test_export_signed_by_a_party_verifies_against_the_federation_ca_from_the_cli(exported: Path,
                                                                                 tmp_path: Path) -> None:
    from tessera.runtime.grpc.certs import init_ca, issue

    certs, other = tmp_path / "certs", tmp_path / "other"
    init_ca(certs)
    init_ca(other)
    issue(certs, "alice")
    issue(other, "alice")  # an impostor "alice" from another CA
    toml = exported.parent / "job.toml"
    signed = tmp_path / "signed"
    result = CliRunner().invoke(_app(), ["export", str(toml), "--out", str(signed), "--sign-cert",
                                         str(certs / "alice.crt"), "--sign-key", str(certs / "alice.key")])
    assert result.exit_code == 0, result.output
    assert run(["verify", str(signed), "--trust", str(certs / "ca.crt"), "--signer", "alice"], tmp_path).returncode == 0
    wrong = run(["verify", str(signed), "--trust", str(certs / "ca.crt"), "--signer", "bob"], tmp_path)
    assert wrong.returncode == 2 and "bob" in wrong.stderr and "Traceback" not in wrong.stderr
    impostor = tmp_path / "impostor"
    result = CliRunner().invoke(_app(), ["export", str(toml), "--out", str(impostor), "--sign-cert",
                                         str(other / "alice.crt"), "--sign-key", str(other / "alice.key")])
    assert result.exit_code == 0, result.output
    refused = run(["verify", str(impostor), "--trust", str(certs / "ca.crt")], tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    unsigned = run(["verify", str(exported), "--trust", str(certs / "ca.crt")], tmp_path)
    assert unsigned.returncode == 2  # a trust requirement refuses an unsigned bundle
