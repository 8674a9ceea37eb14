"""FedBuff: staleness weighting by hand, the Buffered schedule on a simulated clock (in the one round loop,
checkpointed and resumable), and stragglers."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tessera.core.errors import ConfigError
from tessera.horizontal.async_server import simulate_async
from tessera.horizontal.attacks import AttackKind, UpdateAttack
from tessera.horizontal.client import ClientContext, client_seed, seeded
from tessera.horizontal.job import ClientStates, Extension, compose
from tessera.horizontal.pacing import Pacing
from tessera.horizontal.realtime import Asynchronous
from tessera.horizontal.server import Server, ServerConfig
from tessera.horizontal.simulation import JobParts, initial_params, simulate
from tessera.horizontal.strategies import DeadlineRounds, FedAvg, FedBuff, FedNova
from tessera.runtime.backend import InProcessBackend
from tessera.runtime.messages import FitRes
from tests.fixtures import digits_parts

from .helpers import make_data, make_task, params_equal


def res(value: float, staleness: float) -> tuple[str, FitRes]:
    return ("c", FitRes(params={"w": torch.tensor([value])}, num_examples=9, metrics={"staleness": staleness}))


def test_staleness_weighted_buffer_by_hand() -> None:
    s = FedBuff(buffer_size=2)
    assert s.staleness_weight(0) == 1.0 and s.staleness_weight(3) == 0.5  # 1 / sqrt(1 + s)
    # deltas 2 (fresh) and 4 (3 steps stale): (2 * 1 + 4 * 0.5) / K=2 = 2
    assert s.aggregate_fit(1, [res(2.0, 0), res(4.0, 3)], {"w": torch.tensor([0.0])})["w"].item() == 2.0
    assert FedBuff(server_lr=0.5).aggregate_fit(1, [res(2.0, 0), res(4.0, 3)], {"w": torch.tensor([0.0])})[
        "w"].item() == 1.0
    with pytest.raises(ConfigError, match="buffer_size"):
        FedBuff(buffer_size=0)


def test_driver_processes_arrivals_in_simulated_time_order() -> None:
    # c0: 24 rows / batch 8 = 3 steps at 1 step/s -> arrives every 3 s; c1: 4 steps at 0.25 step/s -> 16 s.
    # With K = 1 every arrival is a server step; c1 started from version 0 and lands after 5 steps of c0.
    data = make_data(num_clients=2)
    parts = JobParts(task=make_task(data), strategy=FedBuff(buffer_size=1), clients=list(data))
    hist, run = simulate_async(parts, speeds={"c0": 1.0, "c1": 0.25}, updates=6)
    assert hist["sim_time"] == [3.0, 6.0, 9.0, 12.0, 15.0, 16.0]
    assert hist["staleness_max"] == [0.0, 0.0, 0.0, 0.0, 0.0, 5.0]
    assert run.updates == 6 and run.version == 6 and run.clock == 16.0 and run.failures == 0


def test_first_buffer_of_fresh_updates_equals_a_synchronous_round() -> None:
    # K = number of clients, equal speeds: the first server step aggregates every client's update from x0,
    # all with staleness 0 -- the same as one synchronous FedBuff round (no shuffling, so seeds do not matter).
    data = make_data(num_clients=3)
    a = JobParts(task=make_task(data, shuffle=False), strategy=FedBuff(buffer_size=3), clients=list(data))
    _, run = simulate_async(a, speeds={c: 1.0 for c in data}, updates=3, seed=4)
    b = JobParts(task=make_task(data, shuffle=False), strategy=FedBuff(fraction_evaluate=0.0), clients=list(data))
    _, sync = simulate(b, rounds=1, seed=4)
    for k in sync:
        assert torch.allclose(run.params[k], sync[k], atol=1e-6)


def test_async_driver_never_buffers_a_nan_update() -> None:
    data = make_data(num_clients=3)
    parts = JobParts(task=make_task(data), strategy=FedBuff(buffer_size=2), clients=list(data),
                     mods=[UpdateAttack(AttackKind.NAN, clients=frozenset({"c1"}))])
    hist, run = simulate_async(parts, speeds={c: 1.0 for c in data}, updates=6)
    assert all(bool(torch.isfinite(t).all()) for t in run.params.values())
    assert run.updates == 6 and run.failures > 0 and sum(hist["clients_failed"]) == run.failures


def test_async_driver_refuses_missing_speeds() -> None:
    data = make_data(num_clients=2)
    parts = JobParts(task=make_task(data), strategy=FedBuff(), clients=list(data))
    with pytest.raises(ConfigError, match="speed"):
        simulate_async(parts, speeds={"c0": 1.0}, updates=2)


BASE_KEYS = {"round", "clients_sampled", "clients_succeeded", "clients_failed", "failures", "bytes_up",
             "bytes_down", "seconds", "central_loss", "central_metrics"}


def test_buffered_run_resumed_mid_way_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    # c2 is 4x slower; at the step-3 checkpoint updates are in flight (deltas from older versions), and resume
    # must continue from it, with the clock, version and idle clients as they were: final params bit-identical.
    data = make_data(num_clients=3)
    speeds = {"c0": 1.0, "c1": 0.5, "c2": 0.25}

    def parts() -> JobParts:
        return JobParts(task=make_task(data), strategy=FedBuff(buffer_size=2, fraction_evaluate=0.0),
                        clients=list(data), central_eval=lambda p: (float(p["fc1.bias"].sum()), {}))

    _, full = simulate_async(parts(), speeds=speeds, updates=12, seed=3, output_dir=tmp_path / "full")
    simulate_async(parts(), speeds=speeds, updates=6, seed=3, output_dir=tmp_path / "cut")
    hist, resumed = simulate_async(parts(), speeds=speeds, updates=12, seed=3, output_dir=tmp_path / "cut",
                                   resume=True)
    assert resumed.version == full.version == 6 and resumed.clock == full.clock
    assert max(hist["staleness_max"]) >= 1  # the slow client's update did cross the checkpoint
    for k in full.params:
        assert torch.equal(resumed.params[k], full.params[k]), k
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    full_lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["sim_time"] for r in lines] == [r["sim_time"] for r in full_lines]
    for r in lines:
        assert BASE_KEYS | {"sim_time", "updates", "staleness_mean", "staleness_max"} <= set(r), set(r)
        assert r["clients_succeeded"] == 2


@pytest.mark.slow
def test_one_client_10x_slower_deadline_and_fedbuff_beat_synchronous_fedavg_in_wall_time() -> None:
    # digits, 10 IID clients of ~144 rows, batch 16, 2 local epochs = 18 steps per round; 9 clients run 1 step/s,
    # c9 0.1 step/s. Synchronous FedAvg waits 180 s per round for c9. Deadline rounds (18 s, FedNova) give c9 1
    # step; FedBuff (K=10) never waits for it. All three aggregate 150 client updates.
    # Accuracy tolerance 0.05: measured final accuracies (seeds 0 / 1) sync 0.922 / 0.936, deadline 0.916 / 0.933,
    # FedBuff 0.914 / 0.928; deadline rounds fluctuate by up to 0.05 round to round near the end (c9's 1-step
    # update is rescaled 16x by FedNova), so 0.05 is the noise floor of a single final-round comparison.
    kw = {"fraction_evaluate": 0.0, "local_config": {"local_epochs": 2}}
    data = {"lr": 0.1, "batch_size": 16, "seed": 0}
    clients = digits_parts(FedAvg(), **data).clients
    speeds = {c: 1.0 for c in clients} | {clients[-1]: 0.1}
    rounds = 15

    sync = DeadlineRounds(FedAvg(**kw), speeds=speeds)
    h_sync, _ = simulate(digits_parts(sync, **data), rounds=rounds, seed=0)
    deadline = DeadlineRounds(FedNova(**kw), speeds=speeds, deadline=18.0)
    h_dl, _ = simulate(digits_parts(deadline, **data), rounds=rounds, seed=0)
    h_fb, run = simulate_async(digits_parts(FedBuff(buffer_size=10, **kw), **data), speeds=speeds,
                               updates=10 * rounds, seed=0)

    assert sync.updates == deadline.updates == run.updates == 10 * rounds
    assert sync.clock == pytest.approx(rounds * 180.0)  # oracle: 18 steps / 0.1 step/s per round
    assert deadline.clock == pytest.approx(rounds * 18.0)
    assert run.clock < sync.clock / 5 and deadline.clock < sync.clock / 5
    acc = {name: h["central_metrics.accuracy"][-1] for name, h in (("sync", h_sync), ("deadline", h_dl),
                                                                    ("fedbuff", h_fb))}
    assert acc["sync"] > 0.9
    assert abs(acc["deadline"] - acc["sync"]) <= 0.05 and abs(acc["fedbuff"] - acc["sync"]) <= 0.05, acc
    assert np.max(h_fb["staleness_max"]) >= 5  # the slow client's updates did arrive, late and down-weighted


# ------------------------------------------------------------------------- real clock: Asynchronous (threads)
def _async_server(parts: JobParts, *, rounds: int, out: Path | None = None, k: int = 1,
                  central: list[dict[str, torch.Tensor]] | None = None) -> Server:
    app = parts.client_app()
    seen = central if central is not None else []

    def keep(p: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
        seen.append({n: t.clone() for n, t in p.items()})
        return 0.0, {}

    return Server(strategy=parts.strategy, backend=InProcessBackend(app), clients=parts.clients,
                  initial_params=initial_params(parts.task, 5), central_eval=keep,
                  config=ServerConfig(rounds=rounds, seed=5, output_dir=out), extensions=[ClientStates(app)],
                  scheduling=Asynchronous(buffer_size=k))


def test_real_clock_fedbuff_with_one_client_and_k1_is_sequential_sgd() -> None:
    data = make_data(num_clients=1)
    parts = JobParts(task=make_task(data), strategy=FedBuff(buffer_size=1, fraction_evaluate=0.0), clients=["c0"])
    server = _async_server(parts, rounds=4)
    hist = server.run()
    assert hist["updates"] == [1, 2, 3, 4] and hist["staleness_max"] == [0.0] * 4
    # Oracle: plain local SGD, 4 calls of task.train on one model, each seeded as the n-th dispatch.
    task = make_task(data)
    model = task.model_fn()
    model.load_state_dict(initial_params(task, 5))
    train, _ = task.data_fn("c0", 1)
    for n in range(1, 5):
        with seeded(client_seed(5, n, "c0")):
            task.train(model, train, {})
    assert params_equal(server.params, dict(model.state_dict()))


def _echo_version(msg: Any, ctx: ClientContext, call_next: Any) -> Any:
    reply = call_next(msg, ctx)
    return FitRes(params=reply.params, num_examples=reply.num_examples,
                  metrics={**reply.metrics, "sent_version": float(msg.round)})


class _Checking(FedBuff):
    """FedBuff that checks each update's staleness against the version its client was sent (echoed by a mod)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(fraction_evaluate=0.0, **kw)
        self.stale: list[float] = []

    def aggregate_fit(self, rnd: int, results: Any, current: Any) -> Any:
        for _, r in results:
            assert r.metrics["staleness"] == (rnd - 1) - r.metrics["sent_version"]
            self.stale.append(r.metrics["staleness"])
        return super().aggregate_fit(rnd, results, current)


def test_real_clock_staleness_counts_server_steps_since_the_model_was_sent() -> None:
    data = make_data(num_clients=3)
    strategy = _Checking(buffer_size=1)
    parts = JobParts(task=make_task(data), strategy=strategy, clients=list(data), mods=[_echo_version])
    composed = compose(parts, [Pacing({"c0": 0.0, "c1": 0.0, "c2": 0.05})])
    hist = _async_server(composed, rounds=9).run()
    assert hist["updates"] == list(range(1, 10)) and len(strategy.stale) == 9
    assert max(strategy.stale) >= 1  # the slow client's update arrived after others had been applied


def test_real_clock_fedbuff_killed_mid_run_resumes_without_losing_an_applied_update(tmp_path: Path) -> None:
    data = make_data(num_clients=3)

    def parts() -> JobParts:
        return JobParts(task=make_task(data), strategy=FedBuff(buffer_size=2, fraction_evaluate=0.0),
                        clients=list(data))

    class Kill(Extension):
        name = "kill"

        def on_round_end(self, rnd: int, record: dict[str, Any]) -> None:
            if rnd == 3:  # dies inside step 3: its updates were never checkpointed, steps 1-2 were
                raise KeyboardInterrupt

    applied: list[dict[str, torch.Tensor]] = []
    killed = _async_server(parts(), rounds=6, out=tmp_path, k=2, central=applied)
    killed.extensions.append(Kill())
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    resumed = _async_server(parts(), rounds=6, out=tmp_path, k=2)
    assert resumed.resume() and resumed.round == 2
    assert isinstance(resumed.scheduling, Asynchronous) and resumed.scheduling.updates == 4
    assert params_equal(resumed.params, applied[1])  # every update applied in steps 1-2 is there, once
    hist = resumed.run()
    assert hist["updates"] == [2, 4, 6, 8, 10, 12] and hist["round"] == [1, 2, 3, 4, 5, 6]
