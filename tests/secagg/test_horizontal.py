"""SecAgg+ inside horizontal jobs: equal to the clear run within the quantisation bound, for FedAvg (with
mid-round dropouts), FedAdam and FLModel; the server-side Aggregation only ever receives masked vectors."""

from typing import Any

import pytest
import torch

from tessera.api import FLModel
from tessera.core.errors import ConfigError, RoundFailed
from tessera.horizontal.job import compose
from tessera.horizontal.server import Server
from tessera.horizontal.simulation import simulate
from tessera.horizontal.strategies import FedAdam, FedAvg, Krum
from tessera.runtime.messages import FitRes
from tessera.secagg import CKKS, SecAggPlus, SecAggPlusAggregation, plugin
from tessera.secagg.client import encode_input
from tessera.secagg.messages import MaskedInputRes
from tessera.secagg.plus import flatten
from tessera.secagg.prg import PRG_NAME
from tessera.secagg.quantize import ring_mask, sum_error_bound
from tests.fixtures import digits_job

from .helpers import Recorder

ROUNDS = 3


def fedavg() -> FedAvg:
    return FedAvg(fraction_evaluate=0.0, min_available=2, local_config={"local_epochs": 1})


def tolerance(agg: SecAggPlusAggregation) -> float:
    """After one round from the same params: the unmasked weighted sum is off by < m * step per coordinate and
    the weight sum by < m / levels, so the mean delta is off by < (m * step + m / levels * clip) / sum_w; plus
    float32 rounding of the new params (|x| < 4: 2.4e-7)."""
    server = agg.last
    assert server is not None and server.result is not None
    s = server.state.setup
    m = len(server.result.survivors)
    bound = sum_error_bound(clients=m, clip=s.clip, levels=s.levels) + m / s.levels * s.clip
    return bound / (server.result.weight - m / s.levels) + 2.4e-7


def run(plugins: list[Any], *, dropout: float = 0.0, strategy: Any = None, on_server: Any = None,
        rounds: int = ROUNDS) -> Any:
    parts = compose(digits_job(strategy or fedavg(), num_clients=5, dropout=dropout), plugins)
    history, params = simulate(parts, rounds=rounds, seed=0, on_server=on_server)
    return history, params, parts


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.4])
def test_fedavg_with_secagg_equals_the_clear_run(dropout: float) -> None:
    _, p0, _ = run([], dropout=dropout, rounds=1)
    _, p1, parts = run([SecAggPlus()], dropout=dropout, rounds=1)
    assert isinstance(parts.aggregation, SecAggPlusAggregation)
    assert 0 < max_diff(p0, p1) < tolerance(parts.aggregation)
    # Over several rounds the tiny differences go through training; accuracy stays the same.
    h0, _, _ = run([], dropout=dropout)
    h1, _, parts = run([SecAggPlus()], dropout=dropout)
    assert isinstance(parts.aggregation, SecAggPlusAggregation)
    acc0, acc1 = h0["central_metrics.accuracy"][-1], h1["central_metrics.accuracy"][-1]
    assert abs(acc0 - acc1) <= 0.01
    # Same survivors each round; with dropouts, the dropped clients' pairwise masks were rebuilt from shares.
    assert [r["clients_succeeded"] for r in h0.records] == [r["clients_succeeded"] for r in h1.records]
    dropped = round(dropout * 5)
    assert [r["secagg"]["masks_rebuilt_for"] for r in h1.records] == [dropped] * ROUNDS
    assert [r["secagg"]["survivors"] for r in h1.records] == [5 - dropped] * ROUNDS
    assert {r["secagg"]["prg"] for r in h1.records} == {PRG_NAME}  # which mask PRG the round ran


@pytest.mark.slow
def test_server_optimisers_get_the_mean_from_the_sum() -> None:
    _, p0, _ = run([], strategy=FedAdam(eta=0.05, fraction_evaluate=0.0, min_available=2), rounds=1)
    _, p1, parts = run([SecAggPlus()], strategy=FedAdam(eta=0.05, fraction_evaluate=0.0, min_available=2),
                       rounds=1)
    # Adam's step eta * m / (sqrt(v) + tau) moves by at most eta * (1 - b1) / tau per unit change of the mean.
    assert 0 < max_diff(p0, p1) < tolerance(parts.aggregation) * 0.05 * 0.1 / 1e-3


def test_the_server_side_aggregation_only_receives_masked_vectors() -> None:
    rec: dict[str, Recorder] = {}

    def spy(server: Server) -> None:
        rec["b"] = server.backend = Recorder(server.backend)  # type: ignore[assignment]

    # The clear run records what each client would have sent in round 1 (training is seeded, so identical).
    run([], on_server=spy)
    clear = {c: (r, ins) for c, ins, r in rec["b"].log if isinstance(r, FitRes) and ins.round == 1}
    _, _, parts = run([SecAggPlus()], on_server=spy)
    replies = [(c, ins, r) for c, ins, r in rec["b"].log]
    assert not any(isinstance(r, FitRes) for _, _, r in replies)  # no update in the clear, ever
    masked = [(c, ins, r) for c, ins, r in replies if isinstance(r, MaskedInputRes) and r.round == 1]
    assert len(masked) == 5
    setup = parts.aggregation.last.state.setup  # type: ignore[union-attr]
    setup1 = type(setup)(**{**setup.__dict__, "round": 1})
    for c, ins, r in masked:
        assert not r.masked.is_floating_point()
        fit_res, fit_ins = clear[c]
        q = encode_input(flatten(fit_res.params) - flatten(fit_ins.params), fit_res.num_examples, setup1,
                         ins.config["seed"])
        same = (r.masked.long() & ring_mask(32)) == q
        assert float(same.double().mean()) < 0.01  # the masked vector shares nothing with the clear one


@pytest.mark.parametrize("option", ["secagg+", "ckks"])
def test_flmodel_secure_aggregation_option(option: str) -> None:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 6, generator=g) for _ in range(3)]
    ys = [torch.randint(0, 3, (40,), generator=g) for _ in range(3)]

    def fit(option: Any) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        fl = FLModel(parties=["a", "b", "c"], model=model, loss_fn=torch.nn.CrossEntropyLoss(),
                     optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1), secure_aggregation=option)
        fl.fit(x=xs, y=ys, rounds=2, batch_size=16)
        return {k: v.detach().clone() for k, v in fl.model.state_dict().items()}

    plain, secure = fit(None), fit(option)
    assert 0 < max_diff(plain, secure) < 1e-5  # masked and quantised, yet the same model


def test_plugin_accepts_every_spelling_and_refuses_bad_ones() -> None:
    assert plugin("secagg+") == SecAggPlus()
    assert plugin({"threshold": 0.7, "clip": 4.0, "bits": 40}) == SecAggPlus(threshold=0.7, clip=4.0, bits=40)
    assert isinstance(plugin("ckks"), CKKS) and plugin({"kind": "ckks", "clip": 2.0}) == CKKS(clip=2.0)
    obj = SecAggPlus(degree=4)
    assert plugin(obj) is obj
    with pytest.raises(ConfigError, match=r"secagg: thresold: unknown key"):
        plugin({"thresold": 0.6})
    with pytest.raises(ConfigError, match=r"threshold"):
        plugin({"threshold": 0.4})
    with pytest.raises(ConfigError, match="unknown kind"):
        plugin("paillier")
    with pytest.raises(ConfigError, match="needs single updates"):
        compose(digits_job(Krum(f=1), num_clients=4), [SecAggPlus()])


def test_job_toml_section_builds_the_plugin() -> None:
    from tessera.cli.jobs import build_plugins
    from tessera.core.config import JobConfig

    cfg = JobConfig(secagg={"threshold": 0.6, "clip": 8.0, "bits": 32})
    assert build_plugins(cfg) == [SecAggPlus(threshold=0.6, clip=8.0, bits=32)]


def test_overflow_headroom_is_refused_before_anyone_trains() -> None:
    parts = digits_job(fedavg(), num_clients=5)
    trained: list[str] = []
    parts.mods.append(lambda msg, ctx, nxt: trained.append(ctx.client) or nxt(msg, ctx))
    with pytest.raises(ConfigError, match="overflow headroom"):
        simulate(parts, rounds=1, plugins=[SecAggPlus(bits=9)])
    assert trained == []


def test_distributed_client_dp_composes_with_secagg() -> None:
    dp = pytest.importorskip("tessera.privacy.client_dp")
    # Zero noise keeps the oracle deterministic: clipping at the client, then the (masked) uniform mean.
    _, p0, _ = run([dp.ClientLevelDP(clip=0.5, noise_multiplier=0.0, mode="distributed")], rounds=1)
    plugins = [SecAggPlus(), dp.ClientLevelDP(clip=0.5, noise_multiplier=0.0, mode="distributed")]
    _, p1, composed = run(plugins, rounds=1)
    for order in (plugins, plugins[::-1]):  # outermost whatever the order: it masks the clipped (and noised) update
        parts = compose(digits_job(fedavg(), num_clients=5), order)
        assert [getattr(m, "__name__", "") for m in parts.mods] == ["secagg_mod", "distributed_noise_mod"]
    assert 0 < max_diff(p0, p1) < tolerance(composed.aggregation)


def test_min_available_is_enforced_before_unmasking() -> None:
    strategy = FedAvg(fraction_evaluate=0.0, min_available=4)
    # 3 survivors: above t, below min_available
    parts = compose(digits_job(strategy, num_clients=5, dropout=0.4), [SecAggPlus()])
    with pytest.raises(RoundFailed, match="abandoned before unmasking"):
        simulate(parts, rounds=1)
    agg = parts.aggregation
    assert isinstance(agg, SecAggPlusAggregation) and agg.last is not None
    assert agg.last.result is None and not agg.last.revealed_b


def test_only_the_params_a_task_sends_are_masked() -> None:
    """Adapter-style rounds (LoRA): a Task that sends only its head; SecAgg+ masks and sums just those tensors."""

    def head_only(parts: Any) -> Any:
        task = parts.task
        build = task.model_fn

        def frozen_base() -> Any:  # the non-travelling layers must be identical everywhere, as a LoRA base is
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(7)
                return build()

        task.model_fn = frozen_base
        task.get_params = lambda model: {k: v.detach().clone() for k, v in model.state_dict().items()
                                         if k.startswith("fc1.")}
        task.set_params = lambda model, params: model.load_state_dict(params, strict=False)
        parts.central_eval = None  # it scores whole models
        return parts

    p0 = simulate(head_only(digits_job(fedavg(), num_clients=4)), rounds=1, seed=0)[1]
    parts = compose(head_only(digits_job(fedavg(), num_clients=4)), [SecAggPlus()])
    p1 = simulate(parts, rounds=1, seed=0)[1]
    assert set(p1) == {"fc1.weight", "fc1.bias"}
    assert parts.aggregation.last.state.setup.dim == 32 * 10 + 10 + 1  # head only, plus the weight
    assert 0 < max_diff(p0, p1) < tolerance(parts.aggregation)
