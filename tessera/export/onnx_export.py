"""ONNX export of a bundle's (fused) inference model, verified with ONNX Runtime before it is added.

Uses PyTorch's TorchScript-based exporter (``dynamo=False``): the torch.export-based default needs onnxscript,
which tessera does not pin. Models with data-dependent Python control flow may not trace; those raise
ExportError and the bundle stays PyTorch-only.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tessera.core.errors import ExportError
from tessera.export.io import flatten_outputs, load_tensors, unpack_reference
from tessera.export.manifest import REFERENCE, check_files, file_entry, read_manifest, write_manifest

ONNX_FILE = "model.onnx"
DEFAULT_OPSET = 17


class _Positional(nn.Module):
    """Adapts a model taking (args, kwargs) and returning nested outputs to flat positional in/out for tracing."""

    def __init__(self, model: nn.Module, n_args: int, kw_names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.n_args, self.kw_names = model, n_args, list(kw_names)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(*tensors[: self.n_args], **dict(zip(self.kw_names, tensors[self.n_args :], strict=True)))
        return tuple(flatten_outputs(out).values())


def input_names(n_args: int, kw_names: Sequence[str]) -> list[str]:
    return [f"input.args.{i}" for i in range(n_args)] + [f"input.kwargs.{k}" for k in kw_names]


def export_onnx(bundle: str | Path, *, opset: int = DEFAULT_OPSET, allow: Sequence[str] = (),
                base_dir: Path | None = None) -> dict[str, Any]:
    """Add model.onnx to a bundle directory, after checking ONNX Runtime reproduces the reference outputs.

    Returns the manifest's new "onnx" entry (file, opset, max_abs_error vs PyTorch). The model is exported in
    float32 with a dynamic batch dimension on every input.
    """
    from tessera.export.bundle import load_verified
    from tessera.export.verify import ONNX_TOLERANCE, compare

    root = Path(bundle)
    if not root.is_dir():
        raise ExportError(f"{root} is not a bundle directory; ONNX is added to a directory bundle (not a .tar)")
    manifest = read_manifest(root)
    check_files(root, manifest)
    model = load_verified(root, manifest, model=None, map_location=torch.device("cpu"), allow=allow,
                          base_dir=base_dir or root.resolve().parent).float()
    spec = manifest["inputs"]
    args, kwargs, _ = unpack_reference(load_tensors(root / REFERENCE), len(spec["args"]), list(spec["kwargs"]))
    inputs = tuple(args) + tuple(kwargs.values())
    wrapper = _Positional(model, len(args), list(kwargs)).eval()
    with torch.no_grad():
        torch_out = dict(zip(manifest["outputs"], wrapper(*[_f32(t) for t in inputs]), strict=True))
    names_in = input_names(len(args), list(kwargs))
    names_out = list(manifest["outputs"])
    tmp = root / f".{ONNX_FILE}.partial"
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter warns about its own deprecation; nothing else is silenced
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx(\.|$)")
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*",
                                    category=DeprecationWarning)
            torch.onnx.export(wrapper, tuple(_f32(t) for t in inputs), tmp, dynamo=False, opset_version=opset,
                              input_names=names_in, output_names=names_out,
                              dynamic_axes={n: {0: "batch"} for n in names_in + names_out})
    except Exception as exc:  # the tracer raises many unrelated types for unsupported code
        tmp.unlink(missing_ok=True)
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ExportError(f"this architecture cannot be exported to ONNX ({type(exc).__name__}: {first}); the "
                          "bundle stays PyTorch-only") from None
    tmp.replace(root / ONNX_FILE)
    got = run_onnx(root / ONNX_FILE, args, kwargs)
    rtol, atol = ONNX_TOLERANCE[0], ONNX_TOLERANCE[1] * max(1.0, *(float(t.abs().max()) for t in torch_out.values()
                                                                    if t.is_floating_point() and t.numel()))
    checks = [compare(k, got[k], torch_out[k], rtol=rtol, atol=atol, runtime="onnxruntime") for k in names_out]
    if not all(c.ok for c in checks):
        (root / ONNX_FILE).unlink()
        worst = max(c.max_abs_error for c in checks)
        raise ExportError(f"ONNX Runtime's outputs differ from PyTorch's by {worst:.3g} (> atol {atol:.3g}); the "
                          "ONNX file was not added")
    entry = {"file": ONNX_FILE, "opset": opset, "max_abs_error": max((c.max_abs_error for c in checks), default=0.0)}
    files = [f for f in manifest["files"] if f["file"] != ONNX_FILE] + [file_entry(root, ONNX_FILE, "onnx")]
    write_manifest(root, {**manifest, "files": files, "onnx": entry})
    return entry


def run_onnx(path: Path, args: Sequence[torch.Tensor], kwargs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Outputs of an exported model under ONNX Runtime (CPU), keyed like flatten_outputs."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - pinned in requirements
        raise ExportError("onnxruntime is not installed; pip install onnxruntime to check ONNX files") from exc
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    feed = {n: _f32(t).numpy() for n, t in zip(input_names(len(args), list(kwargs)),
                                                 [*args, *kwargs.values()], strict=True)}
    outs = sess.run(None, feed)
    return {o.name: torch.from_numpy(np.asarray(v)) for o, v in zip(sess.get_outputs(), outs, strict=True)}


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t
