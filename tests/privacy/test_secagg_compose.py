"""Distributed client-level DP under SecAgg+: clients add noise shares, secure aggregation sums them."""

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from tessera.horizontal.simulation import simulate
from tessera.privacy import CLIENT_PARTY, ClientLevelDP

from .helpers import make_parts

secagg = pytest.importorskip("tessera.secagg")


def test_distributed_noise_shares_under_secagg_plus() -> None:
    z, clip, n = 1.0, 0.05, 4
    _, plain = simulate(make_parts(clients=n), rounds=1, seed=0)
    # Without noise and with an inactive clip, SecAgg+ over the clipped updates is FedAvg up to quantisation
    _, quiet = simulate(make_parts(clients=n), rounds=1, seed=0,
                        plugins=[secagg.SecAggPlus(clip=8.0, bits=32),
                                 ClientLevelDP(clip=1e3, noise_multiplier=0.0, mode="distributed")])
    for k, v in plain.items():
        torch.testing.assert_close(quiet[k], v, rtol=0, atol=1e-4)
    # With noise: the aggregate moves from the clipped noise-free mean by the sum of n shares / n, std z*C/n
    _, clean = simulate(make_parts(clients=n), rounds=1, seed=0,
                        plugins=[secagg.SecAggPlus(clip=8.0, bits=32),
                                 ClientLevelDP(clip=clip, noise_multiplier=0.0, mode="distributed")])
    hist, noisy = simulate(make_parts(clients=n), rounds=1, seed=0,
                           plugins=[secagg.SecAggPlus(clip=8.0, bits=32),
                                    ClientLevelDP(clip=clip, noise_multiplier=z, mode="distributed")])
    diff = torch.cat([(noisy[k].double() - clean[k].double()).reshape(-1) for k in clean])
    assert abs(float(diff.std()) / (z * clip / n) - 1) < 0.35  # 75 coordinates: a loose statistical bound
    acc = RDPAccountant()
    acc.history = [(z, 1.0, 1)]  # every client sampled: q = 1
    assert hist.last["epsilon"][CLIENT_PARTY] == pytest.approx(acc.get_epsilon(delta=1e-5), abs=1e-9)
    assert math.isfinite(hist.last["epsilon"][CLIENT_PARTY])
