"""DP-SGD across federated rounds: epsilon per party in every record, budget stop, resume, no re-wrapping."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tessera.core.types import Params
from tessera.horizontal.client import CallNext, ClientContext
from tessera.horizontal.job import compose
from tessera.horizontal.server import Server
from tessera.horizontal.simulation import simulate
from tessera.horizontal.strategies import FedAvg
from tessera.privacy import DPSGD, DPTask
from tessera.privacy.ledger import Accountant, compute_epsilon
from tessera.privacy.opacus import DPTrainer, hook_count
from tessera.runtime.messages import FitIns, FitRes

from .helpers import DELTA, make_parts, rdp


def assert_params_equal(a: Params, b: Params) -> None:
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_five_rounds_no_prefix_no_stacked_hooks_and_global_params_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: spy on what goes down (global params) and what comes up (updates), and on each trainer's start
    sent: dict[tuple[int, str], Params] = {}
    replies: list[FitRes] = []
    started: dict[tuple[int, str], Params] = {}

    def spy(msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
        reply = call_next(msg, ctx)
        if isinstance(msg, FitIns):
            sent[(msg.round, ctx.client)] = msg.params
            replies.append(reply)
        return reply

    original = DPTrainer.train

    def train(self: DPTrainer, loader: Any, **kw: Any) -> Any:
        started[(len(started), self.party)] = self.params()
        return original(self, loader, **kw)

    monkeypatch.setattr(DPTrainer, "train", train)
    user_parts = make_parts()
    user_parts.mods.insert(0, spy)
    plugin = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, reproducible=True)
    parts = compose(user_parts, [plugin])  # what simulate runs; composed here to inspect the task it built
    # Execute
    history, _ = simulate(parts, rounds=5, seed=0)
    # Assert: 5 rounds, one trainer (one wrap) per client, hooks not stacked, no wrapper keys on the wire
    assert len(history) == 5
    task = parts.task
    assert isinstance(task, DPTask)
    assert sorted(task.trainers) == ["c0", "c1", "c2"]
    for trainer in task.trainers.values():
        assert trainer.rounds == 5
        assert hook_count(trainer.module) == 4
    assert len(replies) == 15
    for r in replies:
        assert list(r.params) == ["fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias"]
    # The params each trainer started from are the global params of that round, by value
    order = sorted(sent)  # (round, client) in the order clients are served
    for (i, party), params in started.items():
        rnd, client = order[i]
        assert party == client
        assert_params_equal(params, sent[(rnd, client)])


def test_epsilon_per_party_in_each_record_equals_opacus(tmp_path: Path) -> None:
    parts = make_parts()
    simulate(parts, rounds=3, seed=0, output_dir=tmp_path, plugins=[DPSGD(noise_multiplier=1.3, reproducible=True)])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for rnd, rec in enumerate(records, start=1):
        # 32 rows, batch 8: q = 1/4, 4 steps a round; Opacus' accountant over the same history
        assert rec["epsilon"] == pytest.approx({c: rdp(1.3, 0.25, 4 * rnd) for c in ("c0", "c1", "c2")}, abs=1e-9)
        assert rec["dp_delta"] == DELTA
        assert "epsilon" not in rec.get("train_metrics", {})  # accounting is not averaged as a training metric


def test_budget_stops_before_the_round_that_would_exceed_it(tmp_path: Path) -> None:
    servers: list[Server] = []
    parts = make_parts()
    history, _ = simulate(parts, rounds=20, seed=0, output_dir=tmp_path, on_server=servers.append,
                          plugins=[DPSGD(noise_multiplier=4.0, budget=1.0, reproducible=True)])
    # Oracle: the largest k with Opacus epsilon(k rounds of 4 steps at q=1/4) <= 1.0
    k = next(i for i in range(1, 21) if rdp(4.0, 0.25, 4 * (i + 1)) > 1.0)
    assert 2 <= k < 20 and rdp(4.0, 0.25, 4 * k) <= 1.0
    assert len(history) == k
    assert servers[0].stopped is not None and "privacy budget exhausted" in servers[0].stopped
    assert all(eps <= 1.0 for rec in history for eps in rec["epsilon"].values())
    assert history.last["epsilon"] == pytest.approx(dict.fromkeys(("c0", "c1", "c2"), rdp(4.0, 0.25, 4 * k)))
    # The stop was checkpointed: resuming runs nothing more and the books stay within budget
    servers2: list[Server] = []
    again, _ = simulate(make_parts(), rounds=20, seed=0, output_dir=tmp_path, resume=True, on_server=servers2.append,
                        plugins=[DPSGD(noise_multiplier=4.0, budget=1.0, reproducible=True)])
    assert len(again) == k and servers2[0].stopped is not None


def test_resumed_run_reports_the_same_epsilon_and_params_as_an_uninterrupted_one(tmp_path: Path) -> None:
    def plugin() -> DPSGD:
        return DPSGD(noise_multiplier=1.1, max_grad_norm=0.8, reproducible=True)

    full, full_params = simulate(make_parts(), rounds=4, seed=3, output_dir=tmp_path / "a", plugins=[plugin()])
    simulate(make_parts(), rounds=2, seed=3, output_dir=tmp_path / "b", plugins=[plugin()])
    resumed, resumed_params = simulate(make_parts(), rounds=4, seed=3, output_dir=tmp_path / "b", resume=True,
                                       plugins=[plugin()])
    assert [r["epsilon"] for r in resumed] == [r["epsilon"] for r in full]
    assert resumed.last["epsilon"]["c0"] > resumed.records[1]["epsilon"]["c0"]  # continued, not restarted
    assert_params_equal(resumed_params, full_params)  # reproducible=True: bit-identical resume


def test_noise_zero_huge_clip_full_batch_equals_plain_fedavg() -> None:
    # q = 1 (batch = whole client dataset): every Poisson batch is the full dataset, so DP-SGD without noise and
    # with an inactive clip is exactly full-batch gradient descent, the vanilla oracle
    _, plain_params = simulate(make_parts(batch_size=32), rounds=3, seed=0)
    dp, dp_params = simulate(make_parts(batch_size=32), rounds=3, seed=0,
                             plugins=[DPSGD(noise_multiplier=0.0, max_grad_norm=1e6)])
    for k, v in plain_params.items():
        torch.testing.assert_close(dp_params[k], v, rtol=0, atol=1e-6)
    assert dp.last["epsilon"] == dict.fromkeys(("c0", "c1", "c2"), float("inf"))


def test_flmodel_fit_twice_continues_epsilon() -> None:
    from torch import nn

    from tessera import FLModel
    from tessera.core.models import MLP

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(32, 5, generator=g) for _ in range(2)]
    ys = [torch.randint(0, 3, (32,), generator=g) for _ in range(2)]
    fl = FLModel(parties=["alice", "bob"], model=MLP(5, 3, [8]), loss_fn=nn.CrossEntropyLoss(),
                 optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1), strategy=FedAvg(),
                 dp=DPSGD(noise_multiplier=1.2, reproducible=True))
    first = fl.fit(x=xs, y=ys, rounds=2, batch_size=8)
    second = fl.fit(x=xs, y=ys, rounds=2, batch_size=8)
    assert first.last["epsilon"]["alice"] == pytest.approx(rdp(1.2, 0.25, 8), abs=1e-9)
    assert second.last["epsilon"]["alice"] == pytest.approx(rdp(1.2, 0.25, 16), abs=1e-9)  # continues
    assert compute_epsilon(Accountant.RDP, [(1.2, 0.25, 16)], DELTA) == second.last["epsilon"]["bob"]


def test_strategies_with_client_side_terms_are_refused() -> None:
    from tessera.core.errors import ConfigError
    from tessera.horizontal.strategies import FedProx, Scaffold

    for strategy in (FedProx(proximal_mu=0.1), Scaffold(local_lr=0.1)):
        with pytest.raises(ConfigError, match="DPSGD cannot run"):
            compose(make_parts(strategy=strategy), [DPSGD(noise_multiplier=1.0)])


def test_flmodel_fit_stopped_by_budget_counts_only_the_rounds_that_ran() -> None:
    from torch import nn

    from tessera import FLModel
    from tessera.core.models import MLP

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(32, 5, generator=g) for _ in range(2)]
    ys = [torch.randint(0, 3, (32,), generator=g) for _ in range(2)]
    # Oracle: the first round count whose epsilon exceeds the budget, from the accountant itself (4 steps/round).
    budget = compute_epsilon(Accountant.RDP, [(1.2, 0.25, 12)], DELTA) + 1e-6
    fl = FLModel(parties=["alice", "bob"], model=MLP(5, 3, [8]), loss_fn=nn.CrossEntropyLoss(),
                 optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1), strategy=FedAvg(),
                 dp=DPSGD(noise_multiplier=1.2, reproducible=True, budget=budget))
    history = fl.fit(x=xs, y=ys, rounds=6, batch_size=8)
    assert fl.rounds_done == 3 and len(history.records) == 3
    assert fl.stopped is not None and "budget" in fl.stopped
    assert history.last["epsilon"]["alice"] == pytest.approx(rdp(1.2, 0.25, 12), abs=1e-9)
    assert history.last["epsilon"]["alice"] <= budget
