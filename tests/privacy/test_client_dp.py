"""Client-level DP of updates: vanilla FedAvg without noise, noise std z*C/n, clipping bound, accounting, budget."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tessera.core.errors import ConfigError
from tessera.core.types import Params
from tessera.horizontal.client import ClientContext
from tessera.horizontal.job import compose
from tessera.horizontal.server import Server
from tessera.horizontal.simulation import simulate
from tessera.horizontal.strategies import FedAvg, FedMedian
from tessera.privacy import CLIENT_PARTY, ClientLevelDP, PrivacyLedger
from tessera.privacy.client_dp import ClientDPStrategy, distributed_noise_mod
from tessera.runtime.messages import FitRes

from .helpers import DELTA, make_parts, rdp


def strategy(*, clip: float, z: float, mode: str = "central", seed: int | None = 0) -> ClientDPStrategy:
    return ClientDPStrategy(FedAvg(), clip=clip, noise_multiplier=z, mode=mode, ledger=PrivacyLedger(delta=DELTA),
                            seed=seed)


def big(value: float = 0.0, n: int = 20_000) -> Params:
    return {"w": torch.full((n,), value), "b": torch.full((10,), value)}


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_noise_zero_large_clip_equals_plain_fedavg_exactly(mode: str) -> None:
    _, plain = simulate(make_parts(), rounds=3, seed=0)
    dp_hist, dp = simulate(make_parts(), rounds=3, seed=0,
                           plugins=[ClientLevelDP(clip=1e6, noise_multiplier=0.0, mode=mode)])  # type: ignore[arg-type]
    assert list(dp) == list(plain) and all(torch.equal(dp[k], plain[k]) for k in plain)
    assert dp_hist.last["epsilon"] == {CLIENT_PARTY: math.inf}


def test_central_noise_std_of_the_aggregate_is_z_c_over_n() -> None:
    z, clip, n = 1.3, 0.7, 4
    s = strategy(clip=clip, z=z, seed=11)
    current = big()
    results = [(f"c{i}", FitRes(params=big(), num_examples=10 * (i + 1))) for i in range(n)]  # zero updates
    noise = torch.cat([v.reshape(-1) for v in s.noisy_mean(1, results, current).values()]).double()
    assert abs(float(noise.std()) / (z * clip / n) - 1) < 0.10
    assert abs(float(noise.mean())) < 4 * z * clip / n / math.sqrt(noise.numel())


def test_distributed_noise_shares_sum_to_the_central_noise() -> None:
    z, clip, n = 1.3, 0.7, 5
    s = strategy(clip=clip, z=z, mode="distributed")
    current = big()
    plan = s.configure_fit(1, current, [f"c{i}" for i in range(n)], np.random.default_rng(0))
    replies = []
    for cid, ins in plan:  # each client: a zero update, clipped, plus its noise share
        reply = distributed_noise_mod(ins, ClientContext(cid), lambda msg, ctx: FitRes(params=big(), num_examples=99))
        assert reply.num_examples == 1
        replies.append((cid, reply))
    noise = torch.cat([v.reshape(-1) for v in s.noisy_mean(1, replies, current).values()]).double()
    assert abs(float(noise.std()) / (z * clip / n) - 1) < 0.10
    one = torch.cat([v.reshape(-1) for v in replies[0][1].params.values()]).double()  # one share alone
    assert abs(float(one.std()) / (z * clip / math.sqrt(n)) - 1) < 0.10


def test_each_update_is_clipped_to_c_before_averaging() -> None:
    clip = 0.5
    s = strategy(clip=clip, z=0.0)
    g = torch.Generator().manual_seed(0)
    current = {"w": torch.randn(50, generator=g)}
    deltas = [torch.randn(50, generator=g) * scale for scale in (0.01, 1.0, 10.0)]  # one inside, two outside C
    results = [(f"c{i}", FitRes(params={"w": current["w"] + d}, num_examples=1)) for i, d in enumerate(deltas)]
    new = s.aggregate_fit(1, results, current)
    # Oracle: by hand, each delta scaled by min(1, C/||delta||), uniform mean
    expected = sum(d.double() * min(1.0, clip / float(d.double().norm())) for d in deltas) / 3
    torch.testing.assert_close(new["w"].double() - current["w"].double(), expected, rtol=0, atol=1e-6)
    assert float((new["w"].double() - current["w"].double()).norm()) <= clip + 1e-6


def test_accounting_by_client_sampling_rate_and_budget_stop(tmp_path: Path) -> None:
    servers: list[Server] = []
    parts = make_parts(clients=4, strategy=FedAvg(fraction_fit=0.5))
    history, _ = simulate(parts, rounds=50, seed=0, output_dir=tmp_path, on_server=servers.append,
                          plugins=[ClientLevelDP(clip=0.5, noise_multiplier=2.0, budget=2.0)])
    # Oracle: one subsampled Gaussian step per round at q = 2/4, composed by Opacus' RDP accountant
    k = next(i for i in range(1, 51) if rdp(2.0, 0.5, i + 1) > 2.0)
    assert len(history) == k
    for rnd, rec in enumerate(history, start=1):
        assert rec["epsilon"][CLIENT_PARTY] == pytest.approx(rdp(2.0, 0.5, rnd), abs=1e-9)
        assert rec["clients_sampled"] == 2
    assert servers[0].stopped is not None and "budget" in servers[0].stopped
    # resume: the ledger came back from the checkpoint, so the run is still over
    again, _ = simulate(make_parts(clients=4, strategy=FedAvg(fraction_fit=0.5)), rounds=50, seed=0,
                        output_dir=tmp_path, resume=True,
                        plugins=[ClientLevelDP(clip=0.5, noise_multiplier=2.0, budget=2.0)])
    assert len(again) == k


def test_bad_combinations_are_refused() -> None:
    from tessera.privacy import DPSGD
    from tessera.secagg import SecAggPlus

    parts = make_parts()
    central = ClientLevelDP(clip=1.0, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match=r"client_dp and client_dp both take the job's privacy role"):
        compose(parts, [central, ClientLevelDP(clip=1.0, noise_multiplier=1.0)])
    # Both orders are refused with both names (validation does not depend on list order)
    for plugins in ([central, DPSGD(noise_multiplier=1.0)], [DPSGD(noise_multiplier=1.0), central]):
        with pytest.raises(ConfigError, match=r"client_dp and dpsgd both take the job's privacy role"):
            compose(parts, plugins)
    for plugins in ([central, SecAggPlus()], [SecAggPlus(), central]):
        with pytest.raises(ConfigError, match=r"client_dp reads each client's update.*secagg\+ hides"):
            compose(parts, plugins)
    assert parts.aggregation.__class__.__name__ == "PlainAggregation"  # compose never edits the user's parts
    with pytest.raises(ConfigError, match="no privacy"):
        ClientLevelDP(clip=1.0, noise_multiplier=0.0, budget=3.0)
    with pytest.raises(ConfigError, match="mean-based"):
        ClientDPStrategy(FedMedian(), clip=1.0, noise_multiplier=1.0, mode="central", ledger=PrivacyLedger())


def test_client_level_epsilon_continues_across_resume(tmp_path: Path) -> None:
    def plugin() -> ClientLevelDP:
        return ClientLevelDP(clip=0.5, noise_multiplier=1.5, seed=4)

    full, full_params = simulate(make_parts(), rounds=4, seed=1, output_dir=tmp_path / "a", plugins=[plugin()])
    simulate(make_parts(), rounds=2, seed=1, output_dir=tmp_path / "b", plugins=[plugin()])
    resumed, resumed_params = simulate(make_parts(), rounds=4, seed=1, output_dir=tmp_path / "b", resume=True,
                                       plugins=[plugin()])
    assert [r["epsilon"] for r in resumed] == [r["epsilon"] for r in full]
    assert resumed.last["epsilon"][CLIENT_PARTY] == pytest.approx(rdp(1.5, 1.0, 4), abs=1e-9)
    assert all(torch.equal(resumed_params[k], v) for k, v in full_params.items())  # seeded noise: bit-identical
