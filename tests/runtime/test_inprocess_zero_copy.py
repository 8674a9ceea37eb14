"""The in-process backend's zero-copy hand-over: same training and byte counts as the wire, and a client can never
change the coordinator's tensors."""

from typing import Any

import pytest
import torch

from tessera.core.serde import encode_message
from tessera.horizontal.simulation import simulate
from tessera.horizontal.strategies import FedAdam, FedAvg, FedMedian, Scaffold
from tessera.runtime.backend import ClientFailure, InProcessBackend
from tessera.runtime.handover import FrozenTensor, hand_over
from tessera.runtime.messages import FitIns, FitRes
from tests.horizontal.helpers import make_parts, params_equal


# FedAvg and FedAdam fold each reply as it arrives (lent: the client's own tensors); FedMedian and SCAFFOLD keep every
# reply (copied): if a kept reply aliased the client's model, every update would be the last client's.
@pytest.mark.parametrize("strategy", [FedAvg, FedAdam, FedMedian, lambda: Scaffold(local_lr=0.1)])
def test_zero_copy_and_forced_wire_train_bit_identically_with_the_same_byte_counts(strategy: Any) -> None:
    runs = {}
    for wire in (False, True):
        history, params = simulate(make_parts(strategy()), rounds=2, seed=3, backend_options={"wire": wire})
        runs[wire] = (history.records, params)
    (h0, p0), (h1, p1) = runs[False], runs[True]
    assert params_equal(p0, p1)
    for a, b in zip(h0, h1, strict=True):
        assert (a["bytes_up"], a["bytes_down"]) == (b["bytes_up"], b["bytes_down"]) and a["bytes_up"] > 0
        assert a["train_loss"] == b["train_loss"] and a["eval_loss"] == b["eval_loss"]


def test_wire_env_var_forces_the_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_INPROCESS_WIRE", "1")
    assert InProcessBackend(_Echo()).wire
    monkeypatch.setenv("TESSERA_INPROCESS_WIRE", "0")
    assert not InProcessBackend(_Echo()).wire


class _Echo:
    """Returns the params it was sent, after `act` had its way with them."""

    def __init__(self, act: Any = None) -> None:
        self.act = act
        self.seen: list[FitIns] = []

    def handle(self, client: str, msg: Any) -> Any:
        self.seen.append(msg)
        if self.act is not None:
            self.act(msg.params)
        return FitRes(params={k: v.clone() for k, v in msg.params.items()}, num_examples=1)


def _global() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}


@pytest.mark.parametrize("mutate", [
    lambda p: p["w"].add_(1),
    lambda p: p["w"].__setitem__(0, 5.0),
    lambda p: p["w"].view(-1)[:2].zero_(),
    lambda p: p["w"].data.mul_(0),
    lambda p: torch.add(p["b"], 1, out=p["b"]),
    lambda p: p["b"].numpy().__setitem__(0, 9.0),
])
def test_a_client_cannot_change_a_tensor_the_server_holds(mutate: Any) -> None:
    server = _global()
    before = {k: v.clone() for k, v in server.items()}
    backend = InProcessBackend(_Echo(mutate))
    reply = backend.exchange({"c0": FitIns(round=1, params=server)})["c0"]
    assert isinstance(reply, ClientFailure)  # the write raised inside the client: its failure, not the round's
    assert params_equal(server, before)


def test_over_the_wire_the_client_mutates_its_own_copy_and_the_server_is_unchanged() -> None:
    server = _global()
    before = {k: v.clone() for k, v in server.items()}
    reply = InProcessBackend(_Echo(lambda p: p["w"].add_(1)), wire=True).exchange(
        {"c0": FitIns(round=1, params=server)})["c0"]
    assert isinstance(reply, FitRes) and torch.equal(reply.params["w"], before["w"] + 1)
    assert params_equal(server, before)


def test_zero_copy_shares_memory_counts_exact_wire_bytes_and_reads_like_plain_tensors() -> None:
    server = _global()
    handler = _Echo()
    backend = InProcessBackend(handler)
    ins = FitIns(round=1, params=server, config={"lr": 0.1})
    reply = backend.exchange({"c0": ins})["c0"]
    got = handler.seen[0]
    assert isinstance(got.params["w"], FrozenTensor) and got.params["w"].data_ptr() == server["w"].data_ptr()
    assert got.params is not server and got.config is not ins.config  # containers are the receiver's own
    assert backend.traffic.down == len(encode_message(ins))
    assert backend.traffic.up == len(encode_message(reply))
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(got.params["w"])  # how a client loads params: reads them, allowed
    derived = got.params["w"] * 2 + 1  # new memory is an ordinary tensor again
    assert type(derived) is torch.Tensor and type(got.params["w"].clone()) is torch.Tensor
    derived.add_(1)


def test_replies_are_detached_cpu_tensors_and_not_frozen() -> None:
    t = torch.ones(3, requires_grad=True) * 2  # a non-leaf with autograd history
    res = hand_over(FitRes(params={"x": t}, num_examples=1), frozen=False)
    assert not res.params["x"].requires_grad and type(res.params["x"]) is torch.Tensor


# ----------------------------------------------------------------------- what travels to Ray actors, and how big
def test_module_factory_ships_the_structure_without_the_weights() -> None:
    from tessera.core.types import ModuleFactory, get_params, set_params

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64))
    model.register_buffer("table", torch.arange(4.0), persistent=False)  # not in the state dict: kept as is
    factory = ModuleFactory(model)
    assert all(t.device.type == "meta" for t in factory.skeleton.state_dict().values())
    built = factory()
    assert [(k, v.shape, v.dtype) for k, v in built.state_dict().items()] == \
        [(k, v.shape, v.dtype) for k, v in model.state_dict().items()]
    assert all(not v.any() for v in built.state_dict().values()) and torch.equal(built.table, model.table)
    set_params(built, get_params(model))  # what every client does before using its model
    x = torch.randn(8, 64)
    model.eval(), built.eval()
    assert torch.equal(built(x), model(x))


def test_the_object_store_is_sized_for_the_model() -> None:
    from tessera.runtime.ray.options import RayOptions

    small = RayOptions()
    assert small.store_bytes() == small.object_store_memory
    big = RayOptions(model_bytes=200 * 1024**2, num_actors=2, max_inflight=2)
    assert big.store_bytes() == (1 + 2 * 2) * 200 * 1024**2 + 64 * 1024**2
