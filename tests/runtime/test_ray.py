"""Ray backend end to end on a real local Ray (started once for the module): same results as in-process,
failed clients and dead actors counted while the round completes, client state that follows the client from
actor to actor, checkpoint/resume, and the `tessera demo scale` path (job.toml -> CLI job reader -> RayBackend)."""

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tessera.horizontal.checkpoint import load_checkpoint
from tessera.horizontal.client import CallNext, ClientContext
from tessera.horizontal.simulation import JobParts, simulate
from tessera.horizontal.strategies import FedAvg, Scaffold
from tessera.runtime.messages import FitIns

from ..horizontal.helpers import make_data, make_task, params_equal

pytestmark = pytest.mark.slow
ROUNDS = 3
RAY = {"num_actors": 2}


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_cluster: None) -> None:
    """Every test here runs on the session's Ray (tests/conftest.py)."""


def counter_mod(msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
    """Counts a client's fits and notes which process ran each one, in the client's persistent state."""
    if isinstance(msg, FitIns):
        ctx.state["fits"] = int(ctx.state.get("fits", 0)) + 1
        ctx.state["pids"] = [*ctx.state.get("pids", []), os.getpid()]
    return call_next(msg, ctx)


def raising_mod(msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
    """In round 1, c1 and c2 raise."""
    if isinstance(msg, FitIns) and msg.round == 1 and ctx.client in ("c1", "c2"):
        raise RuntimeError(f"{ctx.client} fails on purpose")
    return call_next(msg, ctx)


def exiting_mod(msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
    """In round 1, c1 raises and c2 kills the process it runs in (its Ray actor), after a pause in which the
    backend queues the next client behind it."""
    if isinstance(msg, FitIns) and msg.round == 1 and ctx.client == "c2":
        time.sleep(1.0)
        os._exit(1)
    return raising_mod(msg, ctx, call_next)


def scaffold_parts() -> JobParts:
    data = make_data(num_clients=4)
    strategy = Scaffold(local_lr=0.1, fraction_evaluate=0.0)
    return JobParts(task=make_task(data), strategy=strategy, clients=list(data), mods=[counter_mod])


def client_states(out: Path) -> dict[str, Any]:
    state: dict[str, Any] = load_checkpoint(out)["extensions"]["clients"]
    return state


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """SCAFFOLD + a counting mod, 3 rounds, in-process and on Ray (uninterrupted)."""
    out: dict[str, Any] = {}
    for backend in ("inprocess", "ray"):
        d = tmp_path_factory.mktemp(backend)
        history, params = simulate(scaffold_parts(), rounds=ROUNDS, seed=3, output_dir=d, backend=backend,
                                   backend_options=RAY if backend == "ray" else None)
        out[backend] = {"history": history, "params": params, "clients": client_states(d), "dir": d}
    return out


def test_ray_equals_inprocess_after_three_rounds(runs: dict[str, Any]) -> None:
    local, ray = runs["inprocess"], runs["ray"]
    assert params_equal(local["params"], ray["params"])
    for a, b in zip(local["history"].records, ray["history"].records, strict=True):
        assert (a["clients_sampled"], a["clients_succeeded"]) == (b["clients_sampled"], b["clients_succeeded"])
        assert a["train_loss"] == b["train_loss"]
    assert set(local["clients"]) == set(ray["clients"]) == {"c0", "c1", "c2", "c3"}
    for cid, state in local["clients"].items():  # SCAFFOLD's c_i: the per-client state both backends keep
        assert params_equal(state["scaffold_ci"], ray["clients"][cid]["scaffold_ci"])


def test_client_state_follows_the_client_across_actors(runs: dict[str, Any]) -> None:
    states = runs["ray"]["clients"]
    assert all(s["fits"] == ROUNDS and len(s["pids"]) == ROUNDS for s in states.values())
    driver = os.getpid()
    assert all(driver not in s["pids"] for s in states.values())  # clients ran in actors
    hopped = [cid for cid, s in states.items() if len(set(s["pids"])) > 1]
    assert hopped, "no client ran on two different actors; the test would not show state moving with it"
    assert runs["ray"]["history"].last["ray"]["actors"] == 2


def test_checkpoint_resume_on_ray_equals_uninterrupted(runs: dict[str, Any], tmp_path: Path) -> None:
    simulate(scaffold_parts(), rounds=2, seed=3, output_dir=tmp_path, backend="ray", backend_options=RAY)
    assert client_states(tmp_path)["c0"]["fits"] == 2
    history, params = simulate(scaffold_parts(), rounds=ROUNDS, seed=3, output_dir=tmp_path, backend="ray",
                               resume=True, backend_options={**RAY, "state_dir": str(tmp_path / "state")})
    assert params_equal(params, runs["ray"]["params"])
    assert [r["round"] for r in history.records] == [1, 2, 3]
    resumed = client_states(tmp_path)
    for cid, state in runs["ray"]["clients"].items():
        assert resumed[cid]["fits"] == ROUNDS
        assert params_equal(resumed[cid]["scaffold_ci"], state["scaffold_ci"])
    assert list((tmp_path / "state").iterdir()) == []  # the disk store removes its files on close


def test_a_ray_checkpoint_resumes_in_process(runs: dict[str, Any], tmp_path: Path) -> None:
    # Both backends write client state under the same extension name and format.
    shutil.copytree(runs["ray"]["dir"], tmp_path / "from_ray")
    _, resumed = simulate(scaffold_parts(), rounds=ROUNDS + 1, seed=3, output_dir=tmp_path / "from_ray", resume=True)
    _, straight = simulate(scaffold_parts(), rounds=ROUNDS + 1, seed=3, output_dir=tmp_path / "straight")
    assert params_equal(resumed, straight)
    assert client_states(tmp_path / "from_ray")["c0"]["fits"] == ROUNDS + 1


def test_raising_client_and_dead_actor_fail_the_client_not_the_round() -> None:
    def parts(mod: Any) -> JobParts:
        data = make_data(num_clients=6)
        return JobParts(task=make_task(data), strategy=FedAvg(fraction_evaluate=0.0), clients=list(data),
                        mods=[mod])

    # One actor, two requests queued on it: c3 waits behind c2 when c2 kills the actor, and must be moved to the
    # replacement actor rather than fail with it.
    ray_history, ray_params = simulate(parts(exiting_mod), rounds=2, seed=5, backend="ray",
                                       backend_options={"num_actors": 1, "max_inflight": 2})
    local_history, local_params = simulate(parts(raising_mod), rounds=2, seed=5)
    first, second = ray_history.records
    assert (first["clients_succeeded"], first["clients_failed"]) == (4, 2)
    reasons = {f["client"]: f["reason"] for f in first["failures"]}
    assert reasons["c1"].startswith("RuntimeError: c1 fails on purpose")
    assert reasons["c2"].startswith("actor died")
    assert first["ray"]["actor_restarts"] == 1
    assert first["ray"]["requeued"] == 1
    assert (second["clients_succeeded"], second["clients_failed"], second["ray"]["actors"]) == (6, 0, 1)
    # Oracle: the same two clients failing in-process gives the same params.
    assert [r["clients_failed"] for r in local_history.records] == [2, 0]
    assert params_equal(ray_params, local_params)


def test_demo_scale_quick_runs_the_job_path(tmp_path: Path) -> None:
    from tests.fixtures import run_demo

    out, _ = run_demo("scale", tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    for backend in ("inprocess", "ray"):
        assert summary[backend]["clients"] == 1000
        assert summary[backend]["sampled_per_round"] == [100, 100, 100]  # ceil(0.1 * 1000)
        assert summary[backend]["failed"] == 0
    assert summary["ray"]["final_central_accuracy"] == summary["inprocess"]["final_central_accuracy"]
    assert summary["ray"]["ray"]["actors"] == 2  # job.toml [ray] num_actors reached the backend
    assert summary["ray"]["ray"]["driver_peak_rss_mb"] > 0
    assert (out / "scale.png").stat().st_size > 10_000
    assert (out / "ray" / "metrics.jsonl").exists()
