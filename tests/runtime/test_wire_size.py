"""wire_size counts a message's bytes from dtypes and shapes alone: the oracle is the real encoder's length."""

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from tessera.core.errors import ProtocolError, SerdeError
from tessera.core.serde import encode_message
from tessera.core.types import OwnedParams
from tessera.runtime.handover import FrozenTensor, hand_over, hand_over_sized, wire_size
from tessera.runtime.messages import EvaluateRes, FitIns, FitRes


def _messages() -> list[Any]:
    odd = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()  # not contiguous
    return [
        FitIns(round=1, params={}),
        FitIns(round=2**40, params={"w": torch.ones(3, 5), "e": torch.empty(0, 7), "b": torch.zeros(1)},
               config={"seed": -5, "lr": 0.1, "name": "x" * 300, "flag": True},
               extras={"c": {"a": torch.ones(2, dtype=torch.bfloat16), "m": torch.tensor([True, False])}}),
        FitRes(params={"t": odd, "i": torch.arange(1000, dtype=torch.int64)}, num_examples=70_000,
               metrics={"loss": float("nan")}),
        FitRes(params={f"k{i}": torch.ones(i % 5, 3, dtype=torch.float16) for i in range(40)}, num_examples=1),
        EvaluateRes(loss=0.5, num_examples=3, metrics={"accuracy": 1.0}),
    ]


@pytest.mark.parametrize("msg", _messages())
def test_wire_size_is_the_encoded_length(msg: Any) -> None:
    assert wire_size(msg) == len(encode_message(msg))
    frozen = hand_over(msg, frozen=True)  # received tensors are sized without their read-only hook
    assert wire_size(frozen) == len(encode_message(msg))


def test_wire_size_refuses_what_the_encoder_refuses() -> None:
    msg = FitRes(params={"z": torch.ones(2, dtype=torch.complex64)}, num_examples=1)
    for fn in (encode_message, wire_size):
        with pytest.raises(SerdeError, match="cannot be sent"):
            fn(msg)


def test_a_frozen_tensor_loads_into_a_model_and_still_refuses_writes() -> None:
    src = torch.arange(6, dtype=torch.float32)
    f = src.as_subclass(FrozenTensor)
    dst = torch.zeros(6)
    out = dst.copy_(f)  # the fast path: the plain tensor written to comes back plain
    assert out is dst and type(out) is torch.Tensor and torch.equal(dst, src)
    assert f.shape == (6,) and type(f[1:]) is FrozenTensor and type(f + 1) is torch.Tensor
    assert not f.numpy().flags.writeable and isinstance(f.numpy(), np.ndarray)
    with pytest.raises(ProtocolError, match="read-only"):
        f[1:].mul_(2)
    assert torch.equal(src, torch.arange(6, dtype=torch.float32))


def _same(a: Any, b: Any, src: Any) -> bool:
    """`a` and `b` (two hand-overs of `src`): equal values, the same container and tensor types (frozen or plain),
    and each tensor shares `src`'s memory in both or in neither; other values are `src`'s own objects in both."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        shares = {t.data_ptr() == src.data_ptr() for t in (a, b)}
        detached = not (a.requires_grad or b.requires_grad)
        return a.dtype == b.dtype and a.shape == b.shape and len(shares) == 1 and detached and bool(
            torch.equal(a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor)))
    if isinstance(a, dict):
        return list(a) == list(b) == list(src) and all(_same(a[k], b[k], src[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) == len(src) and all(_same(*x) for x in zip(a, b, src, strict=True))
    if hasattr(a, "__dataclass_fields__"):
        return all(_same(getattr(a, f), getattr(b, f), getattr(src, f)) for f in a.__dataclass_fields__)
    return a is src and b is src


def _odd_messages() -> list[Any]:
    """Values off the fast path: numpy arrays and scalars, big ints, tuples, lists, a dict subclass, a Parameter."""
    owned = OwnedParams(w=torch.ones(2, 2))
    return [
        FitIns(round=3, params=owned, config={"n": np.int64(7), "x": np.float32(0.5), "big": 2**70},  # type: ignore[dict-item]
               extras={"t": {"a": torch.nn.Parameter(torch.ones(3)), "g": torch.ones(2, requires_grad=True) * 2}}),
        FitRes(params={"a": np.arange(5, dtype=np.float32)}, num_examples=2,  # type: ignore[dict-item]
               metrics={"l": [1.0, (2, torch.zeros(2))]}),  # type: ignore[dict-item]
    ]


@pytest.mark.parametrize("msg", _messages() + _odd_messages())
@pytest.mark.parametrize("frozen", [True, False])
def test_hand_over_sized_is_hand_over_and_the_encoded_length(msg: Any, frozen: bool) -> None:
    got, size = hand_over_sized(msg, frozen=frozen)
    assert size == wire_size(msg) == len(encode_message(msg))
    assert _same(got, hand_over(msg, frozen=frozen), msg)
    owned, size = hand_over_sized(msg, frozen=frozen, own=True)  # copies: same values, memory of its own
    assert size == len(encode_message(msg)) and type(owned) is type(msg)
    for k, v in getattr(owned, "params", {}).items():
        src = msg.params[k]
        if isinstance(src, torch.Tensor) and src.numel():
            assert v.data_ptr() != src.data_ptr() and torch.equal(v.as_subclass(torch.Tensor), src.detach())


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@dataclass(frozen=True)
class _NotAMessage:
    params: dict[str, torch.Tensor]


@pytest.mark.parametrize("msg", [
    FitRes(params={"z": torch.ones(2, dtype=torch.complex64)}, num_examples=1),
    FitRes(params={"$t": torch.ones(2)}, num_examples=1),
    FitRes(params={1: torch.ones(2)}, num_examples=1),  # type: ignore[dict-item]
    FitRes(params={}, num_examples=1, metrics={"b": bytearray(b"x")}),  # type: ignore[dict-item]
    FitRes(params={}, num_examples=1, metrics={"deep": _nested(40)}),
    FitRes(params={}, num_examples=1, metrics={"s": {1, 2}}),  # type: ignore[dict-item]
    _NotAMessage(params={}),
])
def test_hand_over_sized_refuses_what_the_encoder_refuses(msg: Any) -> None:
    with pytest.raises(SerdeError) as want:
        encode_message(msg)
    with pytest.raises(SerdeError) as got:
        hand_over_sized(msg, frozen=True)
    assert str(got.value) == str(want.value)
