"""Reading a bundle's files safely: tar members, safetensors headers, and reference tensors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from tessera.core.errors import ExportError
from tessera.export.manifest import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE,
    is_simple_name,
    parse_manifest,
)

MAX_TAR_MEMBERS = 100_000
Inputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


@contextlib.contextmanager
def open_bundle(path: str | Path) -> Iterator[Path]:
    """Yield a directory holding the bundle: `path` itself, or a private copy of a .tar bundle's members.

    A tar is read as a stream checked against its own manifest before any byte lands on disk: only regular files
    with plain names (no links, devices, sparse files, absolute paths or `..`), each listed in the manifest (or
    the signature), no larger than the manifest says, and hashed while it is copied; a mismatch stops the copy.
    """
    p = Path(path)
    if p.is_dir():
        yield p
        return
    if not p.is_file():
        raise ExportError(f"bundle {p} does not exist; give the directory or .tar written by save_bundle")
    with open(p, "rb") as fh:
        head = fh.read(6)
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            raise ExportError(f"{p} is a {kind}-compressed file; tessera bundles are plain .tar files: decompress "
                              f"it first (`tar -xf {p.name}`, then pass the directory) or re-export to a .tar path")
    tmp = Path(tempfile.mkdtemp(prefix="tessera-bundle-"))
    try:
        try:
            with tarfile.open(p, "r:") as tar:
                _extract_checked(tar, tmp, where=p)
        except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as exc:
            raise ExportError(f"{p} is not a readable tessera .tar bundle ({type(exc).__name__}: {exc}); "
                              "re-export or re-transfer it") from None
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _members(tar: tarfile.TarFile, where: Path) -> dict[str, tarfile.TarInfo]:
    members: dict[str, tarfile.TarInfo] = {}
    for i, member in enumerate(tar):
        if i >= MAX_TAR_MEMBERS:
            raise ExportError(f"{where} has more than {MAX_TAR_MEMBERS} members; not a tessera bundle")
        name = member.name.removeprefix("./")
        if not (member.isreg() and not member.issparse() and is_simple_name(name)):
            raise ExportError(f"{where} holds member {member.name!r}, which is not a plain file; refusing "
                              "to unpack it (tessera bundles are flat)")
        if name in members:
            raise ExportError(f"{where} holds {name!r} twice; the bundle is corrupt or hostile")
        members[name] = member
    return members


def _extract_checked(tar: tarfile.TarFile, dest: Path, *, where: Path) -> None:
    members = _members(tar, where)
    if MANIFEST not in members:
        raise ExportError(f"{where} is not a tessera bundle: {MANIFEST} is missing; export with save_bundle")
    if members[MANIFEST].size > MAX_MANIFEST_BYTES:
        raise ExportError(f"{where}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes; not a tessera bundle")
    manifest_bytes = _read_member(tar, members[MANIFEST], MAX_MANIFEST_BYTES)
    manifest = parse_manifest(manifest_bytes, where=f"{where}:{MANIFEST}")
    listed = {e["file"]: e for e in manifest["files"]}
    for name, member in members.items():
        if name in (MANIFEST, SIGNATURE):
            continue
        entry = listed.get(name)
        if entry is None:
            raise ExportError(f"{where} holds {name!r}, which its manifest does not list; refusing to unpack it")
        if member.size != entry["bytes"]:
            raise ExportError(f"hash mismatch: {name} in {where} is {member.size} bytes, the manifest says "
                              f"{entry['bytes']}; re-export or re-transfer the bundle")
    (dest / MANIFEST).write_bytes(manifest_bytes)
    if SIGNATURE in members:
        (dest / SIGNATURE).write_bytes(_read_member(tar, members[SIGNATURE], MAX_SIGNATURE_BYTES))
    for name, entry in listed.items():
        if name not in members:
            raise ExportError(f"bundle file {name} is missing from {where}; re-export or re-transfer the bundle")
        _copy_hashed(tar, members[name], dest / name, entry, where=where)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if member.size > limit:
        raise ExportError(f"{member.name} is larger than {limit} bytes; not a tessera bundle")
    src = tar.extractfile(member)
    if src is None:
        raise ExportError(f"{member.name} is not a regular file")
    with src:
        return src.read(limit + 1)[:limit]


def _copy_hashed(tar: tarfile.TarFile, member: tarfile.TarInfo, dst: Path, entry: Mapping[str, Any], *,
                 where: Path) -> None:
    src = tar.extractfile(member)
    if src is None:
        raise ExportError(f"{member.name} is not a regular file")
    h = hashlib.sha256()
    written = 0
    with src, open(dst, "wb") as out:
        while chunk := src.read(min(1 << 20, int(entry["bytes"]) - written + 1)):
            written += len(chunk)
            if written > entry["bytes"]:
                break
            h.update(chunk)
            out.write(chunk)
    if written != entry["bytes"] or h.hexdigest() != entry["sha256"]:
        dst.unlink(missing_ok=True)
        raise ExportError(f"hash mismatch: {entry['file']} in {where} is not the file that was exported (changed "
                          "or truncated); refuse to load it and re-export or re-transfer the bundle")


def write_tar(src: Path, dest: Path) -> None:
    """Pack a bundle directory into an uncompressed, flat .tar: sorted members, no owner, mode or time.

    The same bundle directory always gives the same tar bytes (its sha256 is reproducible).
    """
    tmp = dest.with_name(f".{dest.name}.partial")
    with tarfile.open(tmp, "w:", format=tarfile.USTAR_FORMAT) as tar:
        for f in sorted(src.iterdir()):
            info = tarfile.TarInfo(f.name)
            info.size, info.mode, info.mtime = f.stat().st_size, 0o644, 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(f, "rb") as fh:
                tar.addfile(info, fh)
    tmp.replace(dest)


def check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file before handing it to a parser (pickles above all)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    size = path.stat().st_size
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise ExportError(f"{path.name} is a pickle / torch.save file, not safetensors; tessera never unpickles "
                          "weights. Export the model with save_bundle")
    if len(head) < 9 or struct.unpack("<Q", head[:8])[0] + 8 > size or head[8:9] != b"{":
        raise ExportError(f"{path.name} is not a safetensors file (bad header); re-export the bundle")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    check_safetensors(path)
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"{path.name} cannot be read as safetensors ({exc}); re-export the bundle") from None


def header_specs(path: Path) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, safetensors dtype string) from the header only, without reading any tensor."""
    check_safetensors(path)
    try:
        with safe_open(path, framework="pt") as fh:
            return {k: (list(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"{path.name} cannot be read as safetensors ({exc}); re-export the bundle") from None


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file deterministically: tensors in name order, header JSON with sorted keys.

    safetensors' own writer keeps `__metadata__` in a hash map whose order changes from process to process, so
    identical weights would hash differently; this writer gives identical bytes for identical tensors.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    blobs: list[torch.Tensor] = []
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ExportError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        blobs.append(t)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' writer pads it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for t in blobs:
            if t.numel():
                fh.write(t.reshape(-1).view(torch.uint8).numpy().data)  # no copy


# --------------------------------------------------------------------------------------- inputs and outputs
def split_inputs(example_inputs: Any) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """A tensor -> one positional arg; a tuple/list -> positional args; a dict -> keyword args."""
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = [example_inputs], {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = [], dict(example_inputs)
    elif isinstance(example_inputs, tuple | list):
        args, kwargs = list(example_inputs), {}
    else:
        raise ExportError("example_inputs must be a tensor, a tuple of tensors (positional) or a dict of tensors "
                          f"(keyword arguments, or one input per party), got {type(example_inputs).__name__}")
    for name, t in [*enumerate(args), *kwargs.items()]:
        if not isinstance(t, torch.Tensor):
            raise ExportError(f"example input {name!r} is a {type(t).__name__}; every input must be a tensor")
        if t.is_meta:
            raise ExportError("example inputs on the meta device carry no values; give real rows")
    # fresh, contiguous CPU copies, like the ones verify_bundle reruns (see unpack_reference)
    return [a.detach().to("cpu").clone() for a in args], {k: v.detach().to("cpu").clone() for k, v in kwargs.items()}


def flatten_outputs(out: Any, prefix: str = "output") -> dict[str, torch.Tensor]:
    """A model's output as named tensors: a tensor, tuples/lists (.0, .1) and mappings (.key), nested."""
    if isinstance(out, torch.Tensor):
        return {prefix: out}
    items: list[tuple[Any, Any]]
    if isinstance(out, Mapping):
        items = list(out.items())
    elif isinstance(out, tuple | list):
        items = list(enumerate(out))
    else:
        raise ExportError(f"model output {prefix} is a {type(out).__name__}; only tensors, tuples and dicts of "
                          "tensors can be checked")
    flat: dict[str, torch.Tensor] = {}
    for k, v in items:
        if v is not None:
            flat.update(flatten_outputs(v, f"{prefix}.{k}"))
    return flat


@torch.no_grad()
def run_model(model: torch.nn.Module, args: Sequence[torch.Tensor], kwargs: Mapping[str, torch.Tensor],
              *, float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Outputs of `model` in eval mode on inputs moved to its device (float inputs cast to `float_dtype`)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def prep(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        return t.to(float_dtype) if float_dtype is not None and t.is_floating_point() else t

    was_training = model.training
    model.eval()
    try:
        out = model(*[prep(a) for a in args], **{k: prep(v) for k, v in kwargs.items()})
    finally:
        model.train(was_training)
    return {k: v.detach().to("cpu") for k, v in flatten_outputs(out).items()}


def reference_tensors(args: Sequence[torch.Tensor], kwargs: Mapping[str, torch.Tensor],
                      outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ref = {f"input.args.{i}": a for i, a in enumerate(args)}
    ref.update({f"input.kwargs.{k}": v for k, v in kwargs.items()})
    ref.update(outputs)
    return ref


def unpack_reference(ref: Mapping[str, torch.Tensor], n_args: int, kw_names: Sequence[str]
                     ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    # Fresh copies: tensors read from a file may sit at addresses a SIMD kernel treats differently from a freshly
    # allocated one, which changes float32 sums in the last bit.
    try:
        args = [ref[f"input.args.{i}"].clone() for i in range(n_args)]
        kwargs = {k: ref[f"input.kwargs.{k}"].clone() for k in kw_names}
    except KeyError as exc:
        raise ExportError(f"reference file lacks input {exc}; the bundle is corrupt, re-export it") from None
    outputs = {k: v for k, v in ref.items() if k == "output" or k.startswith("output.")}
    return args, kwargs, outputs
