"""Split inference: owners keep their bases and serve embeddings of aligned rows; the fusing party's predictions
equal the exported composed model's exactly (in-process and over loopback gRPC + mTLS); owners refuse rows
outside the aligned set and log every request."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import tessera
from tessera.core.errors import ProtocolError
from tessera.export import load_bundle, save_bundle
from tessera.runtime.backend import InProcessBackend
from tessera.runtime.grpc import ClientParty, GrpcBackend
from tessera.runtime.grpc.certs import init_ca, issue
from tessera.runtime.grpc.config import FederationConfig, build
from tessera.vertical.owner import OwnerGroup
from tessera.vertical.serve import EmbeddingServer, EmbedIns, SplitPredictor

from .helpers import make_data, make_split


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, nn.Module, dict[str, torch.Tensor]]:
    x, y = make_data(rows=300)
    bases, fuse = make_split()
    sl = tessera.SLModel(base_models=bases, fuse_model=fuse, label_party="alice", loss_fn=nn.BCEWithLogitsLoss(),
                         optimizer_fn=lambda p: torch.optim.Adam(p, lr=0.05))
    sl.fit(x=x, y=y, epochs=2, batch_size=32)
    path = tmp_path_factory.mktemp("bundle") / "model"
    save_bundle(sl, path, example_inputs={p: v[:4] for p, v in x.items()}, party="alice", audit_log=False)
    return sl, load_bundle(path), x


def _exported(model: nn.Module, x: dict[str, torch.Tensor], rows: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model({p: v[rows[i : i + batch]] for p, v in x.items()}) for i in range(0, len(rows), batch)])


def test_predictions_equal_the_exported_model_and_owners_log_requests(trained: Any, tmp_path: Path) -> None:
    sl, exported, x = trained
    ticks = iter(range(1000))
    bob = EmbeddingServer("bob", copy.deepcopy(sl.base_models["bob"]), x["bob"], asker="alice",
                          log_path=tmp_path / "bob.jsonl", clock=lambda: float(next(ticks)))
    predictor = SplitPredictor(fuse=sl.fuse_model, order=["alice", "bob"], me="alice",
                               backend=InProcessBackend(OwnerGroup([bob])),
                               local_base=sl.base_models["alice"], local_x=x["alice"])
    rows = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:250]
    got = predictor.predict(rows, batch_size=64)
    assert torch.equal(got, _exported(exported, x, rows, 64))
    assert torch.equal(sl.predict(x=x, batch_size=300), _exported(exported, x, torch.arange(300), 300))
    # the owner's request log: which rows, when, who asked -- in memory and on disk
    assert [e.rows for e in bob.log] == [rows[i : i + 64].tolist() for i in range(0, 250, 64)]
    assert [e.at for e in bob.log] == [0.0, 1.0, 2.0, 3.0] and {e.by for e in bob.log} == {"alice"}
    on_disk = [json.loads(line) for line in (tmp_path / "bob.jsonl").read_text().splitlines()]
    assert [d["rows"] for d in on_disk] == [e.rows for e in bob.log]


def test_owner_refuses_rows_outside_the_aligned_set(trained: Any) -> None:
    sl, _, x = trained
    bob = EmbeddingServer("bob", sl.base_models["bob"], x["bob"][:100])
    for rows in (torch.tensor([5, 100]), torch.tensor([-1]), torch.tensor([1.0]), torch.zeros(1, 1, dtype=torch.int64)):
        with pytest.raises(ProtocolError):
            bob.handle("bob", EmbedIns(request=1, rows=rows))
    assert bob.log == []  # refused requests are answered with nothing
    with pytest.raises(ProtocolError, match="serves embeddings only"):
        bob.handle("bob", "hello")


def _fed(certs: Path, port: int) -> FederationConfig:
    parties = [{"name": "alice", "role": "coordinator", "address": f"127.0.0.1:{port}"}, {"name": "bob"},
               {"name": "carol"}]
    fed = {"ca_cert": "ca.crt", "certs_dir": ".", "quorum_deadline_s": 20, "rpc_deadline_s": 20,
           "retry": {"initial_backoff_s": 0.05, "max_attempts": 50}}
    return build({"federation": fed, "parties": parties}, source="test", base=certs)


@pytest.mark.slow
def test_split_inference_over_grpc_equals_the_exported_model(tmp_path: Path) -> None:
    # three parties: alice fuses (and owns a base), bob and carol serve their bases over gRPC + mTLS
    torch.manual_seed(0)
    cols = {"alice": 3, "bob": 5, "carol": 4}
    bases = {p: nn.Sequential(nn.Linear(c, 8), nn.ReLU()) for p, c in cols.items()}
    fuse = tessera.vertical.ConcatFuse(nn.Linear(24, 2))
    x = {p: torch.randn(500, c) for p, c in cols.items()}
    init_ca(tmp_path)
    for name in cols:
        issue(tmp_path, name)
    backend = GrpcBackend(_fed(tmp_path, 0), {"bob": "bob", "carol": "carol"}, min_clients=2)
    port = backend.listen()
    servers = {p: EmbeddingServer(p, copy.deepcopy(bases[p]), x[p], asker="alice") for p in ("bob", "carol")}
    clients = [ClientParty(_fed(tmp_path, port), p, s) for p, s in servers.items()]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for t in threads:
        t.start()
    predictor = SplitPredictor(fuse=fuse, order=list(cols), backend=backend, me="alice", local_base=bases["alice"],
                               local_x=x["alice"])
    rows = torch.arange(500).flip(0)
    try:
        got = predictor.predict(rows, batch_size=128)
    finally:
        predictor.close()
        for t in threads:
            t.join(20)
    ref = tessera.vertical.SplitModel(bases, fuse, label_party="alice")
    assert torch.equal(got, _exported(ref, x, rows, 128))
    assert [len(s.log) for s in servers.values()] == [4, 4]


def test_serving_owner_loads_the_trained_snapshot_before_serving(tmp_path: Path) -> None:
    from tessera.vertical.messages import LoadIns, SaveIns
    from tessera.vertical.owner import DataOwner
    from tessera.vertical.serve_app import ServingOwner

    x = torch.randn(10, 4)
    trained = DataOwner("bob", nn.Linear(4, 2), lambda p: torch.optim.SGD(p, lr=0.1), data={"predict": x},
                        state_dir=tmp_path)
    sha = trained.handle("bob", SaveIns(tag="ckpt-0", step=0)).sha256
    fresh = DataOwner("bob", nn.Linear(4, 2), lambda p: torch.optim.SGD(p, lr=0.1), data={"predict": x},
                      state_dir=tmp_path)
    serving = ServingOwner(fresh, "predict", asker="alice", log_path=None)
    with pytest.raises(ProtocolError, match="load the trained snapshot"):
        serving.handle("bob", EmbedIns(request=1, rows=torch.arange(3)))
    serving.handle("bob", LoadIns(tag="ckpt-0", sha256=sha))
    got = serving.handle("bob", EmbedIns(request=2, rows=torch.arange(3))).embedding
    with torch.no_grad():
        assert torch.equal(got, trained.base(x[:3]))


def test_an_owner_trained_with_embedding_dp_serves_noised_embeddings(trained: Any) -> None:
    from tessera.vertical.protections import EmbeddingDP, clip_rows

    sl, _, x = trained
    dp = EmbeddingDP(clip_norm=1.0, noise_multiplier=0.5)
    plain = EmbeddingServer("bob", sl.base_models["bob"], x["bob"])
    noised = EmbeddingServer("bob", sl.base_models["bob"], x["bob"], embedding_dp=dp, seed=3)
    rows = torch.arange(50)
    a = plain.handle("bob", EmbedIns(request=1, rows=rows)).embedding
    b = noised.handle("bob", EmbedIns(request=1, rows=rows)).embedding
    again = EmbeddingServer("bob", sl.base_models["bob"], x["bob"], embedding_dp=dp, seed=3)
    assert torch.equal(b, again.handle("bob", EmbedIns(request=1, rows=rows)).embedding)  # seeded
    noise = b - clip_rows(a, clip_norm=1.0)  # what was added after clipping: N(0, (0.5 * 1.0)^2)
    assert 0.4 < float(noise.std()) < 0.6
