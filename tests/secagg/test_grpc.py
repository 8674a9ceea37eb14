"""SecAgg+ stages over real loopback gRPC + mTLS (GrpcBackend and three ClientParty threads), one client
dropping mid-round: the same stage driver as in simulation, the survivors' sum, nothing else changed."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from tessera.runtime.grpc import ClientParty, GrpcBackend
from tessera.runtime.grpc.certs import init_ca, issue
from tessera.runtime.grpc.config import FederationConfig, build
from tessera.runtime.messages import FitIns
from tessera.secagg.messages import Stage
from tessera.secagg.plus import SecAggPlus, flatten, run_stages
from tessera.secagg.quantize import sum_error_bound
from tessera.secagg.server import SecAggServer
from tessera.secagg.simulate import _Parties

from .helpers import make_updates

ROUTES = {"client0": "alice", "client1": "bob", "client2": "carol"}


def _fed(certs: Path, port: int = 0) -> FederationConfig:
    parties = [{"name": "server", "role": "coordinator", "address": f"127.0.0.1:{port}"},
               *({"name": n} for n in ROUTES.values())]
    fed = {"ca_cert": "ca.crt", "certs_dir": ".", "chunk_bytes": 16384, "quorum_deadline_s": 20,
           "rpc_deadline_s": 20, "retry": {"initial_backoff_s": 0.05, "max_attempts": 50}}
    return build({"federation": fed, "parties": parties}, source="test", base=certs)


@pytest.mark.slow
def test_secagg_round_over_grpc_with_a_mid_round_dropout(tmp_path: Path) -> None:
    init_ca(tmp_path)
    for n in ("server", *ROUTES.values()):
        issue(tmp_path, n)
    updates = make_updates(3, seed=5)
    cfg = SecAggPlus(max_weight=1.0)
    handler: Any = _Parties(updates, {"client2"}, Stage.COLLECT, cfg.pki)  # carol vanishes after sharing her keys
    backend = GrpcBackend(_fed(tmp_path), dict(ROUTES), min_clients=3)
    fed = _fed(tmp_path, backend.listen())
    parties = [ClientParty(fed, n, handler) for n in ROUTES.values()]
    threads = [threading.Thread(target=p.run, daemon=True) for p in parties]
    for t in threads:
        t.start()
    try:
        assert backend.wait_for(list(ROUTES), 20) == list(ROUTES)
        setup = cfg.setup(1, list(ROUTES), dim=34, graph_seed=0)
        server = SecAggServer(setup, pki=cfg.pki)
        run_stages(server, backend, {c: FitIns(round=1, params={}, config={"seed": i}) for i, c in
                                     enumerate(ROUTES)}, timeout=20)
    finally:
        backend.close()
        for t in threads:
            t.join(10)
    assert server.result is not None and server.result.survivors == ("client0", "client1")
    assert server.revealed_sk == {"client2"}  # carol's pairwise masks were rebuilt from shares
    exact = flatten(updates[0]).double() + flatten(updates[1]).double()
    assert float((server.result.values - exact).abs().max()) < sum_error_bound(clients=2, clip=8.0,
                                                                                levels=setup.levels)
