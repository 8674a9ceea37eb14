"""serde against hostile bytes (issue 16 item 3/5): each forged input is refused with SerdeError, never another
exception, and never after allocating what it claims; plus the buffer-list encoding and in-place decoding.

Oracles: the attack's own arithmetic (what a decoder without the check would build), tracemalloc's peak during the
refused decode, exact round trips, and tensor data pointers (a view lies inside the buffer it was decoded from).
"""

from __future__ import annotations

import struct
import tracemalloc

import msgpack
import pytest
import torch

from tessera.core import serde
from tessera.core.errors import SerdeError
from tessera.runtime.messages import FitRes


def _forge(header: object, body: bytes = b"", *, magic: bytes = serde.MAGIC) -> bytes:
    h: bytes = msgpack.packb(header, use_bin_type=True)
    pad = bytes(-(8 + len(h)) % serde.ALIGN) if magic == serde.MAGIC else b""
    return magic + struct.pack("<I", len(h)) + h + pad + body


def _nested(depth: int) -> object:
    value: object = 1.0
    for _ in range(depth - 1):
        value = [value]
    return value


def test_a_600_deep_message_is_a_serde_error_not_a_recursion_error() -> None:
    blob = _forge({"type": "FitRes", "fields": {"params": {}, "num_examples": 1, "metrics": {"m": _nested(600)},
                                                "extras": {}}})
    assert len(blob) < 720  # the attack: 668 bytes (plus the alignment padding)
    with pytest.raises(SerdeError, match=f"deeper than {serde.MAX_DEPTH}"):
        serde.decode_message(blob)
    raw = b"\x91" * 100_000 + b"\xc0"  # far deeper than msgpack's own stack: still a SerdeError
    with pytest.raises(SerdeError):
        serde.loads(serde.MAGIC + struct.pack("<I", len(raw)) + raw + bytes(-(8 + len(raw)) % serde.ALIGN))


def test_nesting_at_the_limit_round_trips_and_one_more_is_refused_on_both_sides() -> None:
    ok = _nested(serde.MAX_DEPTH)
    assert serde.loads(serde.dumps(ok)) == ok
    with pytest.raises(SerdeError, match="deeper"):
        serde.dumps(_nested(serde.MAX_DEPTH + 1))
    with pytest.raises(SerdeError, match="deeper"):
        serde.loads(_forge(_nested(serde.MAX_DEPTH + 1)))


def test_overlapping_descriptors_cannot_decode_to_more_than_the_message() -> None:
    mib = 1024**2
    desc = {"$t": ["float32", [mib // 4], 0, mib]}
    blob = _forge({f"w{i}": desc for i in range(200)}, bytes(mib))
    claimed = 200 * mib  # what a decoder that trusts each descriptor alone would build: 200 MB from 1 MB
    assert len(blob) < 1.01 * mib and claimed >= 200 * len(blob) * 0.99
    tracemalloc.start()
    try:
        with pytest.raises(SerdeError, match="overlap"):
            serde.loads(blob)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * mib  # refused before building anything near the claimed size


@pytest.mark.parametrize(("header", "body", "match"), [
    ({"a": {"$t": ["float32", [2], 8, 8]}, "b": {"$t": ["float32", [2], 0, 8]}}, bytes(16), "overlap"),  # reordered
    ({"a": {"$t": ["uint8", [4], 0, 4]}}, bytes(4 + 64), "follow the last tensor"),  # trailing bytes
    ({"a": {"$t": ["uint8", [4], 100, 4]}}, bytes(104), "overlap"),  # a gap larger than the alignment
    ({"a": {"$t": ["uint8", [4], 0, 4]}}, bytes(3), "truncated"),
    ({"a": {"$t": ["bool", [3], 0, 3]}}, b"\x00\x01\x02", "0 and 1"),
    ({"a": {"$t": ["float32", [True], 0, 4]}}, bytes(4), "shape"),
    ({"a": {"$t": ["uint8", [1] * 33, 0, 1]}}, bytes(1), "shape"),
    ({"a": {"$t": ["uint8", [1], False, 1]}}, bytes(1), "offset"),
    ({"a": {"$t": ["uint8", [1], 0, 1], "x": 1}}, bytes(1), "only key"),
    ({"a": {"$i": "12x"}}, b"", "big integer"),
    ({"a": {"$i": "9" * 5000}}, b"", "big integer"),
    ({"a": {"$i": 5}}, b"", "big integer"),
    ({"$x": 1}, b"", "keys"),
])
def test_forged_headers_are_refused(header: object, body: bytes, match: str) -> None:
    with pytest.raises(SerdeError, match=match):
        serde.loads(_forge(header, body))


def test_non_string_keys_and_msgpack_extensions_are_refused() -> None:
    for raw in (msgpack.packb({b"k": 1}, use_bin_type=True), msgpack.packb(msgpack.ExtType(5, b"x")),
                msgpack.packb(msgpack.Timestamp(1)), msgpack.packb({1: 2})):
        pad = bytes(-(8 + len(raw)) % serde.ALIGN)
        with pytest.raises(SerdeError):
            serde.loads(serde.MAGIC + struct.pack("<I", len(raw)) + raw + pad)


def test_a_message_built_from_wrong_values_is_a_serde_error() -> None:
    with pytest.raises(SerdeError):
        serde.decode_message(serde.dumps({"type": "FitRes", "fields": {"params": {"w": 3}, "num_examples": 1,
                                                                        "metrics": {}, "extras": {}}}))


def test_parts_are_views_of_the_tensors_and_join_to_dumps() -> None:
    w, b = torch.arange(1000, dtype=torch.float32), torch.tensor([True, False])
    parts = serde.encode_parts({"w": w, "b": b, "n": 3})
    assert b"".join(parts) == serde.dumps({"w": w, "b": b, "n": 3})
    views = [p for p in parts if isinstance(p, memoryview)]
    assert len(views) == 2 and torch.frombuffer(views[0], dtype=torch.uint8).data_ptr() == w.data_ptr()
    assert serde.parts_size(parts) == len(b"".join(parts)) and len(parts[0]) % serde.ALIGN == 0


def test_take_decodes_views_into_the_buffer_and_bytes_are_copied_once() -> None:
    params = {"a": torch.arange(5, dtype=torch.int8), "w": torch.randn(33, dtype=torch.float64),
              "h": torch.randn(7).to(torch.bfloat16)}
    blob = serde.encode_message(FitRes(params=params, num_examples=2))
    buf = bytearray(blob)
    start = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    end = start + len(buf)
    taken = serde.decode_message(buf, take=True).params
    for k, t in taken.items():
        assert torch.equal(t, params[k]) and start <= t.data_ptr() < end and t.data_ptr() % t.element_size() == 0
    copied = serde.decode_message(blob).params
    copied["w"].add_(1)  # a copy: the blob (immutable bytes) and a fresh decode are unchanged
    assert torch.equal(serde.decode_message(blob).params["w"], params["w"])


def test_borrow_views_read_only_data_and_frozen_hand_over_refuses_writes() -> None:
    """What the Ray backend does with a reply in the object store: no copy, and no way to write through it."""
    import numpy as np

    from tessera.runtime.handover import hand_over

    params = {"w": torch.randn(1000), "i": torch.arange(4)}
    store = np.frombuffer(serde.encode_message(FitRes(params=params, num_examples=2)), dtype=np.uint8)
    assert not store.flags.writeable  # read-only, like an object store's pages
    lo = store.ctypes.data
    borrowed = serde.decode_message(store.data, borrow=True).params
    for k, t in borrowed.items():
        assert torch.equal(t, params[k]) and lo <= t.data_ptr() < lo + store.nbytes  # views, not copies
    frozen = hand_over(FitRes(params=borrowed, num_examples=2), frozen=True).params
    with pytest.raises(Exception, match=r"read-only|frozen"):
        frozen["w"].add_(1)
    assert torch.equal(borrowed["w"], params["w"])
    copied = serde.decode_message(store.data).params  # without borrow: one copy, outside the store
    assert not lo <= copied["w"].data_ptr() < lo + store.nbytes


def test_blobs_written_before_alignment_still_decode() -> None:
    legacy = _forge({"t": {"$t": ["int16", [2], 0, 4]}, "x": [1, "y"]}, b"\x01\x00\x02\x00",
                    magic=serde.LEGACY_MAGIC)
    back = serde.loads(legacy)
    assert torch.equal(back["t"], torch.tensor([1, 2], dtype=torch.int16)) and back["x"] == [1, "y"]
