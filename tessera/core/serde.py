"""Wire and disk format: a msgpack header followed by raw little-endian tensor buffers. Never pickle.

Layout of one encoded blob::

    b"TSR2" | u32 little-endian header length | msgpack header | zero padding to 64 | tensor bytes ...

The header is plain msgpack (maps, lists, str, bytes, int, float, bool, None). A tensor is replaced in the header
by ``{"$t": [dtype, shape, offset, nbytes]}``; its bytes follow the header, each buffer starting on a 64-byte
boundary of the body so a receiver can use it in place. Integers outside int64 (numpy RNG states hold 128-bit
integers) travel as ``{"$i": "decimal"}``. Blobs written before alignment (``TSR1``: no padding) still decode.

Decoding treats the bytes as hostile: the header may nest at most `MAX_DEPTH` levels (checked while walking, so a
600-deep message is a SerdeError, never a RecursionError); tensor buffers must appear in header order, disjoint and
inside the blob with no trailing bytes, so the tensors decoded never add up to more than the message; dtypes are
checked exactly (a bool tensor carries only bytes 0 and 1); anything else raises SerdeError.

Encoding gives a list of buffers (`encode_parts`): the envelope, then memoryviews of the tensors themselves, so a
writer or a transport sends them piecewise without first copying the whole message into one `bytes`. Decoding
with ``take=True`` builds tensors as views over a writable buffer the caller hands over (the transport's reassembly
buffer): the payload is then copied once, from the network into that buffer, and never again.

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
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

import msgpack
import numpy as np
import torch

from tessera.core.errors import SerdeError, TesseraError

MAGIC = b"TSR2"
LEGACY_MAGIC = b"TSR1"  # unaligned layout of earlier checkpoints; read, never written
ALIGN = 64
MAX_DEPTH = 32  # maps/lists (and tensor descriptors) inside each other; real messages use about 8
MAX_DIMS = 32
DEFAULT_MAX_BYTES: int | None = None  # in memory the blob's own length bounds everything; transports set limits
_INT64 = (-(2**63), 2**63 - 1)
_SCALARS = (str, bytes, int, float, bool, type(None))

Parts: TypeAlias = list[bytes | memoryview]
"""An encoded blob as consecutive buffers: write or send them in order, or ``b"".join`` them."""

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


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _Encoder:
    def __init__(self) -> None:
        self.buffers: list[tuple[int, memoryview]] = []
        self.cursor = 0

    def tensor(self, obj: torch.Tensor) -> dict[str, Any]:
        t = obj.detach().to("cpu").contiguous()
        if t.dtype not in _NAMES:
            raise SerdeError(f"tensor dtype {t.dtype} cannot be sent; cast to one of {sorted(_DTYPES)}")
        nbytes = t.numel() * t.element_size()
        off = _align(self.cursor) if nbytes else self.cursor
        if nbytes:
            self.buffers.append((off, t.reshape(-1).view(torch.uint8).numpy().data))
            self.cursor = off + nbytes
        return {"$t": [_NAMES[t.dtype], list(t.shape), off, nbytes]}

    def obj(self, obj: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise SerdeError(f"value nested deeper than {MAX_DEPTH} levels cannot be sent; flatten it")
        t = type(obj)  # the exact built-in types first (most values of a message), then the isinstance chain
        if t is bytes or t is str or t is float or t is bool or obj is None:
            return obj
        if t is dict or (t is not list and t is not tuple and isinstance(obj, Mapping)):
            out = {}
            for k, v in obj.items():
                if not isinstance(k, str) or k.startswith("$"):
                    raise SerdeError(f"map keys must be strings not starting with '$', got {k!r}")
                out[k] = self.obj(v, depth + 1)
            return out
        if isinstance(obj, (list, tuple)):
            return [self.obj(v, depth + 1) for v in obj]
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj)
        if isinstance(obj, np.ndarray):
            return self.tensor(torch.from_numpy(np.ascontiguousarray(obj)))
        if isinstance(obj, (bool, str, bytes, float)):  # their subclasses
            return obj
        if isinstance(obj, (int, np.integer)):
            i = int(obj)
            return i if _INT64[0] <= i <= _INT64[1] else {"$i": str(i)}
        if isinstance(obj, np.floating):
            return float(obj)
        raise SerdeError(f"cannot encode {type(obj).__name__}; only tensors, arrays, maps, lists and scalars travel")


def encode_parts(obj: Any) -> Parts:
    """Encode a tree of maps/lists/scalars/tensors as buffers: the envelope, then views of the tensors' own
    memory (no copy; do not change the tensors until the parts are written or sent)."""
    enc = _Encoder()
    header = msgpack.packb(enc.obj(obj, 1), use_bin_type=True)
    prefix = 8 + len(header)
    parts: Parts = [MAGIC + struct.pack("<I", len(header)) + header + bytes(_align(prefix) - prefix)]
    cursor = 0
    for off, view in enc.buffers:
        if off > cursor:
            parts.append(bytes(off - cursor))
        parts.append(view)
        cursor = off + len(view)
    return parts


def parts_size(parts: Sequence[bytes | memoryview]) -> int:
    return sum(len(p) for p in parts)


def dumps(obj: Any) -> bytes:
    """Encode a tree of maps/lists/scalars/tensors into one blob."""
    return b"".join(encode_parts(obj))


class _Decoder:
    """Walks a decoded header, building tensors from the body; every check runs before any tensor exists."""

    def __init__(self, body: memoryview, *, take: bool, borrow: bool = False) -> None:
        self.body = body
        self.take = take and not body.readonly
        self.borrow = borrow  # tensors view `body` even when it is read-only (see `loads`)
        self.cursor = 0  # buffers must follow each other in header order: disjoint, in bounds, nothing unread

    def tensor(self, desc: Any) -> torch.Tensor:
        if not (type(desc) is list and len(desc) == 4):
            raise SerdeError("malformed tensor descriptor")
        dtype_name, shape, off, nbytes = desc
        dtype = _DTYPES.get(dtype_name) if type(dtype_name) is str else None
        if dtype is None:
            raise SerdeError(f"tensor dtype {dtype_name!r} is not allowed")
        if not (type(shape) is list and len(shape) <= MAX_DIMS
                and all(type(s) is int and 0 <= s < 2**40 for s in shape)):
            raise SerdeError(f"tensor shape {shape!r} is invalid")
        if not (type(off) is int and type(nbytes) is int and off >= 0 and nbytes >= 0):
            raise SerdeError("tensor offset/size invalid")
        numel = 1
        for s in shape:
            numel *= s
        if numel * dtype.itemsize != nbytes:
            raise SerdeError(f"tensor header says {dtype_name}{shape} ({numel * dtype.itemsize} bytes) "
                             f"but carries {nbytes}")
        if not self.cursor <= off < self.cursor + ALIGN:
            raise SerdeError("tensor buffers overlap or are out of order; the message was forged or corrupted")
        if off + nbytes > len(self.body):
            raise SerdeError("tensor buffer is truncated")
        self.cursor = off + nbytes
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        raw = self.body[off : off + nbytes]
        if dtype is torch.bool and int(np.frombuffer(raw, dtype=np.uint8).max()) > 1:
            raise SerdeError("bool tensor holds bytes other than 0 and 1")
        if self.take or self.borrow:
            with warnings.catch_warnings():  # borrow: torch warns that it cannot mark the view read-only
                warnings.simplefilter("ignore", UserWarning)
                u8 = torch.frombuffer(raw, dtype=torch.uint8)
        else:
            u8 = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if u8.data_ptr() % dtype.itemsize:  # a view must be aligned for its dtype; copy the rare one that is not
            u8 = u8.clone()
        return u8.view(dtype).reshape(shape)

    def obj(self, h: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise SerdeError(f"message nested deeper than {MAX_DEPTH} levels")
        if type(h) is dict:
            if "$t" in h or "$i" in h:
                return self.marker(h, depth)
            out = {}
            for k, v in h.items():
                if type(k) is not str or k.startswith("$"):
                    raise SerdeError("map keys must be strings not starting with '$'")
                out[k] = self.obj(v, depth + 1)
            return out
        if type(h) is list:
            return [self.obj(v, depth + 1) for v in h]
        if isinstance(h, _SCALARS):
            return h
        raise SerdeError(f"unexpected {type(h).__name__} in the header")

    def marker(self, h: dict[Any, Any], depth: int) -> Any:
        if len(h) != 1:
            raise SerdeError("a tensor or big-integer marker must be the only key of its map")
        if "$t" in h:
            if depth + 1 > MAX_DEPTH:
                raise SerdeError(f"message nested deeper than {MAX_DEPTH} levels")
            return self.tensor(h["$t"])
        text = h["$i"]
        if not (type(text) is str and 0 < len(text) <= 64 and text.lstrip("-").isdigit() and text.isascii()):
            raise SerdeError("malformed big integer")
        return int(text)


def loads(data: bytes | bytearray | memoryview, *, max_bytes: int | None = DEFAULT_MAX_BYTES,
          take: bool = False, borrow: bool = False) -> Any:
    """Decode a blob written by `dumps`, validating everything before building tensors.

    `take=True` hands a writable buffer (a bytearray) over to the result: tensors are views into it, so the caller
    must not reuse it. Read-only data (bytes) is copied, once per tensor, unless `borrow=True`: then tensors view
    it too, and torch cannot stop a write to them, so the caller must pass them on only as `FrozenTensor`s
    (`runtime.handover.hand_over(..., frozen=True)`), which refuse writes (used for a Ray object store's pages)."""
    try:
        view = memoryview(data).cast("B")
    except (TypeError, ValueError) as exc:
        raise SerdeError("a message must be a contiguous byte buffer") from exc
    if max_bytes is not None and len(view) > max_bytes:
        raise SerdeError(f"message of {len(view)} bytes exceeds the limit of {max_bytes}; raise max_message_bytes")
    magic = bytes(view[:4])
    if len(view) < 8 or magic not in (MAGIC, LEGACY_MAGIC):
        hint = " (this looks like a pickle, which tessera never loads)" if bytes(view[:1]) == b"\x80" else ""
        raise SerdeError(f"not a tessera message: bad magic{hint}")
    (hlen,) = struct.unpack("<I", view[4:8])
    start = 8 + hlen if magic == LEGACY_MAGIC else _align(8 + hlen)
    if start > len(view):
        raise SerdeError("header is truncated")
    try:
        header = msgpack.unpackb(view[8 : 8 + hlen], raw=False, strict_map_key=True, max_bin_len=len(view),
                                 max_str_len=len(view), timestamp=0, ext_hook=_no_ext)
    except Exception as exc:  # msgpack raises several unrelated types
        raise SerdeError(f"header is not valid msgpack: {type(exc).__name__}") from exc
    dec = _Decoder(view[start:], take=take, borrow=borrow)
    try:
        out = dec.obj(header, 1)
    except TesseraError:
        raise
    except Exception as exc:  # a backstop: the checks above are meant to leave nothing for it
        raise SerdeError(f"malformed message: {type(exc).__name__}") from exc
    if dec.cursor != len(dec.body):
        raise SerdeError(f"{len(dec.body) - dec.cursor} bytes follow the last tensor; the message was forged or "
                         "corrupted")
    return out


def _no_ext(code: int, data: bytes) -> Any:
    raise SerdeError(f"msgpack extension type {code} is not allowed")


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


def message_envelope(msg: Any) -> dict[str, Any]:
    """The tree `encode_message` encodes for a registered message: its type name and fields."""
    name = type(msg).__name__
    if not dataclasses.is_dataclass(msg) or isinstance(msg, type):
        raise SerdeError(f"{name} is not a message instance")
    if _REGISTRY.get(name) is not type(msg):
        raise SerdeError(f"{name} is not a registered message type")
    return {"type": name, "fields": {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}}


def encode_message_parts(msg: Any) -> Parts:
    """`encode_message` as buffers (see `encode_parts`)."""
    return encode_parts(message_envelope(msg))


def encode_message(msg: Any) -> bytes:
    return b"".join(encode_message_parts(msg))


def decode_message(data: bytes | bytearray | memoryview, *, max_bytes: int | None = DEFAULT_MAX_BYTES,
                   expected: tuple[type, ...] | None = None, take: bool = False, borrow: bool = False) -> Any:
    """Decode and type-check one message; raises only SerdeError (or the message's own TesseraError). `take`,
    `borrow`: see `loads`."""
    env = loads(data, max_bytes=max_bytes, take=take, borrow=borrow)
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
    try:
        return cls(**values)
    except TesseraError:
        raise
    except Exception as exc:  # a message's own __post_init__ refusing the values
        raise SerdeError(f"{cls.__name__}: {type(exc).__name__}: {str(exc)[:200]}") from exc


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
