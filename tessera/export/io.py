"""Reading a bundle's files safely: tar members, safetensors headers, and reference tensors."""

from __future__ import annotations

import contextlib
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tessera.core.errors import ExportError
from tessera.export.manifest import is_simple_name

MAX_TAR_MEMBERS = 100_000
Inputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


@contextlib.contextmanager
def open_bundle(path: str | Path) -> Iterator[Path]:
    """Yield a directory holding the bundle: `path` itself, or a private copy of a .tar bundle's members.

    Only regular files with plain names are taken from a tar: no links, devices, absolute paths or `..`.
    """
    p = Path(path)
    if p.is_dir():
        yield p
        return
    if not p.is_file():
        raise ExportError(f"bundle {p} does not exist; give the directory or .tar written by save_bundle")
    if not tarfile.is_tarfile(p):
        raise ExportError(f"{p} is neither a bundle directory nor a .tar bundle")
    tmp = Path(tempfile.mkdtemp(prefix="tessera-bundle-"))
    try:
        with tarfile.open(p, "r:") as tar:
            for i, member in enumerate(tar):
                if i >= MAX_TAR_MEMBERS:
                    raise ExportError(f"{p} has more than {MAX_TAR_MEMBERS} members; not a tessera bundle")
                name = member.name.removeprefix("./")
                if not (member.isfile() and is_simple_name(name)):
                    raise ExportError(f"{p} holds member {member.name!r}, which is not a plain file; refusing "
                                      "to unpack it (tessera bundles are flat)")
                src = tar.extractfile(member)
                assert src is not None  # a regular file always has a stream
                with src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_tar(src: Path, dest: Path) -> None:
    """Pack a bundle directory into an uncompressed, flat .tar (members in sorted order)."""
    tmp = dest.with_name(f".{dest.name}.partial")
    with tarfile.open(tmp, "w:") as tar:
        for f in sorted(src.iterdir()):
            tar.add(f, arcname=f.name, recursive=False)
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


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path,
              metadata={"format": "pt", "writer": "tessera"})


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
