"""Asynchronous FedBuff deployed over loopback gRPC + mTLS with real processes, the coordinator SIGKILLed mid-run.

job.toml picks the policy (`[schedule] policy = "fedbuff"`); the coordinator and three client parties are separate
processes. The test freezes every client (SIGSTOP) once a few server steps are done, so the coordinator is
certainly mid-run, SIGKILLs it, reads its last checkpoint, then restarts it with `--resume` and lets the same client
processes go on (they reconnect).

Oracles: the checkpoint is consistent (version == steps, K updates per step: every applied update is in it); the
resumed coordinator says it starts from that step; its first step is counted from the checkpoint's update counter
(no applied update lost or applied twice); the finished run holds exactly rounds * K updates and one record per
step; the transport log holds one session, [step + 1, rounds].
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from tessera.horizontal.checkpoint import load_checkpoint
from tests.e2e.grpc_helpers import CLIENTS, Party, free_port, make_certs, parties, write_federation, write_job

pytestmark = pytest.mark.slow
ROUNDS, K = 40, 2
SCHEDULE = f"""
[schedule]
policy = "fedbuff"
buffer_size = {K}
concurrency = 3
"""


def _checkpoint(out: Path) -> dict[str, Any]:
    return load_checkpoint(out)


def test_fedbuff_over_grpc_survives_a_coordinator_kill_and_resumes_without_losing_updates(tmp_path: Path) -> None:
    # Prepare: FedBuff strategy + asynchronous schedule from job.toml
    make_certs(tmp_path / "certs", ("server", *CLIENTS))
    fed = write_federation(tmp_path / "federation.toml", port=free_port())
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.toml", out=out, rounds=ROUNDS)
    job.write_text(job.read_text().replace('name = "fedavg"\nmin_available = 2',
                                           f'name = "fedbuff"\nbuffer_size = {K}\nmin_available = 2') + SCHEDULE)

    with parties() as ps:
        # Execute 1: run until step 3 is done, freeze every client, kill -9 the coordinator
        coord = Party(fed, "server", job)
        ps.append(coord)
        coord.expect("listening on port")
        clients = [Party(fed, n, job) for n in CLIENTS]
        ps.extend(clients)
        coord.expect("round 3 done")
        for c in clients:
            c.signal(signal.SIGSTOP)
        coord.signal(signal.SIGKILL)
        assert coord.wait() == -signal.SIGKILL
        before = _checkpoint(out)
        step = before["round"]
        sched = before["scheduling"]
        # every update applied in a step is in the checkpoint: K per step, version == steps
        assert 3 <= step < ROUNDS and sched["version"] == step and sched["updates"] == K * step, sched

        # Execute 2: restart with --resume; the same client processes wake up and reconnect
        coord = Party(fed, "server", job, args=("--resume",))
        ps.append(coord)
        coord.expect("listening on port")
        for c in clients:
            c.signal(signal.SIGCONT)
        assert coord.wait(120) == 0, coord.output()
        for c in clients:
            assert c.wait() == 0, c.output()  # the coordinator said BYE

    # Assert: resumed from exactly the checkpoint, no update lost or counted twice
    assert f"resumed from round {step}" in coord.output()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    assert [r["updates"] for r in records] == [K * r for r in range(1, ROUNDS + 1)]
    assert records[step]["updates"] == sched["updates"] + K  # the first resumed step starts from the checkpoint
    after = _checkpoint(out)
    assert after["round"] == ROUNDS and after["scheduling"]["updates"] == K * ROUNDS
    assert after["scheduling"]["version"] == ROUNDS
    assert all(torch.isfinite(t).all() for t in after["params"].values())
    assert any(not torch.equal(after["params"][k], before["params"][k]) for k in before["params"])
    transport = json.loads((out / "transport.json").read_text())  # the killed session wrote none
    assert [s["rounds"] for s in transport["sessions"]] == [[step + 1, ROUNDS]]
