"""Three roles: data owners (bases), a compute party (fuse model, no labels, no base) and a label party (labels
and loss only). Oracle: centralised training of the composed model; and what crossed the wire to the compute
party (no labels, only embeddings, loss values and output gradients)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

import tessera
from tessera.core.errors import ConfigError
from tessera.runtime.backend import InProcessBackend
from tessera.vertical.messages import BackwardRes, Forward, InfoIns, InfoRes, LossIns, LossRes, SaveRes

from .helpers import composed, make_data, make_split, train_central
from .test_trainer import OPTIMIZERS, assert_params_close


class Tap(InProcessBackend):
    """Keeps every reply the compute party received (the in-process backend encodes each as on the wire)."""

    def __init__(self, handler: Any) -> None:
        super().__init__(handler)
        self.received: list[Any] = []

    def exchange(self, requests: Any, *, timeout: float | None = None) -> dict[str, Any]:
        replies = super().exchange(requests, timeout=timeout)
        self.received += list(replies.values())
        return replies


def tensors(msg: Any) -> list[torch.Tensor]:
    out = []
    for f in dataclasses.fields(msg):
        v = getattr(msg, f.name)
        if isinstance(v, torch.Tensor):
            out.append(v)
    return out


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_compute_party_training_equals_centralised_and_never_sees_labels(opt_name: str) -> None:
    x, y = make_data()
    bases, fuse = make_split()  # both bases at owners alice and bob; fuse at "gpu"; labels at "bank"
    central = composed(bases, fuse)
    opt = OPTIMIZERS[opt_name]
    taps: list[Tap] = []
    sl = tessera.SLModel(base_models=bases, fuse_model=fuse, label_party="bank", compute_party="gpu",
                         loss_fn=nn.BCEWithLogitsLoss(), optimizer_fn=opt,
                         backend=lambda h: taps.append(Tap(h)) or taps[-1])
    history = sl.fit(x=x, y=y, epochs=3, batch_size=16, validation_data=(x, y))
    losses = train_central(central, x, y, epochs=3, batch_size=16, optimizer_fn=opt)
    assert_params_close(sl.model, central)
    assert history["train_loss"] == pytest.approx(losses, abs=1e-6)
    central.eval()
    with torch.no_grad():
        ref = central(x)
    torch.testing.assert_close(sl.predict(x=x), ref, atol=1e-6, rtol=0)
    assert history.records[-1]["eval_loss"] == pytest.approx(float(nn.BCEWithLogitsLoss()(ref, y)), abs=1e-6)
    # what the compute party received: embeddings, loss values and output gradients, never a label
    got = taps[0].received
    assert {type(m) for m in got} <= {Forward, LossRes, InfoRes, BackwardRes, SaveRes}
    assert any(isinstance(m, LossRes) and m.grad is not None for m in got)
    for m in got:
        for t in tensors(m):
            assert not (t.shape == y.shape and torch.equal(t, y)), f"{type(m).__name__} carries the labels"
            assert not (t.dim() == 2 and t.shape[1] == 1 and set(t.flatten().tolist()) <= {0.0, 1.0}), \
                f"{type(m).__name__} carries 0/1 values shaped like labels"
    # ... and the label party received only outputs and questions about row counts
    assert sl.label is not None and set(sl.label.received) == {InfoIns, LossIns}


def test_compute_party_roles_are_checked() -> None:
    bases, fuse = make_split()
    with pytest.raises(ConfigError, match="hold no base model"):
        tessera.SLModel(base_models=bases, fuse_model=fuse, label_party="alice", compute_party="gpu",
                        loss_fn=nn.BCEWithLogitsLoss(), optimizer_fn=OPTIMIZERS["sgd"])


@pytest.mark.slow
def test_three_roles_over_grpc_equal_the_in_process_run(tmp_path: Any) -> None:
    import threading

    from tessera.runtime.grpc import ClientParty, GrpcBackend
    from tessera.runtime.grpc.certs import init_ca, issue
    from tessera.runtime.grpc.config import build
    from tessera.vertical.label import LabelParty
    from tessera.vertical.owner import DataOwner
    from tessera.vertical.trainer import SplitTrainer

    def fed(port: int) -> Any:
        parties = [{"name": "gpu", "role": "coordinator", "address": f"127.0.0.1:{port}"},
                   *({"name": n} for n in ("alice", "bob", "bank"))]
        return build({"federation": {"ca_cert": "ca.crt", "certs_dir": ".", "quorum_deadline_s": 20,
                                     "rpc_deadline_s": 20, "retry": {"initial_backoff_s": 0.05, "max_attempts": 50}},
                      "parties": parties}, source="test", base=tmp_path)

    init_ca(tmp_path)
    for n in ("gpu", "alice", "bob", "bank"):
        issue(tmp_path, n)
    x, y = make_data()
    bases, fuse = make_split()
    oracle = tessera.SLModel(base_models=bases, fuse_model=fuse, label_party="bank", compute_party="gpu",
                             loss_fn=nn.BCEWithLogitsLoss(), optimizer_fn=OPTIMIZERS["adam"])
    oracle.fit(x=x, y=y, epochs=2, batch_size=16)
    bases, fuse = make_split()  # the same initial weights again
    backend = GrpcBackend(fed(0), {n: n for n in ("alice", "bob", "bank")}, min_clients=3)
    port = backend.listen()
    handlers: dict[str, Any] = {p: DataOwner(p, bases[p], OPTIMIZERS["adam"], data={"train": x[p]}) for p in bases}
    handlers["bank"] = LabelParty("bank", nn.BCEWithLogitsLoss(), labels={"train": y})
    clients = [ClientParty(fed(port), n, h) for n, h in handlers.items()]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for t in threads:
        t.start()
    trainer = SplitTrainer(fuse=fuse, loss_fn=None, optimizer_fn=OPTIMIZERS["adam"], label_party="gpu",
                           order=list(bases), backend=backend, loss_party="bank")
    try:
        trainer.fit(epochs=2, batch_size=16)
    finally:
        trainer.close()
        for t in threads:
            t.join(20)
    assert_params_close(fuse, oracle.fuse_model, atol=0)
    for p in bases:
        assert_params_close(bases[p], oracle.base_models[p], atol=0)
    assert set(handlers["bank"].received) == {InfoIns, LossIns}
