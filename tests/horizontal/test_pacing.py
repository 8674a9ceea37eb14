"""Real-clock pacing: injected per-step delays, time budgets, and deadline rounds (in-process threads and gRPC).

Oracles: pacing never changes the maths (paced training equals unpaced training for the same steps); a time-budgeted
client's partial work equals training for exactly the steps it reported; a deadline round with a dropped straggler
equals a synchronous FedNova round of the others with the same step counts; a folded late update equals
current + (1 + s)^-1/2 (y - x_sent) with y retrained by hand; a step-budget run over gRPC equals the in-process run.
Clients that train concurrently in threads of one process share torch's global RNG, so these tests train without
shuffling (the maths is then independent of thread timing); separate processes do not share it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tessera.core.errors import ConfigError
from tessera.core.types import Params
from tessera.horizontal.client import ClientContext, client_seed, seeded
from tessera.horizontal.job import compose
from tessera.horizontal.pacing import STEP_DELAY, TIME_BUDGET, PacedTask, Pacing, speed_spread
from tessera.horizontal.realtime import Deadline, Late
from tessera.horizontal.server import Server, ServerConfig
from tessera.horizontal.simulation import JobParts, initial_params, simulate
from tessera.horizontal.strategies import FedNova
from tessera.horizontal.strategies.base import FitResults

from .helpers import make_data, make_task, params_equal


def test_speed_spread_is_seeded_and_exact() -> None:
    clients = [f"c{i}" for i in range(10)]
    a = speed_spread(clients, spread=10.0, base_delay=0.01, seed=3)
    assert a == speed_spread(clients, spread=10.0, base_delay=0.01, seed=3)
    assert a != speed_spread(clients, spread=10.0, base_delay=0.01, seed=4)
    assert min(a.values()) == pytest.approx(0.01) and max(a.values()) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="spread"):
        speed_spread(clients, spread=0.5)


def test_step_delay_slows_training_but_never_changes_it() -> None:
    data = make_data(num_clients=1, rows=32)
    task = make_task(data, shuffle=False)
    train, _ = task.data_fn("c0", 1)
    init = task.model_fn().state_dict()
    models = []
    for config in ({}, {STEP_DELAY: 0.02}):
        model = task.model_fn()
        model.load_state_dict(init)
        start = time.monotonic()
        with seeded(5):
            metrics = PacedTask(task).train(model, train, config)
        models.append((model, metrics, time.monotonic() - start))
    (plain, m0, _), (slow, m1, took) = models
    assert m0["steps"] == m1["steps"] == 4 and took >= 4 * 0.02  # a sleep lasts at least its delay
    assert params_equal(plain.state_dict(), slow.state_dict())


def _replay(task: Any, start: Params, client: str, seed: int, steps: int) -> Params:
    model = task.model_fn()
    model.load_state_dict(start)
    train, _ = task.data_fn(client, 1)
    with seeded(seed):
        task.train(model, train, {"max_steps": steps})
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_time_budget_stops_early_and_the_partial_work_is_exactly_the_reported_steps() -> None:
    data = make_data(num_clients=1, rows=160)  # 20 steps of batch 8
    task = make_task(data, shuffle=False)
    model = task.model_fn()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train, _ = task.data_fn("c0", 1)
    with seeded(9):
        metrics = PacedTask(task).train(model, train, {STEP_DELAY: 0.03, TIME_BUDGET: 0.15})
    steps = int(metrics["steps"])
    assert 1 <= steps < 20
    assert params_equal(model.state_dict(), _replay(task, start, "c0", 9, steps))


class Recording(FedNova):
    """FedNova that keeps what each aggregation saw (the oracle reads it)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(fraction_evaluate=0.0, **kw)
        self.seen: list[tuple[int, FitResults, Params]] = []

    def aggregate_fit(self, rnd: int, results: FitResults, current: Params) -> Params:
        self.seen.append((rnd, list(results), dict(current)))
        return super().aggregate_fit(rnd, results, current)


def _deadline_run(delays: dict[str, float], policy: Deadline, rounds: int, *, rows: int = 64,
                  workers: int = 1) -> tuple[Any, Params, Recording, JobParts]:
    data = make_data(num_clients=len(delays), rows=rows)
    strategy = Recording()
    parts = JobParts(task=make_task(data, shuffle=False), strategy=strategy, clients=list(data))

    def use(server: Server) -> None:
        server.scheduling = policy

    hist, params = simulate(parts, rounds=rounds, seed=2, plugins=[Pacing(delays)], on_server=use,
                            backend_options={"max_workers": workers})
    return hist, params, strategy, parts


def _per_client_steps(steps: dict[str, int]) -> Any:
    def mod(msg: Any, ctx: ClientContext, call_next: Any) -> Any:
        ctx.train_config["max_steps"] = steps[ctx.client]
        return call_next(msg, ctx)
    return mod


@pytest.mark.parametrize("workers", [1, 3])
def test_wall_clock_deadline_drops_the_straggler_and_keeps_partial_work(workers: int) -> None:
    delays = {"c0": 0.0, "c1": 0.02, "c2": 0.8}  # c2's single step outlasts deadline + grace
    hist, params, _, _ = _deadline_run(delays, Deadline(seconds=0.2, grace=0.1, late=Late.DROP), 1,
                                       workers=workers)
    rec = hist.records[0]
    assert rec["clients_failed"] == 1 and rec["failures"][0]["client"] == "c2"
    assert rec["failures"][0]["kind"] == "timeout"
    steps = {c: int(s) for c, s in rec["steps"].items()}
    assert set(steps) == {"c0", "c1"} and steps["c0"] == 8  # c0: a full epoch (64 rows / 8)
    # Oracle: a synchronous FedNova round over c0 and c1 with exactly these step counts.
    data = make_data(num_clients=3, rows=64)
    replay = JobParts(task=make_task(data, shuffle=False), strategy=FedNova(fraction_evaluate=0.0),
                      clients=["c0", "c1"], mods=[_per_client_steps(steps)])
    _, expected = simulate(replay, rounds=1, seed=2)
    assert params_equal(params, expected)


def test_late_update_is_folded_into_a_later_round_with_its_staleness_weight() -> None:
    # c0, c1 train ~0.5 s per round (budget-bound); c2's single step takes 1.6 s: late for round 1 (ends at 1 s),
    # so it lands in round 2, 3 or 4 of 6 and is folded there, not sampled again while it trains.
    delays = {"c0": 0.1, "c1": 0.1, "c2": 1.6}
    hist, _, strategy, parts = _deadline_run(delays, Deadline(seconds=0.5, grace=0.5, late=Late.FOLD), 6)
    assert hist.records[0]["failures"][0]["client"] == "c2" and hist.records[0]["late_pending"] == ["c2"]
    folds = [(r["round"], c) for r in hist.records for c in r["late_folded"]]
    timeouts = [r["round"] for r in hist.records for f in r["failures"] if f["client"] == "c2"]
    assert folds and all(c == "c2" for _, c in folds) and len(folds) <= len(timeouts)
    for r in hist.records:  # never asked again while its late work is pending
        assert not ("c2" in r["steps"] and r["round"] > 1 and "c2" in hist.records[r["round"] - 2]["late_pending"]
                    and "c2" not in r["late_folded"])
    fold_rnd = folds[0][0]
    _, results, current = strategy.seen[fold_rnd - 1]
    late = dict(results)["c2"]
    s = fold_rnd - 1
    assert late.metrics["late_by"] == s
    x0 = initial_params(parts.task, 2)
    task = make_task(make_data(num_clients=3, rows=64), shuffle=False)
    y = _replay(task, x0, "c2", client_seed(2, 1, "c2"), int(late.metrics["steps"]))
    w = (1 + s) ** -0.5
    for k in current:
        expected = (current[k].double() + w * (y[k].double() - x0[k].double())).float()
        assert torch.equal(late.params[k], expected)


def test_a_deadline_nobody_meets_waits_for_a_quorum_instead_of_failing_the_round() -> None:
    delays = {"c0": 0.3, "c1": 0.3, "c2": 0.3}  # everyone's first (obligatory) step outlasts 50 ms
    hist, _, strategy, _ = _deadline_run(delays, Deadline(seconds=0.05, grace=0.0), 1, rows=8, workers=3)
    rec = hist.records[0]
    assert rec["deadline_extended"] is True and rec["clients_succeeded"] >= 1  # min_available = 1
    assert rec["clients_succeeded"] + rec["clients_failed"] == 3
    assert all(f["kind"] == "timeout" for f in rec["failures"])
    assert len(strategy.seen[0][1]) == rec["clients_succeeded"]


def test_deadline_refuses_ambiguous_budgets() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        Deadline(seconds=1.0, steps=3)
    with pytest.raises(ConfigError, match="Pacing"):
        data = make_data(num_clients=2)
        parts = JobParts(task=make_task(data, shuffle=False), strategy=FedNova(), clients=list(data))
        compose(parts, [Pacing({"c0": 0.1})])


# ------------------------------------------------------------------------------------------------- over gRPC
ROUTES = {"c0": "alice", "c1": "bob", "c2": "carol"}


def _grpc_run(certs: Path, policy: Deadline, delays: dict[str, float], rounds: int) -> tuple[Any, Params]:
    from tessera.runtime.grpc import ClientParty, GrpcBackend
    from tessera.runtime.grpc.config import build

    def fed(port: int) -> Any:
        parties = [{"name": "server", "role": "coordinator", "address": f"127.0.0.1:{port}"},
                   *({"name": n} for n in ROUTES.values())]
        settings = {"ca_cert": "ca.crt", "certs_dir": ".", "chunk_bytes": 16384, "quorum_deadline_s": 20,
                    "rpc_deadline_s": 20, "retry": {"initial_backoff_s": 0.05, "max_attempts": 50}}
        return build({"federation": settings, "parties": parties}, source="test", base=certs)

    data = make_data(num_clients=3)
    job = JobParts(task=make_task(data, shuffle=False), strategy=FedNova(fraction_evaluate=0.0), clients=list(data))
    parts = compose(job, [Pacing(delays)])
    backend = GrpcBackend(fed(0), dict(ROUTES), min_clients=2)
    port = backend.listen()
    apps = {n: ClientParty(fed(port), n, parts.client_app()) for n in ROUTES.values()}
    threads = [threading.Thread(target=p.run, daemon=True) for p in apps.values()]
    for t in threads:
        t.start()
    server = Server(strategy=parts.strategy, backend=backend, clients=parts.clients,
                    initial_params=initial_params(parts.task, 2), config=ServerConfig(rounds=rounds, seed=2),
                    scheduling=policy)
    hist = server.run()
    for t in threads:
        t.join(10)
    return hist, server.params


@pytest.mark.slow
def test_step_budget_over_grpc_equals_the_in_process_run(certs: Path) -> None:
    delays = {"c0": 0.0, "c1": 0.005, "c2": 0.02}
    hist, params = _grpc_run(certs, Deadline(steps=2), delays, 2)
    assert hist["clients_succeeded"] == [3, 3]
    data = make_data(num_clients=3)
    local = JobParts(task=make_task(data, shuffle=False), strategy=FedNova(fraction_evaluate=0.0),
                     clients=list(data))
    _, expected = simulate(local, rounds=2, seed=2, plugins=[Pacing(delays)],
                           on_server=lambda s: setattr(s, "scheduling", Deadline(steps=2)))
    assert params_equal(params, expected)


@pytest.mark.slow
def test_wall_clock_deadline_over_grpc_drops_the_straggler(certs: Path) -> None:
    hist, _ = _grpc_run(certs, Deadline(seconds=0.3, grace=0.2), {"c0": 0.0, "c1": 0.0, "c2": 1.2}, 1)
    rec = hist.records[0]
    assert rec["clients_succeeded"] == 2 and [f["client"] for f in rec["failures"]] == ["c2"]
    assert rec["failures"][0]["kind"] == "timeout"


# ------------------------------------------------------------------------------------------------- over Ray
def _policy_run(backend: str, policy: Any, strategy: Any, rounds: int) -> tuple[Any, Params]:
    data = make_data(num_clients=3)
    parts = JobParts(task=make_task(data, shuffle=False), strategy=strategy, clients=list(data))
    return simulate(parts, rounds=rounds, seed=2, backend=backend,
                    on_server=lambda s: setattr(s, "scheduling", policy()))


@pytest.mark.slow
def test_real_clock_policies_over_ray_equal_the_in_process_runs(ray_cluster: None) -> None:
    from tessera.horizontal.realtime import Asynchronous
    from tessera.horizontal.strategies import FedBuff

    # Deterministic schedules: a step budget per round; one client training at a time (arrival order is fixed)
    cases = [(lambda: Deadline(steps=2), lambda: FedNova(fraction_evaluate=0.0), 2),
             (lambda: Asynchronous(buffer_size=2, concurrency=1),
              lambda: FedBuff(buffer_size=2, fraction_evaluate=0.0), 3)]
    for policy, strategy, rounds in cases:
        h_local, p_local = _policy_run("inprocess", policy, strategy(), rounds)
        h_ray, p_ray = _policy_run("ray", policy, strategy(), rounds)
        assert params_equal(p_ray, p_local), policy()
        assert h_ray["clients_succeeded"] == h_local["clients_succeeded"]
    assert h_ray["updates"] == [2, 4, 6]


# ------------------------------------------------------------------------------------------------- job.toml
def test_schedule_section_picks_and_validates_the_policy() -> None:
    from tessera.cli.jobs import build_scheduling
    from tessera.core.config import JobConfig, validate
    from tessera.horizontal.realtime import Asynchronous

    def cfg(**schedule: Any) -> Any:
        return validate(JobConfig, {"schedule": schedule}, source="job.toml")

    assert build_scheduling(cfg(policy="sync")) is None and build_scheduling(JobConfig()) is None
    fedbuff = build_scheduling(cfg(policy="fedbuff", buffer_size=5, concurrency=4))
    assert isinstance(fedbuff, Asynchronous) and (fedbuff.buffer_size, fedbuff.concurrency) == (5, 4)
    deadline = build_scheduling(cfg(policy="deadline", seconds=0.5, late="fold"))
    assert isinstance(deadline, Deadline) and deadline.seconds == 0.5 and deadline.late is Late.FOLD
    with pytest.raises(ConfigError, match="exactly one of seconds"):
        cfg(policy="deadline")
    with pytest.raises(ConfigError, match=r"buffer_size is an option of policy = 'fedbuff', not 'deadline'"):
        cfg(policy="deadline", steps=3, buffer_size=2)
    with pytest.raises(ConfigError, match=r"schedule.policy"):
        cfg(policy="async")
