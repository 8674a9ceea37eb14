"""serde: every message type round-trips; anything that is not a valid tessera message is refused."""

import pickle
import struct

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.core import serde
from tessera.core.errors import SerdeError
from tessera.runtime.messages import ErrorRes, EvaluateIns, EvaluateRes, FitIns, FitRes

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
          torch.bool, torch.int8]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * 100
    return t.to(dtype) if dtype != torch.bool else t > 0


params_st = st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda s: not s.startswith("$")), tensors(),
                            max_size=4)
scalars = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=8))
config_st = st.dictionaries(st.text(max_size=6).filter(lambda s: not s.startswith("$")), scalars, max_size=4)
metrics_st = st.dictionaries(st.text(max_size=6).filter(lambda s: not s.startswith("$")),
                             st.floats(allow_nan=False), max_size=3)


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    return a == b


MESSAGES = st.one_of(
    st.builds(FitIns, round=st.integers(0, 10**6), params=params_st, config=config_st,
              extras=st.dictionaries(st.text(min_size=1, max_size=5).filter(lambda s: not s.startswith("$")),
                                     params_st, max_size=2)),
    st.builds(FitRes, params=params_st, num_examples=st.integers(0, 10**9), metrics=metrics_st),
    st.builds(EvaluateIns, round=st.integers(0, 100), params=params_st, config=config_st),
    st.builds(EvaluateRes, loss=st.floats(allow_nan=False), num_examples=st.integers(0, 10**6), metrics=metrics_st),
    st.builds(ErrorRes, kind=st.text(max_size=10), reason=st.text(max_size=30)),
)


@settings(max_examples=150, deadline=None)
@given(MESSAGES)
def test_every_message_type_round_trips(msg: object) -> None:
    back = serde.decode_message(serde.encode_message(msg))
    assert type(back) is type(msg)
    for f in msg.__dataclass_fields__:  # type: ignore[attr-defined]
        assert same(getattr(msg, f), getattr(back, f)), f


def test_big_integers_and_nested_structures_round_trip() -> None:
    state = {"rng": {"state": 2**127 + 5, "inc": -(2**100)}, "list": [1, 2.5, "x", None, b"\x00\x01"],
             "t": torch.arange(6).reshape(2, 3)}
    back = serde.loads(serde.dumps(state))
    assert back["rng"] == state["rng"] and back["list"] == state["list"] and torch.equal(back["t"], state["t"])


def test_pickle_is_refused() -> None:
    blob = pickle.dumps({"w": torch.ones(3)})
    with pytest.raises(SerdeError, match="pickle"):
        serde.loads(blob)
    with pytest.raises(SerdeError):
        serde.decode_message(blob)


def _forge(header: object, body: bytes = b"") -> bytes:
    h = msgpack.packb(header, use_bin_type=True)
    pad = bytes(-(8 + len(h)) % serde.ALIGN)
    return serde.MAGIC + struct.pack("<I", len(h)) + h + pad + body


def test_wrong_dtype_header_is_refused() -> None:
    with pytest.raises(SerdeError, match="not allowed"):
        serde.loads(_forge({"$t": ["object", [1], 0, 8]}, b"\x00" * 8))


def test_shape_that_disagrees_with_byte_count_is_refused() -> None:
    with pytest.raises(SerdeError, match="carries"):
        serde.loads(_forge({"$t": ["float32", [3], 0, 8]}, b"\x00" * 8))


def test_truncated_buffer_is_refused() -> None:
    blob = serde.encode_message(FitRes(params={"w": torch.ones(100)}, num_examples=1))
    with pytest.raises(SerdeError, match="truncated"):
        serde.decode_message(blob[:-10])
    with pytest.raises(SerdeError):
        serde.decode_message(blob[:10])


def test_oversize_message_is_refused() -> None:
    blob = serde.encode_message(FitRes(params={"w": torch.ones(1000)}, num_examples=1))
    with pytest.raises(SerdeError, match="exceeds the limit"):
        serde.decode_message(blob, max_bytes=1000)


def test_wrong_field_types_and_unknown_types_are_refused() -> None:
    good = serde.dumps({"type": "FitRes", "fields": {"params": {}, "num_examples": 3, "metrics": {}, "extras": {}}})
    assert serde.decode_message(good).num_examples == 3
    bad_type = serde.dumps({"type": "FitRes", "fields": {"params": {}, "num_examples": "3", "metrics": {},
                                                          "extras": {}}})
    with pytest.raises(SerdeError, match="num_examples"):
        serde.decode_message(bad_type)
    missing = serde.dumps({"type": "FitRes", "fields": {"params": {}}})
    with pytest.raises(SerdeError, match="do not match"):
        serde.decode_message(missing)
    with pytest.raises(SerdeError, match="unknown message type"):
        serde.decode_message(serde.dumps({"type": "os.system", "fields": {}}))
    with pytest.raises(SerdeError, match="expected"):
        serde.decode_message(good, expected=(FitIns,))


def test_unencodable_objects_are_refused() -> None:
    with pytest.raises(SerdeError, match="cannot encode"):
        serde.dumps({"f": object()})
    with pytest.raises(SerdeError, match="cannot be sent"):
        serde.dumps(torch.zeros(2, dtype=torch.complex64))


def test_subclasses_and_numpy_scalars_encode_as_their_plain_equivalents() -> None:
    """The encoder's fast path takes only the exact built-in types; every subclass and numpy scalar still goes
    through the general path and gives the same bytes as the plain value would."""
    import collections
    from enum import IntEnum

    class Name(str):
        pass

    class Level(IntEnum):
        HIGH = 3

    pair = collections.namedtuple("pair", "a b")
    fancy = collections.OrderedDict(k=Name("v"), n=np.int64(7), f=np.float32(0.5), p=pair(1, b"x"), e=Level.HIGH,
                                    big=2**70, t=(True, None, 1.5), u=collections.UserDict({"z": [np.int16(-2)]}))
    plain = {"k": "v", "n": 7, "f": 0.5, "p": [1, b"x"], "e": 3, "big": 2**70, "t": [True, None, 1.5],
             "u": {"z": [-2]}}
    assert serde.dumps(fancy) == serde.dumps(plain)
    assert serde.loads(serde.dumps(fancy)) == plain
    with pytest.raises(SerdeError, match="map keys must be strings"):
        serde.dumps(collections.OrderedDict({1: 2}))
    with pytest.raises(SerdeError, match="cannot encode set"):
        serde.dumps({"s": {1}})
