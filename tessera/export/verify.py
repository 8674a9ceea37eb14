"""verify_bundle: hashes, then rerun the reference inputs and compare with the stored outputs; inspect tables."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from tessera.core.errors import ExportError
from tessera.export.bundle import bundle_folder, load_verified
from tessera.export.io import load_tensors, open_bundle, run_model, unpack_reference
from tessera.export.manifest import REFERENCE, check_files, content_digest, read_manifest
from tessera.export.sign import Trust, verify_signature

ONNX_TOLERANCE = (1e-4, 1e-5)  # ONNX Runtime's kernels reorder float32 sums differently from PyTorch's


@dataclass(frozen=True)
class OutputCheck:
    """One output tensor rerun against the reference: the largest error and the bound it had to meet."""

    name: str
    runtime: str
    max_abs_error: float
    rtol: float
    atol: float
    exact: bool
    ok: bool


@dataclass(frozen=True)
class VerifyReport:
    """What verify_bundle checked. `ok` is True when every output is within tolerance."""

    path: str
    digest: str
    content_digest: str
    signer: str | None
    files_checked: int
    weights_dtype: str
    export_error: float
    checks: tuple[OutputCheck, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def exact(self) -> bool:
        return all(c.exact for c in self.checks if c.runtime == "torch")

    @property
    def max_abs_error(self) -> float:
        return max((c.max_abs_error for c in self.checks if c.runtime == "torch"), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "exact": self.exact, "max_abs_error": self.max_abs_error}


def compare(name: str, got: torch.Tensor, want: torch.Tensor, *, rtol: float, atol: float,
            runtime: str = "torch") -> OutputCheck:
    """Element-wise |got - want| <= atol + rtol * |want| (torch.isclose), computed in float64."""
    if tuple(got.shape) != tuple(want.shape):
        return OutputCheck(name, runtime, float("inf"), rtol, atol, False, False)
    if not want.is_floating_point():
        same = torch.equal(got, want)
        return OutputCheck(name, runtime, 0.0 if same else float("inf"), rtol, atol, same, same)
    g, w = got.double(), want.double()
    err = float((g - w).abs().max()) if w.numel() else 0.0
    ok = bool(torch.isclose(g, w, rtol=rtol, atol=atol).all())
    return OutputCheck(name, runtime, err, rtol, atol, torch.equal(got, want), ok)


def verify_bundle(path: str | Path, *, model: nn.Module | None = None, allow: Sequence[str] = (),
                  raise_on_mismatch: bool = True, trust: Any = None) -> VerifyReport:
    """Check every hash, rebuild (or load into `model`), rerun the reference inputs and compare the outputs.

    Raises ExportError on a hash mismatch, a malformed file, and (unless `raise_on_mismatch=False`) on outputs
    outside the recorded tolerance. Half-precision bundles compute in float32 against the float32 model's
    outputs, with the wider tolerance recorded at export. A model.onnx in the bundle is run with ONNX Runtime.
    With `trust` (an Ed25519 public key, a CA certificate or its path, or a `Trust`) the bundle must carry a
    signature that verifies against it; `report.signer` names who signed.
    """
    with open_bundle(path) as root:
        manifest = read_manifest(root)
        signer = verify_signature(root, manifest["manifest_sha256"], Trust.of(trust)) if trust is not None else None
        n = check_files(root, manifest)
        loaded = load_verified(root, manifest, model=model, map_location=torch.device("cpu"), allow=allow,
                               base_dir=bundle_folder(path))
        spec = manifest["inputs"]
        args, kwargs, want = unpack_reference(load_tensors(root / REFERENCE), len(spec["args"]), list(spec["kwargs"]))
        if set(want) != set(manifest["outputs"]):
            raise ExportError("reference outputs differ from the manifest's output list; the bundle is corrupt")
        tol = manifest["tolerance"]
        half = manifest["weights_dtype"] in ("float16", "bfloat16")
        if half:  # compute in float32 on a copy: the caller's model keeps its dtype
            loaded = (copy.deepcopy(loaded) if model is not None else loaded).float()
        got = run_model(loaded, args, kwargs, float_dtype=torch.float32 if half else None)
        checks = [_check(k, got, want[k], rtol=tol["rtol"], atol=tol["atol"]) for k in sorted(want)]
        if manifest.get("onnx"):
            from tessera.export.onnx_export import run_onnx

            onnx_out = run_onnx(root / manifest["onnx"]["file"], args, kwargs)
            rtol, atol = max(tol["rtol"], ONNX_TOLERANCE[0]), max(tol["atol"], ONNX_TOLERANCE[1])
            checks += [_check(k, onnx_out, want[k], rtol=rtol, atol=atol, runtime="onnxruntime") for k in sorted(want)]
    report = VerifyReport(str(path), manifest["manifest_sha256"], content_digest(manifest), signer, n,
                          manifest["weights_dtype"],
                          float(tol.get("export_error", 0.0)), tuple(checks))
    if raise_on_mismatch and not report.ok:
        bad = [f"{c.name} ({c.runtime}): max error {c.max_abs_error:.3g} > atol {c.atol:.3g} + rtol {c.rtol:.3g}"
               for c in report.checks if not c.ok]
        raise ExportError(f"outputs of {path} differ from its reference beyond tolerance: {'; '.join(bad)}. "
                          "The weights or the architecture changed since export; do not serve this bundle")
    return report


def _check(name: str, got: Mapping[str, torch.Tensor], want: torch.Tensor, *, rtol: float, atol: float,
           runtime: str = "torch") -> OutputCheck:
    if name not in got:
        return OutputCheck(name, runtime, float("inf"), rtol, atol, False, False)
    return compare(name, got[name], want, rtol=rtol, atol=atol, runtime=runtime)


# ------------------------------------------------------------------------------------------------ tables
def manifest_table(manifest: Mapping[str, Any], *, max_params: int = 12) -> list[Table]:
    """The manifest as rich tables: summary, files, parameters (first `max_params`)."""
    summary = Table(title="bundle", show_header=False)
    arch = manifest.get("arch") or {}
    prov = manifest.get("provenance") or {}
    n_params = sum(_numel(p["shape"]) for p in manifest.get("params", []))
    split = manifest.get("split") or {}
    rows = [
        ("format", f"{manifest.get('format')} v{manifest.get('format_version')}"),
        ("tessera / torch", f"{manifest.get('tessera_version')} / {manifest.get('torch_version')}"),
        ("architecture", str(arch.get("ref", "(not rebuildable: load with model=)"))),
        ("kwargs", str(arch.get("kwargs", ""))),
        ("parameters", f"{n_params:,} in {len(manifest.get('params', []))} tensors, {manifest.get('weights_dtype')}"),
        ("inputs", _inputs(manifest.get("inputs", {}))),
        ("outputs", ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in manifest.get("outputs", {}).items())),
        ("tolerance", "rtol {rtol:.3g}, atol {atol:.3g} ({basis}); export error {export_error:.3g}".format(
            **manifest.get("tolerance", {}))),
        ("split", f"{split.get('role')}: " + (f"label party {split.get('label_party')}, bases "
                                              f"{split.get('parties')}" if split.get("role") == "fused"
                                              else f"base of party {split.get('party')}") if split else "-"),
        ("strategy / rounds", f"{prov.get('strategy')} / {prov.get('rounds')}"),
        ("parties", ", ".join(prov.get("parties") or []) or "-"),
        ("epsilon", ", ".join(f"{k}: {v}" for k, v in (prov.get("epsilon") or {}).items()) or "-"),
        ("onnx", str((manifest.get("onnx") or {}).get("file", "-"))),
        ("digest", str(manifest.get("manifest_sha256"))),
        ("content digest", content_digest(manifest)),
    ]
    for k, v in rows:
        summary.add_row(k, v)
    files = Table(title="files")
    for col in ("file", "kind", "bytes", "sha256"):
        files.add_column(col)
    for f in manifest.get("files", []):
        files.add_row(f["file"], f["kind"], f"{f['bytes']:,}", f["sha256"][:16] + "…")
    params = Table(title=f"parameters (first {max_params})")
    for col in ("name", "shape", "dtype", "file"):
        params.add_column(col)
    for p in manifest.get("params", [])[:max_params]:
        params.add_row(p["name"], str(p["shape"]), p["dtype"], p["file"])
    return [summary, files, params]


def inspect_bundle(path: str | Path) -> list[Table]:
    """Tables describing a bundle (manifest self-hash checked; file hashes are verify_bundle's job)."""
    with open_bundle(path) as root:
        return manifest_table(read_manifest(root))


def report_table(report: VerifyReport) -> Table:
    table = Table(title=f"verify {report.path}: {'OK' if report.ok else 'FAILED'} ({report.files_checked} files "
                  f"hash-checked, weights {report.weights_dtype})")
    for col in ("output", "runtime", "max |error|", "atol", "rtol", "bit-exact", "ok"):
        table.add_column(col)
    for c in report.checks:
        table.add_row(c.name, c.runtime, f"{c.max_abs_error:.3g}", f"{c.atol:.3g}", f"{c.rtol:.3g}",
                      "yes" if c.exact else "no", "yes" if c.ok else "NO")
    return table


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _inputs(spec: Mapping[str, Any]) -> str:
    parts = [f"arg{i} {a['dtype']}{a['shape']}" for i, a in enumerate(spec.get("args", []))]
    parts += [f"{k}= {a['dtype']}{a['shape']}" for k, a in spec.get("kwargs", {}).items()]
    return ", ".join(parts)
