"""FedBuff: staleness weighting by hand, the Buffered schedule on a simulated clock (in the one round loop,
checkpointed and resumable), and stragglers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tessera.core.errors import ConfigError
from tessera.horizontal.async_server import simulate_async
from tessera.horizontal.attacks import AttackKind, UpdateAttack
from tessera.horizontal.simulation import JobParts, simulate
from tessera.horizontal.strategies import DeadlineRounds, FedAvg, FedBuff, FedNova
from tessera.runtime.messages import FitRes
from tests.fixtures import digits_parts

from .helpers import make_data, make_task


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
