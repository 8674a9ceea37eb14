"""The typed horizontal contracts: wrappers delegate (never copy), plugins compose independent of order, and a
Task's data is asked for every round."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tessera.api import FLModel
from tessera.core.errors import ConfigError
from tessera.horizontal.client import CallNext, ClientContext
from tessera.horizontal.job import JobParts, compose
from tessera.horizontal.simulation import simulate
from tessera.horizontal.strategies import ClipUpdates, DeadlineRounds, FedAvg, FedAvgM, StrategyWrapper
from tessera.horizontal.strategies.base import SAMPLING, MeanStrategy, Strategy, innermost
from tessera.horizontal.task import SupervisedTask
from tessera.privacy import DPSGD
from tessera.privacy.client_dp import ClientDPStrategy
from tessera.privacy.ledger import PrivacyLedger
from tessera.runtime.messages import EvaluateIns, FitIns, FitRes
from tessera.secagg import CKKS, SecAggPlus
from tests.horizontal.helpers import make_parts

WRAPPERS = {
    "clip": lambda inner: ClipUpdates(inner, max_norm=1.0),
    "deadline": lambda inner: DeadlineRounds(inner, speeds={"c0": 1.0}),
    "client_dp": lambda inner: ClientDPStrategy(inner, clip=1.0, noise_multiplier=1.0, mode="central",
                                                ledger=PrivacyLedger()),
}
VALUES: dict[str, Any] = {"fraction_fit": 0.5, "min_fit_clients": 2, "min_available": 2, "fraction_evaluate": 0.0,
                          "min_evaluate_clients": 3, "local_config": {"local_epochs": 4}}


@pytest.mark.parametrize("wrap", sorted(WRAPPERS))
@pytest.mark.parametrize("attr", SAMPLING)
def test_a_setting_written_on_a_wrapper_reaches_the_inner_strategy_and_back(wrap: str, attr: str) -> None:
    inner = FedAvg()
    outer = WRAPPERS["clip"](WRAPPERS[wrap](inner))  # two levels deep
    setattr(outer, attr, VALUES[attr])
    assert getattr(inner, attr) == VALUES[attr] and getattr(outer, attr) == VALUES[attr]
    setattr(inner, attr, "changed")
    assert getattr(outer, attr) == "changed"  # no stale copy on any wrapper
    assert innermost(outer) is inner
    assert isinstance(outer, StrategyWrapper)


def test_an_attribute_of_the_inner_strategy_is_read_through_every_wrapper() -> None:
    inner = FedAvgM(server_momentum=0.7)
    outer = ClipUpdates(DeadlineRounds(inner, speeds={"c0": 1.0}), max_norm=2.0)
    assert outer.server_momentum == 0.7 and outer.name == "clip(deadline(fedavgm))"
    inner.server_momentum = 0.1
    assert outer.server_momentum == 0.1


def _xy(seed: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, generator=g), torch.randint(0, 3, (rows,), generator=g)


def test_flmodel_with_a_wrapped_strategy_sends_no_evaluation_without_validation_data() -> None:
    """The regression: FLModel set fraction_evaluate=0 on a wrapper that had copied 1.0 from its inner strategy;
    every round then sent EvaluateIns to clients with no test data, and each failed it."""
    import numpy as np

    for strategy in (ClipUpdates(FedAvg(), max_norm=1.0), DeadlineRounds(FedAvg(), speeds={"a": 1.0, "b": 1.0})):
        fl = FLModel(parties=["a", "b"], model=nn.Linear(4, 3), loss_fn=nn.CrossEntropyLoss(),
                     optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1), strategy=strategy)
        (xa, ya), (xb, yb) = _xy(0, 20), _xy(1, 30)
        history = fl.fit(x=[xa, xb], y=[ya, yb], rounds=2, batch_size=8)
        for record in history.records:
            assert record["clients_failed"] == 0 and record["failures"] == []
            assert "eval_loss" not in record
        assert strategy.inner.fraction_evaluate == 0.0
        plan = strategy.configure_evaluate(3, {}, ["a", "b"], np.random.default_rng())
        assert plan == [] and not any(isinstance(ins, EvaluateIns) for _, ins in plan)


def test_plugins_compose_the_same_whatever_their_order() -> None:
    parts = make_parts()
    a = compose(parts, [SecAggPlus(), DPSGD(noise_multiplier=1.0)])
    b = compose(parts, [DPSGD(noise_multiplier=1.0), SecAggPlus()])
    for p in (a, b):
        assert [getattr(m, "__name__", type(m).__name__) for m in p.mods] == ["secagg_mod", "DPSGDMod"]
        assert type(p.aggregation).__name__ == "DPRecorder"  # DP wraps whichever aggregation runs the round
        assert type(p.aggregation._inner).__name__ == "SecAggPlusAggregation"
        assert type(p.task).__name__ == "DPTask"
        assert sorted(e.name for e in p.extensions) == ["dp", "secagg"]
    assert parts.mods == [] and type(parts.aggregation).__name__ == "PlainAggregation"  # the user's parts stay


@pytest.mark.slow
def test_every_order_of_secagg_and_dp_trains_the_same_model() -> None:
    results = []
    for order in ([0, 1], [1, 0]):
        plugins = [SecAggPlus(), DPSGD(noise_multiplier=0.5, max_grad_norm=1.0, reproducible=True)]
        _, params = simulate(make_parts(), rounds=2, seed=0, plugins=[plugins[i] for i in order])
        results.append(params)
    # Masks cancel exactly; the only randomness left is the seeded DP noise and stochastic rounding (seeded per
    # client by the protocol), so both orders agree to quantisation error.
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], atol=1e-5)


def test_conflicting_plugins_are_refused_naming_both() -> None:
    for plugins in ([SecAggPlus(), CKKS()], [CKKS(), SecAggPlus()]):
        with pytest.raises(ConfigError, match=r"ckks and secagg\+ both take the job's secure_aggregation role"):
            compose(make_parts(), plugins)


def test_a_mean_only_plugin_refuses_a_strategy_that_needs_single_updates() -> None:
    from tessera.horizontal.strategies import FedMedian

    assert not isinstance(FedMedian(), MeanStrategy)
    with pytest.raises(ConfigError, match=r"secagg\+ reveals only the sum.*fedmedian needs single updates"):
        compose(make_parts(strategy=FedMedian()), [SecAggPlus()])


# ----------------------------------------------------------------------------------------------- per-round data
ROWS = {"c0": [5, 9, 13], "c1": [11, 4, 7]}  # a different subset, of a different size, every round


def _round_data(cid: str, rnd: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _xy(100 * int(cid[1:]) + rnd, ROWS[cid][rnd - 1])


def _round_task() -> SupervisedTask:
    def data_fn(cid: str, rnd: int) -> tuple[DataLoader[Any], None]:
        return DataLoader(TensorDataset(*_round_data(cid, rnd)), batch_size=4, shuffle=False), None

    return SupervisedTask(model_fn=lambda: nn.Linear(4, 3), loss_fn=nn.CrossEntropyLoss(),
                          optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1), data_fn=data_fn)


def _oracle(initial: dict[str, torch.Tensor], rounds: int) -> dict[str, torch.Tensor]:
    """Plain PyTorch: each round, every client trains a copy of the global model on that round's rows; the server
    takes the example-weighted mean (float64)."""
    current = {k: v.clone() for k, v in initial.items()}
    for rnd in range(1, rounds + 1):
        acc, total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in current.items()}, 0
        for cid in ROWS:
            model = nn.Linear(4, 3)
            model.load_state_dict(current)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            x, y = _round_data(cid, rnd)
            for i in range(0, len(x), 4):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[i : i + 4]), y[i : i + 4]).backward()
                opt.step()
            for k, v in model.state_dict().items():
                acc[k] += v.double() * len(x)
            total += len(x)
        current = {k: (acc[k] / total).to(current[k].dtype) for k in current}
    return current


@pytest.mark.parametrize("backend", ["inprocess", pytest.param("ray", marks=pytest.mark.slow)])
def test_a_task_trains_on_the_data_of_each_round(backend: str) -> None:
    seen: list[tuple[int, str, int]] = []

    def count(msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
        reply = call_next(msg, ctx)
        if isinstance(msg, FitIns) and isinstance(reply, FitRes):
            seen.append((msg.round, ctx.client, reply.num_examples))
        return reply

    parts = JobParts(task=_round_task(), strategy=FedAvg(fraction_evaluate=0.0), clients=sorted(ROWS))
    if backend == "inprocess":
        parts.mods.append(count)
    start = {k: v.clone() for k, v in nn.Linear(4, 3).state_dict().items()}
    history, params = simulate(parts, rounds=3, seed=0, params=start, backend=backend)
    if backend == "inprocess":  # the mod runs in this process: it saw each round's example counts
        assert sorted(seen) == sorted((r, c, ROWS[c][r - 1]) for c in ROWS for r in (1, 2, 3))
    oracle = _oracle(start, 3)
    for k in params:
        assert torch.allclose(params[k], oracle[k], atol=1e-6), k
    assert len(history) == 3


def test_a_one_argument_data_fn_is_round_independent_and_cached() -> None:
    calls: list[str] = []

    def data_fn(cid: str) -> tuple[DataLoader[Any], None]:
        calls.append(cid)
        return DataLoader(TensorDataset(*_xy(0, 8)), batch_size=4), None

    task = SupervisedTask(model_fn=lambda: nn.Linear(4, 3), loss_fn=nn.CrossEntropyLoss(),
                          optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1), data_fn=data_fn)
    first = task.data_fn("c0", 1)
    assert task.data_fn("c0", 2) is first and calls == ["c0"]


def test_strategy_contract_declares_what_the_loop_calls() -> None:
    for name in ("configure_fit", "aggregate_fit", "configure_evaluate", "aggregate_evaluate", "client_mods",
                 "state_dict", "load_state_dict"):
        assert callable(getattr(Strategy, name))
    assert "apply" in MeanStrategy.__abstractmethods__


def test_a_client_dry_runs_one_batch_before_its_first_round() -> None:
    """A job whose model does not fit the data (5 input columns, 4 in the data) fails the client with the dry
    run's message naming the client and both shapes, not a bare RuntimeError from inside training; the run's
    round fails before anything trains."""
    from tessera.core.errors import ShapeMismatch
    from tessera.horizontal.client import TaskClient

    task = _round_task()
    task._model_fn = lambda: nn.Linear(5, 3)
    client = TaskClient(task)
    ins = FitIns(round=1, params=dict(nn.Linear(5, 3).state_dict()))
    with pytest.raises(ShapeMismatch, match=r"c0.*\b4\b.*\b5\b|c0.*\b5\b.*\b4\b"):
        client.fit(ins, ClientContext("c0"))
    parts = JobParts(task=task, strategy=FedAvg(fraction_evaluate=0.0, min_available=1), clients=sorted(ROWS))
    from tessera.core.errors import RoundFailed

    # Every client failed its dry run: the round names the mistake, not "lower min_available"
    with pytest.raises(RoundFailed, match=r"2 client\(s\) could not run the job; client c0: ShapeMismatch") as err:
        simulate(parts, rounds=1)
    assert "min_available" not in str(err.value)


@pytest.mark.slow
def test_a_task_trains_on_the_data_of_each_round_over_grpc(certs: Any) -> None:
    """Per-round data through real gRPC parties (mutual TLS on loopback, parties on threads): the clients ask
    their task for each round's data, and the result equals the plain-PyTorch oracle."""
    import threading

    from tessera.horizontal.server import Server, ServerConfig
    from tessera.runtime.grpc import ClientParty, GrpcBackend
    from tessera.runtime.grpc.config import build

    routes = {"c0": "alice", "c1": "bob"}

    def fed(port: int) -> Any:
        parties = [{"name": "server", "role": "coordinator", "address": f"127.0.0.1:{port}"},
                   *({"name": n} for n in routes.values())]
        settings = {"ca_cert": "ca.crt", "certs_dir": ".", "quorum_deadline_s": 30, "rpc_deadline_s": 30,
                    "retry": {"initial_backoff_s": 0.05, "max_attempts": 100}}
        return build({"federation": settings, "parties": parties}, source="test", base=certs)

    parts = JobParts(task=_round_task(), strategy=FedAvg(fraction_evaluate=0.0), clients=sorted(ROWS))
    backend = GrpcBackend(fed(0), dict(routes), min_clients=2)
    port = backend.listen()
    parties = [ClientParty(fed(port), n, parts.client_app()) for n in routes.values()]
    threads = [threading.Thread(target=p.run, daemon=True) for p in parties]
    for t in threads:
        t.start()
    start = {k: v.clone() for k, v in nn.Linear(4, 3).state_dict().items()}
    server = Server(strategy=parts.strategy, backend=backend, clients=parts.clients, initial_params=start,
                    config=ServerConfig(rounds=3, seed=0))
    history = server.run()
    for t in threads:
        t.join(15)
    assert [r["clients_succeeded"] for r in history.records] == [2, 2, 2]
    oracle = _oracle(start, 3)
    for k in server.params:
        assert torch.allclose(server.params[k], oracle[k], atol=1e-6), k
