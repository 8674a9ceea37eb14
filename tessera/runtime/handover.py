"""Handing a message to a party in the same process without encoding its tensors.

`hand_over(msg, frozen=...)` rebuilds the message's containers (a receiver can never change the sender's dicts or
lists) and passes every tensor as a detached, contiguous CPU tensor that shares the sender's memory: the same
values the wire would deliver, without the two copies of an encode and a decode. Tensors a coordinator sends down
are `FrozenTensor`s: views of the coordinator's storage that refuse in-place writes (`add_`, `t[0] = 1`,
`out=`, `.data = ...`), and whose `numpy()` arrays are read-only, so a client cannot change the global model
(it loads them into its own model with `copy_`, which reads them). Whatever a frozen tensor yields without sharing
its memory (`t * 2`, `t.clone()`) is a plain tensor again.

`wire_size(msg)` is the exact number of bytes the encoded message would take (the header is encoded with each
tensor's descriptor, computed from its dtype and shape; no tensor memory is touched), so traffic counts do not
depend on whether the wire was used. `hand_over_sized(msg, ...)` is both in one walk of the message (what the
in-process backend does with every message).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import numpy as np
import torch

from tessera.core.errors import ProtocolError, SerdeError
from tessera.core.serde import _DTYPES, _INT64, _NAMES, MAGIC, MAX_DEPTH, _align, _Encoder, message_envelope

_IN_PLACE_DUNDERS = frozenset({"__setitem__", "__set__", "__delitem__", "__iadd__", "__isub__", "__imul__",
                               "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__",
                               "__ixor__", "__ilshift__", "__irshift__", "__imatmul__"})
_ALLOWED = frozenset({"requires_grad_", "retain_grad", "share_memory_"})  # no change to the values


@functools.cache
def _writes(name: str) -> bool:
    if name in _ALLOWED:
        return False
    return name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))


class FrozenTensor(torch.Tensor):
    """A tensor that shares a sender's memory and refuses every in-place write (see module docstring)."""
    def __deepcopy__(self, memo: dict[int, Any]) -> torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return self.clone().as_subclass(torch.Tensor)

    @classmethod
    def __torch_function__(cls, func: Callable[..., Any], types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        # Runs for every op and attribute read on a received tensor (a client loading the global model reads each
        # tensor a few times): the common cases return early.
        name = getattr(func, "__name__", "")
        if kwargs:
            out = kwargs.get("out")
            writes = _writes(name) or kwargs.get("inplace") is True  # F.relu(t, inplace=True) and the like
        else:
            kwargs, out, writes = {}, None, _writes(name)
        if (writes and args and isinstance(args[0], FrozenTensor)) or (out is not None and _any_frozen(out)):
            raise ProtocolError(
                f"a received tensor is read-only (it is the sender's memory): '{name}' would change it; "
                "copy it first (t.clone()) or load it into your model with copy_")
        with torch._C.DisableTorchFunctionSubclass():
            ret = func(*args, **kwargs)
            if type(ret) is torch.Size or not isinstance(ret, (torch.Tensor, np.ndarray, list, tuple)):
                return ret  # a shape, a number, a dtype: nothing that could share memory
            if writes and args and ret is args[0] and type(ret) is torch.Tensor:
                return ret  # dst.copy_(frozen): the plain tensor written to, as it was
            ptrs = {a.untyped_storage().data_ptr() for a in _tensors(args, kwargs) if isinstance(a, FrozenTensor)}
            return _rewrap(ret, ptrs)


def _any_frozen(x: Any) -> bool:
    if isinstance(x, FrozenTensor):
        return True
    return isinstance(x, (list, tuple)) and any(isinstance(t, FrozenTensor) for t in x)


def _tensors(args: Any, kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    out = [a for a in args if isinstance(a, torch.Tensor)]
    for a in args:
        if isinstance(a, (list, tuple)):
            out += [t for t in a if isinstance(t, torch.Tensor)]
    return out + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]


def _rewrap(ret: Any, ptrs: set[int]) -> Any:
    """Results that share a frozen input's memory stay frozen; every other result is a plain tensor."""
    if isinstance(ret, torch.Tensor):
        shares = ret.device.type != "meta" and ret.untyped_storage().data_ptr() in ptrs
        if shares and not isinstance(ret, FrozenTensor):
            return ret.as_subclass(FrozenTensor)
        if not shares and isinstance(ret, FrozenTensor):
            return ret.as_subclass(torch.Tensor)
        return ret
    if isinstance(ret, np.ndarray) and ptrs:
        ret.flags.writeable = False
        return ret
    if isinstance(ret, (list, tuple)) and any(isinstance(r, torch.Tensor) for r in ret):
        return type(ret)(_rewrap(r, ptrs) for r in ret)
    return ret


def _tensor(t: torch.Tensor, frozen: bool, own: bool) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        plain = t.detach()  # what the wire delivers: CPU, contiguous, no autograd history
        if plain.device.type != "cpu" or not plain.is_contiguous():
            plain = plain.to("cpu").contiguous()
        if own and plain.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            plain = plain.clone()
    if frozen:
        return plain.as_subclass(FrozenTensor)
    return plain if type(plain) is torch.Tensor else plain.as_subclass(torch.Tensor)


_ATOMS = frozenset({int, float, str, bool, bytes, type(None)})


def _value(v: Any, frozen: bool, own: bool) -> Any:
    if type(v) in _ATOMS:  # most of a message's leaves; checked before the ABC isinstance below
        return v
    if isinstance(v, torch.Tensor):
        return _tensor(v, frozen, own)
    if type(v) is dict or isinstance(v, Mapping):
        return {k: _value(x, frozen, own) for k, x in v.items()}
    if isinstance(v, list):
        return [_value(x, frozen, own) for x in v]
    if isinstance(v, tuple):
        return tuple(_value(x, frozen, own) for x in v)
    if isinstance(v, bytearray):
        return bytes(v)
    return v


def hand_over(msg: Any, *, frozen: bool, own: bool = False) -> Any:
    """A copy of message `msg` whose containers are new and whose tensors share `msg`'s memory (frozen: read-only),
    or with `own=True` are copies (a reply the receiver keeps after the sender reuses its memory)."""
    cls = type(msg)
    return cls(**{name: _value(getattr(msg, name), frozen, own) for name in _field_names(cls)})


def _field_names(cls: type) -> tuple[str, ...]:
    """A message type's field names, found once (dataclasses.fields is slow per call)."""
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


_FIELDS: dict[type, tuple[str, ...]] = {}


class _Sizer(_Encoder):
    """The encoder's header walk with each tensor's descriptor from its dtype and shape alone (no buffer views)."""

    def tensor(self, obj: torch.Tensor) -> dict[str, Any]:
        name = _NAMES.get(obj.dtype)
        if name is None:
            raise SerdeError(f"tensor dtype {obj.dtype} cannot be sent; cast to one of {sorted(_DTYPES)}")
        nbytes = obj.numel() * obj.element_size()
        off = _align(self.cursor) if nbytes else self.cursor
        if nbytes:
            self.cursor = off + nbytes
        return {"$t": [name, list(obj.shape), off, nbytes]}


def wire_size(msg: Any) -> int:
    """Bytes of `encode_message(msg)`, without touching a tensor's memory (raises SerdeError where encoding
    would): the same header, padded to the alignment, then the tensors' bytes at their aligned offsets."""
    envelope = message_envelope(msg)
    sizer = _Sizer()
    with torch._C.DisableTorchFunctionSubclass():
        header = msgpack.packb(sizer.obj(envelope, 1), use_bin_type=True)
    return _align(len(MAGIC) + 4 + len(header)) + sizer.cursor


_ENVELOPED: set[type] = set()  # message types hand_over_sized has found registered (`message_envelope`)


class _SizedHandOver(_Sizer):
    """One walk of a message giving the receiver's copy (`hand_over`) and the header the encoder would write
    (`wire_size`). Containers, tensors and plain scalars take the fast path below; any other value (numpy arrays
    and scalars, subclasses of str or int, values the encoder refuses) goes through the two walks it replaces,
    so both results are theirs by construction (tests/runtime/test_wire_size.py checks both against the encoder)."""

    def __init__(self, frozen: bool, own: bool) -> None:
        super().__init__()
        self.frozen, self.own = frozen, own

    def walk(self, v: Any, depth: int) -> tuple[Any, Any]:
        """(the receiver's copy of `v`, `v`'s header node); called with torch functions of subclasses off."""
        if depth > MAX_DEPTH:
            return v, self.obj(v, depth)  # raises the encoder's SerdeError
        tv = type(v)
        if tv is str or tv is float or tv is bool or v is None or tv is bytes:
            return v, v
        if tv is int:
            return v, v if _INT64[0] <= v <= _INT64[1] else {"$i": str(v)}
        if tv is dict:
            copy: dict[Any, Any] = {}
            header: dict[str, Any] = {}
            for k, x in v.items():
                if type(k) is not str or k.startswith("$"):
                    return _value(v, self.frozen, self.own), self.obj(v, depth)  # raises the encoder's error
                copy[k], header[k] = self.walk(x, depth + 1)
            return copy, header
        if tv is list or tv is tuple:
            pairs = [self.walk(x, depth + 1) for x in v]
            return tv(c for c, _ in pairs), [h for _, h in pairs]
        if tv is torch.Tensor and not self.own and v.is_cpu and v.is_contiguous():  # _tensor and tensor, inline
            name = _NAMES.get(v.dtype)
            if name is not None:
                if self.frozen:  # a tensor outside autograd is its own detached alias: no detach() needed
                    t = (v.detach() if v.requires_grad else v).as_subclass(FrozenTensor)
                else:
                    t = v.detach()
                nbytes = v.numel() * v.element_size()
                off = self.cursor
                if nbytes:
                    off = self.cursor = _align(off)
                    self.cursor += nbytes
                return t, {"$t": [name, list(v.shape), off, nbytes]}
        if isinstance(v, torch.Tensor):
            t = _tensor(v, self.frozen, self.own)
            return t, self.tensor(t)
        return _value(v, self.frozen, self.own), self.obj(v, depth)


def hand_over_sized(msg: Any, *, frozen: bool, own: bool = False) -> tuple[Any, int]:
    """`(hand_over(msg, frozen=frozen, own=own), wire_size(msg))` in one walk of the message; raises SerdeError
    where `wire_size` would."""
    cls = type(msg)
    if cls not in _ENVELOPED:
        message_envelope(msg)  # refuses what is not a registered message instance (SerdeError)
        _ENVELOPED.add(cls)
    names = _field_names(cls)
    walker = _SizedHandOver(frozen, own)
    values: dict[str, Any] = {}
    header: dict[str, Any] = {}
    with torch._C.DisableTorchFunctionSubclass():
        for name in names:
            values[name], header[name] = walker.walk(getattr(msg, name), 3)
        packed = msgpack.packb({"type": cls.__name__, "fields": header}, use_bin_type=True)
    return cls(**values), _align(len(MAGIC) + 4 + len(packed)) + walker.cursor
