"""Fuzz the serde decoders (wire messages, checkpoints, stored client state) with a fixed seed and budget: random
bytes, forged headers with random tensor descriptors, and random edits of valid blobs. Oracle: only TesseraError
comes out, and a blob that does decode never yields more tensor bytes than it holds."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import torch
from hypothesis import given
from hypothesis import strategies as st

from tessera.core import serde
from tessera.runtime.messages import ErrorRes, EvaluateRes, FitIns, FitRes
from tests.fuzz.conftest import FUZZ, mutate, mutations, only_tessera_errors

W = torch.linspace(-2, 2, 20).reshape(5, 4)
MESSAGES = [
    serde.encode_message(FitIns(round=3, params={"w": W, "b": torch.zeros(3, dtype=torch.float16)},
                                config={"lr": 0.1, "epochs": 1, "name": "x"},
                                extras={"c": {"m": torch.ones(2, dtype=torch.bfloat16)}})),
    serde.encode_message(FitRes(params={"w": torch.arange(6, dtype=torch.int64), "mask": torch.tensor([True, False])},
                                num_examples=10, metrics={"loss": 0.5})),
    serde.encode_message(EvaluateRes(loss=1.5, num_examples=3, metrics={"acc": 0.9})),
    serde.encode_message(ErrorRes(kind="ValueError", reason="no data")),
]
CHECKPOINT = serde.dumps({
    "format": 1, "round": 4, "seed": 0, "params": {"fc.weight": W, "fc.bias": torch.zeros(5)},
    "strategy": {"m": {"fc.weight": torch.zeros(5, 4)}, "v": {"fc.weight": torch.ones(5, 4)}, "t": 3},
    "history": [{"round": r, "loss": 1.0 / r, "clients": ["c0", "c1"], "epsilon": {"c0": 0.1 * r}} for r in (1, 2)],
    "extensions": {"ledger": {"rng": {"state": 2**127 + 1, "inc": 5}, "steps": [1, 2, 3]}},
})


def _tensor_bytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    if hasattr(tree, "__dataclass_fields__"):
        return sum(_tensor_bytes(getattr(tree, f)) for f in tree.__dataclass_fields__)
    return 0


def _bounded(target: str, fn: Any, blob: bytes) -> None:
    out = only_tessera_errors(target, fn, blob)
    assert _tensor_bytes(out) <= len(blob)


@FUZZ
@given(st.sampled_from([b"", serde.MAGIC, serde.LEGACY_MAGIC]), st.binary(max_size=2048))
def test_fuzz_loads_random_bytes(magic: bytes, data: bytes) -> None:
    _bounded("serde.loads random bytes", serde.loads, magic + data)


descriptor = st.lists(st.one_of(st.sampled_from(["float32", "bool", "int64", "bfloat16", "object", ""]),
                                st.lists(st.integers(-2, 300), max_size=4), st.integers(-2, 2**33), st.booleans(),
                                st.none()), min_size=0, max_size=5)
leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=5),
                 st.binary(max_size=5), st.builds(lambda d: {"$t": d}, descriptor),
                 st.builds(lambda s: {"$i": s}, st.one_of(st.text(max_size=45), st.integers(-(2**63), 2**63 - 1))))
header = st.recursive(leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                   st.dictionaries(st.text(max_size=4), kids, max_size=4)),
                      max_leaves=25)


@FUZZ
@given(header, st.binary(max_size=1024), st.booleans(), st.booleans())
def test_fuzz_forged_headers(h: Any, body: bytes, aligned: bool, take: bool) -> None:
    raw: bytes = msgpack.packb(h, use_bin_type=True)
    magic = serde.MAGIC if aligned else serde.LEGACY_MAGIC
    pad = bytes(-(8 + len(raw)) % serde.ALIGN) if aligned else b""
    blob = magic + struct.pack("<I", len(raw)) + raw + pad + body
    _bounded("serde.loads forged header", lambda b: serde.loads(bytearray(b) if take else b, take=take), blob)


@FUZZ
@given(st.sampled_from(range(len(MESSAGES))), mutations(), st.booleans())
def test_fuzz_decode_message_mutated(which: int, ops: list[tuple[int, int, int]], take: bool) -> None:
    blob = mutate(MESSAGES[which], ops)
    _bounded("serde.decode_message mutated message",
             lambda b: serde.decode_message(bytearray(b) if take else b, take=take), blob)


@FUZZ
@given(mutations(max_ops=8))
def test_fuzz_checkpoint_bytes(ops: list[tuple[int, int, int]]) -> None:
    _bounded("checkpoint bytes (serde.loads)", serde.loads, mutate(CHECKPOINT, ops))
