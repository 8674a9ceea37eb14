"""save_bundle / load_bundle: a trained model as safetensors shards + manifest.json, rebuilt without pickle."""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tessera
from tessera.core.errors import ExportError
from tessera.core.logging import get_logger
from tessera.export import arch as archmod
from tessera.export import audit
from tessera.export.io import (
    Inputs,
    header_specs,
    load_tensors,
    open_bundle,
    reference_tensors,
    run_model,
    save_tensors,
    split_inputs,
    write_tar,
)
from tessera.export.manifest import (
    FORMAT,
    FORMAT_VERSION,
    REFERENCE,
    Provenance,
    check_files,
    content_digest,
    dtype_name,
    file_entry,
    parse_dtype,
    read_manifest,
    tolerance_for,
    write_manifest,
)
from tessera.export.sign import SigningKey, Trust, sign, verify_signature
from tessera.export.split import fused_model, split_parts

log = get_logger(__name__)
DEFAULT_SHARD_BYTES = 2 * 1024**3


def _unwrap(model: Any, party: str | None, provenance: Provenance | None
            ) -> tuple[nn.Module, Provenance | None, dict[str, Any] | None]:
    """The module to export, its provenance and split role, from a module, an FLModel or a split trainer."""
    parts = split_parts(model)
    if parts is not None:
        bases, fuse, label_party = parts
        if party is None:
            raise ExportError("exporting a split model needs party=<who asks>; only the label party "
                              f"{label_party!r} may export the fused inference model")
        model = fused_model(base_models=bases, fuse_model=fuse, label_party=label_party, party=party)
        if provenance is None:
            names = list(bases) + ([] if label_party in bases else [label_party])
            provenance = Provenance(strategy="split learning", parties=tuple(names))
    elif not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module):
        fl = model  # FLModel: the global model plus what the run knows about itself
        model = fl.model
        if provenance is None:
            provenance = Provenance(strategy=type(fl.strategy).__name__, rounds=getattr(fl, "rounds_done", None),
                                    parties=tuple(getattr(fl, "parties", ())))
    if not isinstance(model, nn.Module):
        raise ExportError(f"save_bundle exports an nn.Module, an FLModel or a split model, got {type(model).__name__}")
    composed = getattr(model, "bases", None)
    if isinstance(composed, nn.ModuleDict) and isinstance(getattr(model, "fuse", None), nn.Module) and \
            isinstance(getattr(model, "label_party", None), str):  # a composed split model
        label_party = str(model.label_party)
        if party is None:
            raise ExportError("exporting a split model needs party=<who asks>; only the label party "
                              f"{label_party!r} may export the fused inference model")
        model = fused_model(base_models=dict(composed.items()), fuse_model=model.fuse,  # type: ignore[arg-type]
                            label_party=label_party, party=party)
        return model, provenance, {"role": "fused", "label_party": label_party, "parties": model.parties}
    return model, provenance, ({"role": "base", "party": party} if party is not None else None)


def _shards(state: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def save_bundle(model: Any, path: str | Path, *, example_inputs: Inputs, party: str | None = None,
                provenance: Provenance | None = None, arch: str | None = None,
                kwargs: Mapping[str, Any] | None = None, rebuildable: bool = True, dtype: torch.dtype | None = None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, tolerance: tuple[float, float] | None = None,
                onnx: bool = False, overwrite: bool = False, sign_with: SigningKey | None = None,
                audit_log: str | Path | bool = True) -> Path:
    """Write `model` as a bundle directory (or a single file if `path` ends in .tar); returns `path`.

    `model` is an nn.Module, an FLModel (provenance filled in) or a split trainer with `base_models`,
    `fuse_model` and `label_party` (then `party` must be the label party). `example_inputs` (a tensor, a tuple
    of positional tensors, or a dict of keyword / per-party tensors) are run through the model and stored with
    its outputs as the reference `verify_bundle` checks. `dtype=torch.float16` stores half-precision weights;
    the tolerance then widens and the measured error is recorded. `onnx=True` adds a verified model.onnx.
    `sign_with` (an Ed25519 key or a party's certificate key, see `tessera.export.sign`) adds signature.json.
    The same weights, inputs and provenance give byte-identical files (no timestamps in the bundle); the export
    is recorded in `audit_log` (default: tessera-audit.jsonl beside the bundle; False: no record).

    >>> save_bundle(MLP(64, 10), "bundle", example_inputs=torch.randn(4, 64))
    """
    module, provenance, split = _unwrap(model, party, provenance)
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise ExportError(f"{dest} already exists; choose a new path or pass overwrite=True")
    if max_shard_bytes < 1:
        raise ExportError("max_shard_bytes must be positive")
    if any(t.is_meta for t in module.state_dict().values()):
        raise ExportError("the model has weights on the meta device (no values); load real weights first")
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ExportError(f"dtype={dtype} is not a floating dtype tessera exports to")
    spec = archmod.describe(module, arch=arch, kwargs=kwargs) if rebuildable else None
    if spec is not None:
        spec = archmod.relativize(spec, module, dest.parent)
    args, kw = split_inputs(example_inputs)
    outputs = run_model(module, args, kw)
    state = {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}
    stored = dtype or next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    max_out = max((float(o.abs().max()) for o in outputs.values() if o.is_floating_point() and o.numel()),
                  default=0.0)
    rtol, atol = tolerance or tolerance_for(dtype_name(stored), max_abs_output=max_out)
    export_error = _rounding_error(module, state, args, kw, outputs) if dtype is not None else 0.0
    if export_error > atol + rtol * max_out:
        raise ExportError(f"storing weights as {dtype} changes the outputs by up to {export_error:.3g}, more than "
                          f"the tolerance atol={atol:.3g} rtol={rtol:.3g}; export in float32 or pass tolerance=")
    if dest.exists():
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        shards = _shards(state, max_shard_bytes)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        params = []
        for name, shard in zip(names, shards, strict=True):
            save_tensors(shard, tmp / name)
            params += [{"name": k, "shape": list(t.shape), "dtype": dtype_name(t.dtype), "file": name}
                       for k, t in shard.items()]
        save_tensors(reference_tensors(args, kw, outputs), tmp / REFERENCE)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "tessera_version": tessera.__version__,
            "torch_version": torch.__version__.split("+")[0], "arch": spec, "params": params,
            "files": [file_entry(tmp, n, "weights") for n in names] + [file_entry(tmp, REFERENCE, "reference")],
            "weights_dtype": dtype_name(stored),
            "inputs": {"args": [_tspec(a) for a in args], "kwargs": {k: _tspec(v) for k, v in kw.items()}},
            "outputs": {k: _tspec(v) for k, v in outputs.items()},
            "tolerance": {"rtol": rtol, "atol": atol, "export_error": export_error,
                          "basis": "given" if tolerance else f"{dtype_name(stored)} weights"},
            "split": split, "provenance": (provenance or Provenance()).to_json(), "onnx": None,
        }
        sealed = write_manifest(tmp, manifest)
        if onnx:
            from tessera.export.onnx_export import export_onnx

            export_onnx(tmp, base_dir=dest.parent)
            sealed = read_manifest(tmp)
        signer = sign(tmp, sealed["manifest_sha256"], sign_with).get("signer") if sign_with is not None else None
        if dest.suffix == ".tar":
            write_tar(tmp, dest)
        else:
            tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    audit.append(audit.default_log(dest.parent, audit_log), "export", digest=sealed["manifest_sha256"],
                 bundle=dest.name, who=party or signer, content=content_digest(sealed), signed=sign_with is not None)
    log.info("exported bundle with %d tensors in %d shard(s)", len(state), len(names))
    return dest


def _tspec(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": dtype_name(t.dtype)}


def _rounding_error(module: nn.Module, state: Mapping[str, torch.Tensor], args: Sequence[torch.Tensor],
                    kw: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> float:
    """Max |output| change from storing the weights in reduced precision (computed in float32)."""
    rounded = copy.deepcopy(module).to("cpu").float()
    rounded.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    got = run_model(rounded, args, kw, float_dtype=torch.float32)
    return max((float((got[k].float() - outputs[k].float()).abs().max()) for k in outputs
                if outputs[k].is_floating_point() and outputs[k].numel()), default=0.0)


def load_bundle(path: str | Path, *, model: nn.Module | None = None, map_location: str | torch.device = "cpu",
                allow: Sequence[str] = (), trust: Any = None) -> nn.Module:
    """Load a bundle into `model` (strict: same names and shapes) or rebuild the module from the manifest.

    Every file's SHA-256 is checked first and weights are read only from safetensors (never pickle). A rebuilt
    model is placed on `map_location` ("cpu", "cuda:0", "mps", or "meta" for shapes without values) and keeps
    the stored dtype; a given `model` keeps its device (a model built on the meta device is materialised).
    Classes outside `tessera` and `torch.nn` must be listed in `allow` (module prefixes or exact refs).
    `trust` (an Ed25519 public key, a CA certificate or its path, or a `Trust`) requires a valid signature.
    """
    device = resolve_device(map_location)
    with open_bundle(path) as root:
        manifest = read_manifest(root)
        if trust is not None:
            verify_signature(root, manifest["manifest_sha256"], Trust.of(trust))
        check_files(root, manifest)
        return load_verified(root, manifest, model=model, map_location=device, allow=allow,
                             base_dir=bundle_folder(path))


def bundle_folder(path: str | Path) -> Path:
    """The folder holding a bundle: relative paths recorded in its manifest resolve against it."""
    return Path(path).resolve().parent


def resolve_device(map_location: str | torch.device) -> torch.device:
    """`map_location` as a device this machine has, or ExportError naming what it has instead."""
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError, ValueError):
        raise ExportError(f"map_location={map_location!r} is not a device; use 'cpu', 'cuda', 'cuda:N', 'mps' or "
                          "'meta'") from None
    if device.type in ("cpu", "meta"):
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ExportError(f"map_location={str(device)!r} but this machine has no CUDA device (torch sees none); "
                              "use map_location='cpu'")
        if device.index is not None and device.index >= count:
            raise ExportError(f"map_location={str(device)!r} but this machine has {count} CUDA device(s) "
                              f"(cuda:0..cuda:{count - 1}); pick one of those or 'cpu'")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ExportError("map_location='mps' needs Apple silicon with macOS and an MPS-enabled torch; this "
                              "machine has none; use map_location='cpu'")
        return device
    raise ExportError(f"map_location={str(device)!r}: tessera loads bundles on 'cpu', 'cuda[:N]', 'mps' or 'meta'")


def load_verified(root: Path, manifest: Mapping[str, Any], *, model: nn.Module | None, map_location: torch.device,
                  allow: Sequence[str], base_dir: Path | None = None) -> nn.Module:
    """The load itself, for a bundle whose manifest and file hashes were already checked."""
    expected = {p["name"]: (list(p["shape"]), parse_dtype(p["dtype"], what=p["name"])) for p in manifest["params"]}
    weights = sorted({e["file"] for e in manifest["files"] if e.get("kind") == "weights"})
    meta = map_location.type == "meta"
    if model is None:
        if manifest.get("arch") is None:
            raise ExportError("this bundle records no architecture (exported with rebuildable=False); load it "
                              "with load_bundle(path, model=YourModel(...))")
        # every architecture parameter is checked against its bounds and the weight shapes before anything is built
        archmod.check(manifest["arch"], allow, {k: v[0] for k, v in expected.items()}, base_dir=base_dir)
        state = _read_state(root, weights, expected, meta=meta)
        model = _rebuild(manifest["arch"], state, allow, meta=meta, base_dir=base_dir)
        return model.to(map_location).eval()
    state = _read_state(root, weights, expected, meta=meta)
    _check_against(model, expected)
    on_meta = any(t.is_meta for t in model.state_dict().values())
    if meta and not on_meta:
        return model  # shapes checked; a real model does not become shapes-only
    model.load_state_dict(state, strict=True, assign=on_meta)
    return model.eval()


def _read_state(root: Path, files: Sequence[str], expected: Mapping[str, tuple[list[int], torch.dtype]], *,
                meta: bool) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if meta:
            for k, (shape, _) in header_specs(root / f).items():
                state[k] = torch.empty(shape, dtype=expected[k][1] if k in expected else torch.float32,
                                       device="meta")
        else:
            state.update(load_tensors(root / f))
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state))[:5], sorted(set(state) - set(expected))[:5]
        raise ExportError(f"the weight files do not hold the tensors the manifest lists (missing {missing}, "
                          f"unexpected {extra}); the bundle is corrupt")
    for k, t in state.items():
        if list(t.shape) != expected[k][0] or t.dtype != expected[k][1]:
            raise ExportError(f"tensor {k!r} is {t.dtype} {list(t.shape)} but the manifest says "
                              f"{expected[k][1]} {expected[k][0]}; the bundle is corrupt")
    return state


def _check_against(model: nn.Module, expected: Mapping[str, tuple[list[int], torch.dtype]]) -> None:
    own = model.state_dict()
    missing, extra = [k for k in expected if k not in own], [k for k in own if k not in expected]
    if missing or extra:
        raise ExportError(f"the bundle does not fit {type(model).__name__}: the model lacks {missing[:5]} and has "
                          f"extra {extra[:5]}; build the model with the bundle's architecture")
    for k, t in own.items():
        if list(t.shape) != expected[k][0]:
            raise ExportError(f"the bundle does not fit {type(model).__name__}: {k!r} is {expected[k][0]} in the "
                              f"bundle but {list(t.shape)} in the model; build it with the bundle's kwargs")


def _rebuild(spec: Any, state: Mapping[str, torch.Tensor], allow: Sequence[str], *, meta: bool,
             base_dir: Path | None) -> nn.Module:
    # Build without allocating random weights, then take the loaded tensors; modules whose non-persistent
    # buffers (not in the bundle) would stay on meta are rebuilt normally, once their shapes were checked.
    try:
        with torch.device("meta"):
            model = archmod.build(spec, allow, base_dir=base_dir)
    except (RuntimeError, NotImplementedError):  # a constructor that computes with tensor values
        model = archmod.build(spec, allow, base_dir=base_dir)
    _check_against(model, {k: (list(v.shape), v.dtype) for k, v in state.items()})
    model.load_state_dict(state, strict=True, assign=True)
    if not meta and any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model = archmod.build(spec, allow, base_dir=base_dir)
        model.load_state_dict(state, strict=True, assign=True)
    return model
