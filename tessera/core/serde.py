"""Wire and disk format: a msgpack header followed by raw little-endian tensor buffers. Never pickle.

Layout of one encoded blob::

    b"TSR1" | u32 little-endian header length | msgpack header | tensor bytes ...

The header is plain msgpack (maps, lists, str, bytes, int, float, bool, None). A tensor is replaced in the header
by ``{"$t": [dtype, shape, offset, nbytes]}``; its bytes follow the header. Integers outside int64 (numpy RNG
states hold 128-bit integers) travel as ``{"$i": "decimal"}``. Decoding checks the magic, every dtype against an
allowlist, that shape and byte count agree, that buffers lie inside the blob, and the total size limit, so a
pickle, a truncated buffer or a forged header raises SerdeError before any tensor is built.

Messages are frozen dataclasses registered with ``@message``; ``encode_message`` / ``decode_message`` add the
type name and check the fields against the dataclass on the way back.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgpack
import numpy as np
import torch

from tessera.core.errors import SerdeError

MAGIC = b"TSR1"
DEFAULT_MAX_BYTES = 2 * 1024**3  # 2 GiB; parties configure lower limits for the network
_INT64 = (-(2**63), 2**63 - 1)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("tessera's wire format assumes a little-endian host")


def _encode_obj(obj: Any, buffers: list[bytes], offset: list[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        if t.dtype not in _NAMES:
            raise SerdeError(f"tensor dtype {t.dtype} cannot be sent; cast to one of {sorted(_DTYPES)}")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        desc = [_NAMES[t.dtype], list(t.shape), offset[0], len(raw)]
        buffers.append(raw)
        offset[0] += len(raw)
        return {"$t": desc}
    if isinstance(obj, np.ndarray):
        return _encode_obj(torch.from_numpy(np.ascontiguousarray(obj)), buffers, offset)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, bytes, float)):
        return obj
    if isinstance(obj, (int, np.integer)):
        i = int(obj)
        return i if _INT64[0] <= i <= _INT64[1] else {"$i": str(i)}
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str) or k.startswith("$"):
                raise SerdeError(f"map keys must be strings not starting with '$', got {k!r}")
            out[k] = _encode_obj(v, buffers, offset)
        return out
    if isinstance(obj, (list, tuple)):
        return [_encode_obj(v, buffers, offset) for v in obj]
    raise SerdeError(f"cannot encode {type(obj).__name__}; only tensors, arrays, maps, lists and scalars travel")


def dumps(obj: Any) -> bytes:
    """Encode a tree of maps/lists/scalars/tensors into one blob."""
    buffers: list[bytes] = []
    header = msgpack.packb(_encode_obj(obj, buffers, [0]), use_bin_type=True)
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *buffers])


class _Decoder:
    def __init__(self, body: memoryview) -> None:
        self.body = body

    def tensor(self, desc: Any) -> torch.Tensor:
        if not (isinstance(desc, list) and len(desc) == 4):
            raise SerdeError("malformed tensor descriptor")
        dtype_name, shape, off, nbytes = desc
        dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise SerdeError(f"tensor dtype {dtype_name!r} is not allowed")
        if not (isinstance(shape, list) and all(isinstance(s, int) and 0 <= s < 2**40 for s in shape)):
            raise SerdeError(f"tensor shape {shape!r} is invalid")
        if not (isinstance(off, int) and isinstance(nbytes, int) and off >= 0 and nbytes >= 0):
            raise SerdeError("tensor offset/size invalid")
        numel = 1
        for s in shape:
            numel *= s
        itemsize = dtype.itemsize
        if numel * itemsize != nbytes:
            raise SerdeError(f"tensor header says {dtype_name}{shape} ({numel * itemsize} bytes) but carries {nbytes}")
        if off + nbytes > len(self.body):
            raise SerdeError("tensor buffer is truncated")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        raw = bytearray(self.body[off : off + nbytes])
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)

    def obj(self, h: Any) -> Any:
        if isinstance(h, dict):
            if "$t" in h:
                return self.tensor(h["$t"])
            if "$i" in h:
                try:
                    return int(h["$i"])
                except (TypeError, ValueError) as exc:
                    raise SerdeError("malformed big integer") from exc
            return {k: self.obj(v) for k, v in h.items()}
        if isinstance(h, list):
            return [self.obj(v) for v in h]
        return h


def loads(data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Decode a blob written by `dumps`, validating everything before building tensors."""
    view = memoryview(data)
    if len(view) > max_bytes:
        raise SerdeError(f"message of {len(view)} bytes exceeds the limit of {max_bytes}; raise max_message_bytes")
    if len(view) < 8 or bytes(view[:4]) != MAGIC:
        hint = " (this looks like a pickle, which tessera never loads)" if bytes(view[:1]) == b"\x80" else ""
        raise SerdeError(f"not a tessera message: bad magic{hint}")
    (hlen,) = struct.unpack("<I", view[4:8])
    if 8 + hlen > len(view):
        raise SerdeError("header is truncated")
    try:
        header = msgpack.unpackb(
            view[8 : 8 + hlen], raw=False, strict_map_key=True, max_bin_len=max_bytes, max_str_len=max_bytes
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise SerdeError(f"header is not valid msgpack: {type(exc).__name__}") from exc
    return _Decoder(view[8 + hlen :]).obj(header)


# ---------------------------------------------------------------------------------------------------- messages
_REGISTRY: dict[str, type] = {}
M = TypeVar("M")


def message(cls: type[M]) -> type[M]:
    """Class decorator: register a frozen dataclass as a wire message (its class name is its type tag)."""
    if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} must be a frozen dataclass to be a message")
    if cls.__name__ in _REGISTRY and _REGISTRY[cls.__name__] is not cls:
        raise TypeError(f"message type {cls.__name__} registered twice")
    _REGISTRY[cls.__name__] = cls
    return cls


def encode_message(msg: Any) -> bytes:
    name = type(msg).__name__
    if not dataclasses.is_dataclass(msg) or isinstance(msg, type):
        raise SerdeError(f"{name} is not a message instance")
    if _REGISTRY.get(name) is not type(msg):
        raise SerdeError(f"{name} is not a registered message type")
    fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
    return dumps({"type": name, "fields": fields})


def decode_message(data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES,
                   expected: tuple[type, ...] | None = None) -> Any:
    env = loads(data, max_bytes=max_bytes)
    if not (isinstance(env, dict) and set(env) == {"type", "fields"} and isinstance(env["fields"], dict)):
        raise SerdeError("not a message envelope")
    cls = _REGISTRY.get(env["type"]) if isinstance(env["type"], str) else None
    if cls is None:
        raise SerdeError(f"unknown message type {env['type']!r}")
    if expected is not None and cls not in expected:
        raise SerdeError(f"expected {[c.__name__ for c in expected]}, got {cls.__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    given = env["fields"]
    if set(given) != names:
        raise SerdeError(f"{cls.__name__}: fields {sorted(given)} do not match {sorted(names)}")
    for k, v in given.items():
        if not _conforms(v, hints[k]):
            raise SerdeError(f"{cls.__name__}.{k}: value of type {type(v).__name__} does not match {hints[k]}")
    values = {k: (tuple(v) if _is_tuple(hints[k]) else v) for k, v in given.items()}
    return cls(**values)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple


def _conforms(v: Any, tp: Any) -> bool:
    return _checker(tp)(v)


@functools.cache
def _checker(tp: Any) -> Callable[[Any], bool]:
    """A predicate for "v is a decoded value of type tp", built once per type (decoding is on every message's
    path, so the typing introspection must not be)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return lambda v: True
    if origin in (typing.Union, types.UnionType):
        alts = [_checker(a) for a in typing.get_args(tp)]
        return lambda v: any(c(v) for c in alts)
    if tp is type(None):
        return lambda v: v is None
    if tp is float:
        return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is int:
        return lambda v: isinstance(v, int) and not isinstance(v, bool)
    if isinstance(tp, type) and origin is None:
        return lambda v: isinstance(v, tp)
    args = typing.get_args(tp)
    if origin is dict:
        key, val = _checker(args[0]), _checker(args[1])
        return lambda v: isinstance(v, dict) and all(key(k) and val(x) for k, x in v.items())
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            items = [_checker(a) for a in args]
            return lambda v: (isinstance(v, list) and len(v) == len(items)
                              and all(c(x) for x, c in zip(v, items, strict=True)))
        each = _checker(args[0]) if args else (lambda v: True)
        return lambda v: isinstance(v, list) and all(each(x) for x in v)
    if isinstance(tp, typing.TypeAliasType if hasattr(typing, "TypeAliasType") else ()):  # pragma: no cover
        return _checker(tp.__value__)
    return lambda v: True


def registered_messages() -> dict[str, type]:
    return dict(_REGISTRY)


Encoder = Callable[[Any], bytes]
