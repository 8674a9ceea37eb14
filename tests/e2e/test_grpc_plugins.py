"""Jobs with a plugin section deployed over loopback gRPC + mTLS, coordinator and clients as separate processes.

- `[secagg]` (SecAgg+): the four SecAgg+ stages cross the wire as ordinary messages.
- `[dp]` (DP-SGD at every client, reproducible noise): each client's ledger lives in its own process.

Oracle: the final params equal the in-process simulation of the same job file bit for bit, and so does every
round's per-party epsilon.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tessera.cli.jobs import build_parts, build_plugins
from tessera.core.config import load_job
from tessera.horizontal.checkpoint import load_checkpoint
from tessera.horizontal.simulation import simulate
from tests.e2e.grpc_helpers import CLIENTS, free_port, make_certs, run_to_end, write_federation, write_job

pytestmark = pytest.mark.slow
SECAGG = "\n[secagg]\nthreshold = 0.6\nclip = 4.0\nbits = 32\n"
DP = "\n[dp]\nmode = \"dpsgd\"\nnoise_multiplier = 1.0\nmax_grad_norm = 1.0\ndelta = 1e-5\nreproducible = true\n"


@pytest.mark.parametrize("section", [SECAGG, DP], ids=["secagg", "dp"])
def test_plugin_job_over_grpc_equals_simulation(tmp_path: Path, section: str) -> None:
    make_certs(tmp_path / "certs", ("server", *CLIENTS))
    fed = write_federation(tmp_path / "federation.toml", port=free_port())
    job = write_job(tmp_path / "job.toml", out=tmp_path / "out", rounds=2)
    job.write_text(job.read_text() + section)
    run_to_end(fed, job)

    cfg = load_job(job)
    history, want = simulate(build_parts(cfg), rounds=2, seed=cfg.job.seed, plugins=build_plugins(cfg))
    got = load_checkpoint(tmp_path / "out")["params"]
    assert list(got) == list(want)
    for k, w in want.items():
        assert torch.equal(got[k], w), f"{k} differs by {float((got[k] - w).abs().max())}"
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_succeeded"] for r in records] == [3, 3]
    eps = [{k: v for k, v in r.items() if "epsilon" in k} for r in records]
    assert eps == [{k: v for k, v in r.items() if "epsilon" in k} for r in history.records]
    if section == DP:
        assert all(e for e in eps), "no epsilon was recorded"
    else:
        per_client = json.loads((tmp_path / "out" / "transport.json").read_text())["per_client"]
        assert set(per_client) == {"client0", "client1", "client2"}  # the job's client ids, served by the parties
