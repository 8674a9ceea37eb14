"""wire_size counts a message's bytes from dtypes and shapes alone: the oracle is the real encoder's length."""

from typing import Any

import numpy as np
import pytest
import torch

from tessera.core.errors import ProtocolError, SerdeError
from tessera.core.serde import encode_message
from tessera.runtime.handover import FrozenTensor, hand_over, wire_size
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
