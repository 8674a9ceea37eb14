"""Horizontal FL deployed as real OS processes over loopback gRPC + mTLS.

Oracles: the final params in the coordinator's checkpoint equal the in-process simulation of the same job (bit
for bit), with the same client failing in the same round where a client is killed; attackers get the gRPC status
that proves where they were stopped, and nothing they sent changes the result.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from tessera.cli.jobs import build_parts
from tessera.core.config import load_job
from tessera.core.serde import encode_message
from tessera.horizontal.checkpoint import load_checkpoint
from tessera.horizontal.server import Server, ServerConfig
from tessera.horizontal.simulation import initial_params, simulate
from tessera.runtime.backend import InProcessBackend
from tessera.runtime.grpc import transport as tp
from tessera.runtime.grpc.certs import init_ca, issue
from tessera.runtime.messages import FitRes
from tests.e2e.grpc_helpers import (
    CLIENTS,
    Party,
    attack,
    free_port,
    make_certs,
    parties,
    run_to_end,
    write_federation,
    write_job,
)

pytestmark = pytest.mark.slow


def _setup(tmp_path: Path, *, extra: str = "", rounds: int = 3, rpc_deadline: float = 60) -> tuple[Path, Path, Path]:
    make_certs(tmp_path / "certs", ("server", *CLIENTS, "mallory"))
    fed = write_federation(tmp_path / "federation.toml", port=free_port(), extra=extra, rpc_deadline=rpc_deadline)
    out = tmp_path / "out"
    return fed, write_job(tmp_path / "job.toml", out=out, rounds=rounds), out


def _checkpoint(out: Path) -> dict[str, Any]:
    return load_checkpoint(out)


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_equal_params(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        assert torch.equal(got[k], w), f"{k} differs by {float((got[k] - w).abs().max())}"


class _FailAt:
    """In-process oracle for a client that dies: `client` fails every request of round `rnd`."""

    def __init__(self, app: Any, client: str, rnd: int) -> None:
        self.app, self.client, self.rnd = app, client, rnd

    def handle(self, client: str, msg: Any) -> Any:
        if client == self.client and msg.round == self.rnd:
            raise RuntimeError("killed")
        return self.app.handle(client, msg)


def _params_when_failing(job: Path, client: str, *, rnd: int) -> Any:
    """The oracle: the job's 3 rounds in-process, with `client` failing every request of round `rnd`."""
    cfg = load_job(job)
    parts = build_parts(cfg)
    oracle = Server(strategy=parts.strategy, backend=InProcessBackend(_FailAt(parts.client_app(), client, rnd)),
                    clients=parts.clients, initial_params=initial_params(parts.task, cfg.job.seed),
                    config=ServerConfig(rounds=3, seed=cfg.job.seed))
    oracle.run()
    return oracle.params


def test_three_rounds_over_mtls_equal_simulation_and_impostors_are_refused(tmp_path: Path) -> None:
    fed, job, out = _setup(tmp_path)
    evil = tmp_path / "evil"
    init_ca(evil)
    issue(evil, "alice")
    certs = tmp_path / "certs"
    with parties() as ps:
        coord = Party(fed, "server", job, exec_cli=True)  # `python -m tessera party`, as a user starts it
        ps.append(coord)
        coord.expect("listening on port")
        for name in ("alice", "bob"):
            ps.append(Party(fed, name, job))  # forked from a warm interpreter: the same CLI, started faster
        coord.expect("party (alice|bob) connected")
        coord.expect("party (alice|bob) connected")
        # While alice and bob hold their streams, every kind of impostor is stopped where it should be:
        # by TLS (no cert, another CA), by the identity check (wrong name, unknown party), or by the framing.
        # Each sends a HELLO and well-formed poisoned replies for the first request ids.
        poison = encode_message(FitRes(params={"w": torch.full((3,), 1e6)}, num_examples=10**6))
        forged = [tp.control(tp.Kind.HELLO, b"alice"), *(f for i in (1, 2, 3) for f in tp.split(i, poison, 16384))]
        assert attack(fed, claim="alice", cert=None, send=forged) == grpc.StatusCode.UNAVAILABLE
        assert attack(fed, claim="alice", cert=evil / "alice.crt", send=forged) == grpc.StatusCode.UNAVAILABLE
        assert attack(fed, claim="alice", cert=certs / "bob.crt", send=forged) == grpc.StatusCode.PERMISSION_DENIED
        assert attack(fed, claim="mallory", cert=certs / "mallory.crt", send=forged) == \
            grpc.StatusCode.PERMISSION_DENIED
        assert attack(fed, claim="carol", cert=certs / "carol.crt",
                      send=[b"\x80\x04garbage" * 10]) == grpc.StatusCode.INVALID_ARGUMENT
        huge = tp.HEADER.pack(tp.MAGIC, tp.Kind.DATA, 1, 0, 1, 2**40, 0) + b"x"
        assert attack(fed, claim="carol", cert=certs / "carol.crt", send=[huge]) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
        ps.append(Party(fed, "carol", job))
        assert coord.wait() == 0, coord.output()
        for p in ps[1:]:
            assert p.wait() == 0, p.output()
        assert "over 1 connection(s)" in ps[1].output()  # alice's stream survived the attacks on others

    cfg = load_job(job)
    _, want = simulate(build_parts(cfg), rounds=3, seed=cfg.job.seed)
    state = _checkpoint(out)
    assert state["round"] == 3
    _assert_equal_params(state["params"], want)
    assert [r["clients_succeeded"] for r in _records(out)] == [3, 3, 3]
    refused = json.loads((out / "transport.json").read_text())["refused"]
    assert [r["claimed"] for r in refused] == ["alice", "mallory", "carol", "carol"]


def test_killed_client_misses_round_two_and_rejoins_round_three(tmp_path: Path) -> None:
    fed, job, out = _setup(tmp_path, extra="rejoin_wait_s = 60")
    with parties() as ps:
        coord = Party(fed, "server", job)
        ps.append(coord)
        coord.expect("listening on port")
        ps += [Party(fed, "alice", job), Party(fed, "bob", job, env={"TESSERA_TEST_FAULT": "kill:FitIns:2"}),
               Party(fed, "carol", job)]
        assert ps[2].wait() == -signal.SIGKILL  # bob killed itself on receiving round 2's FitIns
        ps.append(Party(fed, "bob", job))  # restarted; the coordinator waits for it before round 3
        assert coord.wait() == 0, coord.output()
        for p in (ps[1], ps[3], ps[4]):
            assert p.wait() == 0, p.output()

    records = _records(out)
    assert [r["clients_succeeded"] for r in records] == [3, 2, 3]
    assert [f["client"] for f in records[1]["failures"]] == ["client1"]
    _assert_equal_params(_checkpoint(out)["params"], _params_when_failing(job, "client1", rnd=2))


def test_sigterm_checkpoints_and_resume_finishes_like_simulation(tmp_path: Path) -> None:
    fed, job, out = _setup(tmp_path)
    with parties() as ps:
        coord = Party(fed, "server", job)
        ps.append(coord)
        coord.expect("listening on port")
        # alice freezes on round 2's FitIns, so the signal deterministically arrives with round 2 in flight
        ps += [Party(fed, n, job, env={"TESSERA_TEST_FAULT": "stop:FitIns:2"} if n == "alice" else None)
               for n in CLIENTS]
        coord.expect("round 1 done")
        ps[1].wait_stopped()
        coord.signal(signal.SIGTERM)
        ps[1].signal(signal.SIGCONT)
        assert coord.wait() == 0, coord.output()
        assert "stopped on signal after round 2" in coord.output()  # round 2 was finished, not abandoned
        for p in ps[1:]:
            assert p.wait() == 0, p.output()  # the coordinator said BYE
    assert _checkpoint(out)["round"] == 2 and [r["clients_succeeded"] for r in _records(out)] == [3, 3]

    resumed = run_to_end(fed, job, args=("--resume",))
    cfg = load_job(job)
    _, want = simulate(build_parts(cfg), rounds=3, seed=cfg.job.seed)
    _assert_equal_params(_checkpoint(out)["params"], want)
    assert [r["round"] for r in _records(out)] == [1, 2, 3]
    assert "resumed from round 2" in resumed
    transport = json.loads((out / "transport.json").read_text())  # both sessions, labelled, and their totals
    assert [(s["session"], s["rounds"]) for s in transport["sessions"]] == [(1, [1, 2]), (2, [3, 3])]
    assert transport["bytes_up"] == sum(s["bytes_up"] for s in transport["sessions"]) > 0


def test_a_silent_client_is_marked_failed_and_the_round_completes_with_the_others(tmp_path: Path) -> None:
    fed, job, out = _setup(tmp_path, extra="rejoin_wait_s = 60", rpc_deadline=6)
    with parties() as ps:
        coord = Party(fed, "server", job)
        ps.append(coord)
        coord.expect("listening on port")
        # carol freezes (SIGSTOP: her connection stays open, nothing is answered) on round 2's FitIns
        ps += [Party(fed, "alice", job), Party(fed, "bob", job),
               Party(fed, "carol", job, env={"TESSERA_TEST_FAULT": "stop:FitIns:2"})]
        coord.expect("round 2 done")
        ps[3].signal(signal.SIGCONT)  # she wakes up, her late replies are dropped, and she is in round 3
        assert coord.wait() == 0, coord.output()
        for p in ps[1:]:
            assert p.wait() == 0, p.output()

    records = _records(out)
    assert [r["clients_succeeded"] for r in records] == [3, 2, 3]
    assert [f["client"] for f in records[1]["failures"]] == ["client2"]
    assert "sent no reply within 6" in records[1]["failures"][0]["reason"]
    _assert_equal_params(_checkpoint(out)["params"], _params_when_failing(job, "client2", rnd=2))


def test_sigterm_to_a_client_and_to_a_waiting_coordinator_exits_0(tmp_path: Path) -> None:
    fed, job, out = _setup(tmp_path)
    with parties() as ps:
        coord = Party(fed, "server", job)
        ps.append(coord)
        coord.expect("listening on port")
        alice = Party(fed, "alice", job)
        ps.append(alice)
        coord.expect("party alice connected")
        alice.signal(signal.SIGTERM)
        assert alice.wait() == 0, alice.output()
        assert "party alice done: 0 requests served over 1 connection" in " ".join(alice.output().split())
        coord.expect("party alice disconnected")
        coord.signal(signal.SIGINT)  # still waiting for its quorum: stops waiting, exits 0
        assert coord.wait() == 0, coord.output()
    # no round ran: nothing is written, so the folder stays fresh (a round-0 checkpoint would pass for a run)
    assert not (out / "checkpoint.tsr").exists() and not (out / "metrics.jsonl").exists()
