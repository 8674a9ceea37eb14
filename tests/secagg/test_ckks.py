"""CKKS aggregation: the decrypted sum equals the plain sum within CKKS precision, the server holds only a public
context, stages are enforced, and FedAvg on digits reaches the clear run's accuracy."""

import pytest
import tenseal as ts
import torch

from tessera.core.errors import ProtocolError
from tessera.horizontal.simulation import simulate
from tessera.secagg import CKKS
from tessera.secagg.ckks import simulate_ckks_round
from tessera.secagg.ckks_protocol import (
    CKKSDecryptIns,
    CKKSKeygenIns,
    CKKSKeygenRes,
    CKKSSetupIns,
    client_step,
    make_context,
    public_context,
)
from tests.fixtures import digits_job

from .helpers import make_updates
from .test_horizontal import fedavg

# CKKS at scale 2^40: each encoded value carries ~2^-40 * sqrt(N) noise, sums add it; 1e-6 holds with margin.
CKKS_BOUND = 1e-6


@pytest.mark.parametrize("dropped", [set(), {1, 4, 7}])
def test_decrypted_sum_equals_the_plain_sum(dropped: set[int]) -> None:
    updates = make_updates(10, seed=4)
    total, server, _ = simulate_ckks_round(updates, dropouts=dropped)
    alive = [i for i in range(10) if i not in dropped]
    for k in total:
        assert float((total[k] - sum(updates[i][k].double() for i in alive)).abs().max()) < CKKS_BOUND
    assert server.context is not None and not server.context.is_private()  # the server cannot decrypt
    assert set(server.meta) == {f"client{i}" for i in alive}


def test_server_refuses_a_context_holding_the_secret_key() -> None:
    ctx = make_context(8192, 40)
    with pytest.raises(ProtocolError, match="secret key"):
        public_context(ctx.serialize(save_secret_key=True))
    ctx.make_context_public()
    assert not public_context(ctx.serialize()).is_private()


def _no_train(m):  # type: ignore[no-untyped-def]
    return torch.zeros(2, dtype=torch.float64), 1, {}


def test_client_refuses_out_of_stage_and_replayed_messages() -> None:
    setup = CKKSSetupIns(round=1, clients=("a", "b"), poly_modulus_degree=8192, scale_bits=40, clip=8.0,
                         max_weight=1.0, dim=3)
    with pytest.raises(ProtocolError, match="out of stage"):
        client_step(None, CKKSDecryptIns(round=1, chunks=[]), "a", _no_train)
    st, key = client_step(None, setup, "a", _no_train)
    with pytest.raises(ProtocolError, match="stale or replayed"):
        client_step(st, setup, "a", _no_train)
    with pytest.raises(ProtocolError, match="out of stage"):  # asked to decrypt before taking part
        client_step(st, CKKSDecryptIns(round=1, chunks=[]), "a", _no_train)
    with pytest.raises(ProtocolError, match=r"not the round.s key leader"):
        client_step(st, CKKSKeygenIns(round=1, pks={"a": b"\x01" * 32}), "a", _no_train)
    st, res = client_step(st, CKKSKeygenIns(round=1, pks={"a": key.pk, "b": key.pk}), "a", _no_train)
    assert isinstance(res, CKKSKeygenRes) and not ts.context_from(res.public_context).is_private()
    with pytest.raises(ProtocolError, match="out of stage"):
        client_step(st, CKKSKeygenIns(round=1, pks={"a": key.pk}), "a", _no_train)  # replayed


@pytest.mark.slow
def test_fedavg_with_ckks_matches_the_clear_run() -> None:
    h0, p0 = simulate(digits_job(fedavg(), num_clients=4, dropout=0.25), rounds=2, seed=0)
    h1, p1 = simulate(digits_job(fedavg(), num_clients=4, dropout=0.25), rounds=2, seed=0, plugins=[CKKS()])
    assert abs(h0["central_metrics.accuracy"][-1] - h1["central_metrics.accuracy"][-1]) <= 0.01
    assert max(float((p0[k] - p1[k]).abs().max()) for k in p0) < 1e-4
