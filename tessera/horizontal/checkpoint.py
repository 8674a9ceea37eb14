"""The coordinator's checkpoint on disk: `save_checkpoint` writes it, `load_checkpoint` is the one way to read it.

A model of at most `shard_bytes` of params is one `checkpoint.tsr` (serde, tensors written from their own memory).
A larger model's params go to safetensors shards of at most `shard_bytes` each beside it, and `checkpoint.tsr`
keeps the small state (round, history, strategy, extensions) with a manifest of the shards (file, size, every
tensor's dtype and shape) in place of the params. Every file is written to a temp file, fsynced and renamed;
the shards go first and `checkpoint.tsr` last, so writing it is the commit point: a crash before it leaves the
previous checkpoint (its own shards untouched, since each write's shards have fresh names) and stale shards are
deleted only after it. Tensors are written piecewise from their own memory: a checkpoint never holds the model
twice. Reading validates before it builds: a missing, truncated or foreign shard, or one whose tensors differ
from the manifest, is a ConfigError naming the file.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from tessera.core import serde
from tessera.core.errors import ConfigError, SerdeError
from tessera.core.io import atomic_write_parts, read_into

CHECKPOINT = "checkpoint.tsr"
SHARD_BYTES = 1 << 30  # params above this are written as safetensors shards of at most this size
SHARDS_KEY = "params_shards"
_PREFIX = "checkpoint-"
_ST: dict[torch.dtype, str] = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                               torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
                               torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_FIX = "move the checkpoint away and start a fresh output_dir, or resume from an untouched copy"


def save_checkpoint(folder: str | os.PathLike[str], state: Mapping[str, Any], *,
                    shard_bytes: int | None = None) -> Path:
    """Write `state` (the Server's state_dict) into `folder` atomically; returns the checkpoint.tsr path.
    `shard_bytes`: None for SHARD_BYTES."""
    folder = Path(folder)
    shard_bytes = SHARD_BYTES if shard_bytes is None else shard_bytes
    if shard_bytes < 1:
        raise ConfigError(f"shard_bytes must be positive, got {shard_bytes}")
    params: Mapping[str, torch.Tensor] = state["params"]
    small = dict(state)
    keep: set[str] = set()
    if sum(_nbytes(t) for t in params.values()) > shard_bytes:
        tag = f"r{int(state['round']):06d}-{secrets.token_hex(4)}"
        groups = _groups(params, shard_bytes)
        manifest = []
        for i, names in enumerate(groups):
            name = f"{_PREFIX}{tag}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            parts = _safetensors_parts({k: params[k] for k in names})
            atomic_write_parts(folder / name, parts)
            manifest.append({"file": name, "bytes": serde.parts_size(parts),
                             "tensors": {k: [_ST[params[k].dtype], list(params[k].shape)] for k in names}})
            keep.add(name)
        small.update(params={}, **{SHARDS_KEY: manifest})
    path = folder / CHECKPOINT
    atomic_write_parts(path, serde.encode_parts(small))  # the commit point
    _fsync_dir(folder)
    for stale in folder.glob(f"{_PREFIX}*.safetensors"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The state in a checkpoint (`path`: the checkpoint.tsr file or the folder holding it), params included
    whether they are inside it or in shards beside it. Anything unreadable is a ConfigError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: no checkpoint was written there")
    try:
        state = serde.loads(read_into(path), take=True)  # tensors are views over the one buffer read: one copy
    except SerdeError as exc:
        raise ConfigError(f"{path} is not a valid checkpoint ({exc}); {_FIX}") from None
    if isinstance(state, dict) and SHARDS_KEY in state:
        state["params"] = _read_shards(path.parent, state.pop(SHARDS_KEY), source=str(path))
    return state  # type: ignore[no-any-return]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _groups(params: Mapping[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Tensor names in order, cut into shards of at most `limit` bytes (a larger tensor is a shard of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for k, t in params.items():
        if groups[-1] and size + _nbytes(t) > limit:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += _nbytes(t)
    return groups


def _safetensors_parts(tensors: Mapping[str, torch.Tensor]) -> serde.Parts:
    """A safetensors file as buffers: the header, then views of each tensor's own memory (no copy)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    views: serde.Parts = []
    offset = 0
    for k, t in tensors.items():
        if t.dtype not in _ST:
            raise ConfigError(f"checkpoint: parameter {k!r} has dtype {t.dtype}, which safetensors shards do not "
                              f"hold; keep params in one of {sorted(str(d) for d in _ST)}")
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        n = _nbytes(flat)
        header[k] = {"dtype": _ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        if n:
            views.append(flat.view(torch.uint8).numpy().data)
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return [struct.pack("<Q", len(blob)) + blob, *views]


def _read_shards(folder: Path, manifest: Any, *, source: str) -> dict[str, torch.Tensor]:
    if not (isinstance(manifest, list) and all(isinstance(m, dict) and isinstance(m.get("file"), str)
                                               and isinstance(m.get("tensors"), dict) for m in manifest)):
        raise ConfigError(f"{source}: its shard manifest is malformed; {_FIX}")
    params: dict[str, torch.Tensor] = {}
    for entry in manifest:
        shard = folder / Path(entry["file"]).name  # a manifest never points outside the folder
        if not shard.is_file():
            raise ConfigError(f"{shard} is missing: {source} needs it for the params; restore it or {_FIX}")
        size = shard.stat().st_size
        if size != entry.get("bytes"):
            raise ConfigError(f"{shard} is truncated or was replaced ({size} bytes, the checkpoint wrote "
                              f"{entry.get('bytes')}); restore it or {_FIX}")
        try:
            with safe_open(str(shard), framework="pt") as fh:
                found = set(fh.keys())
                if found != set(entry["tensors"]):
                    raise ConfigError(f"{shard} holds tensors {sorted(found ^ set(entry['tensors']))} other than "
                                      f"{source}'s manifest says; restore it or {_FIX}")
                for k, (dtype, shape) in entry["tensors"].items():
                    t = fh.get_tensor(k)
                    if _ST.get(t.dtype) != dtype or list(t.shape) != list(shape):
                        raise ConfigError(f"{shard}: {k!r} is {t.dtype} {list(t.shape)} but {source}'s manifest "
                                          f"says {dtype} {list(shape)}; restore it or {_FIX}")
                    params[k] = t
        except SafetensorError as exc:
            raise ConfigError(f"{shard} is not a valid safetensors shard ({exc}); restore it or {_FIX}") from None
    return params


def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
