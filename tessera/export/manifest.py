"""manifest.json: what a bundle holds, how to rebuild it, and the hashes that make tampering visible.

The manifest is plain JSON (never pickle). It ends with ``manifest_sha256``, the SHA-256 of the canonical JSON
of every other key, so a changed byte in the manifest is refused just like a changed byte in a shard. This is
integrity, not authenticity: whoever can rewrite the whole bundle can recompute the hashes; hand the bundle
over on an authenticated channel (mTLS) or compare the digest out of band.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tessera.core.errors import ExportError

FORMAT = "tessera-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REFERENCE = "reference.safetensors"
SIGNATURE = "signature.json"  # beside the manifest, outside its hash: it signs the manifest's digest
MAX_MANIFEST_BYTES = 64 * 1024**2
MAX_SIGNATURE_BYTES = 64 * 1024
FILE_KINDS = ("weights", "reference", "onnx")
MAX_RANK = 16

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# (rtol, atol) by the dtype the weights are stored in. float32 reloads bit-exactly on the same machine; the slack
# covers another BLAS or thread count. Half precision rounds every weight (unit roundoff 2^-11 for float16, 2^-8
# for bfloat16), and the error grows through the layers, hence the wider bounds; atol scales with max |output|.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-9), "float32": (1.3e-6, 1e-5), "float16": (1e-2, 1e-2), "bfloat16": (5e-2, 5e-2),
}


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise ExportError(f"dtype {dtype} cannot be exported; cast the model to one of {sorted(DTYPES)}")
    return DTYPE_NAMES[dtype]


def parse_dtype(name: Any, *, what: str) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise ExportError(f"{what}: dtype {name!r} is not allowed; the manifest is corrupt or from a newer tessera")
    return DTYPES[name]


@dataclass(frozen=True)
class Provenance:
    """How the exported model was trained: strategy, rounds, parties and the privacy they spent.

    >>> Provenance.from_history(history, strategy="FedAvg", parties=["alice", "bob"])
    """

    strategy: str | None = None
    rounds: int | None = None
    parties: tuple[str, ...] = ()
    epsilon: dict[str, float] = field(default_factory=dict)
    delta: float | None = None
    secure_aggregation: str | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_history(cls, history: Any, *, strategy: str | None = None, parties: Sequence[str] = (),
                     secure_aggregation: str | None = None) -> Provenance:
        """Rounds and the last recorded epsilon per party from a `History` (or a list of round records)."""
        records = list(getattr(history, "records", history))
        last = records[-1] if records else {}
        eps = last.get("epsilon") or {}
        return cls(strategy=strategy, rounds=int(last["round"]) if "round" in last else len(records),
                   parties=tuple(parties), epsilon={str(k): float(v) for k, v in eps.items() if v is not None},
                   delta=last.get("dp_delta"), secure_aggregation=secure_aggregation)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["parties"] = list(self.parties)
        d["epsilon"] = {k: (v if math.isfinite(v) else None) for k, v in self.epsilon.items()}
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Provenance:
        eps = {str(k): (float(v) if v is not None else math.inf) for k, v in dict(d.get("epsilon") or {}).items()}
        return cls(strategy=d.get("strategy"), rounds=d.get("rounds"), parties=tuple(d.get("parties") or ()),
                   epsilon=eps, delta=d.get("delta"), secure_aggregation=d.get("secure_aggregation"),
                   notes={str(k): str(v) for k, v in dict(d.get("notes") or {}).items()})


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """Return `manifest` with its self-hash (over every other key) set."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return {**body, "manifest_sha256": hashlib.sha256(canonical(body)).hexdigest()}


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    from tessera.core.io import atomic_write_text

    sealed = seal(manifest)
    atomic_write_text(root / MANIFEST, json.dumps(sealed, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return sealed


def read_manifest(root: Path) -> dict[str, Any]:
    """Parse and check manifest.json: size, JSON, format, version, the self-hash and the structure."""
    path = root / MANIFEST
    if not path.is_file():
        raise ExportError(f"{root} is not a tessera bundle: {MANIFEST} is missing; export with save_bundle")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ExportError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; it is not a tessera manifest")
    return parse_manifest(path.read_bytes(), where=str(path))


def parse_manifest(data: bytes, *, where: str) -> dict[str, Any]:
    """`read_manifest` on bytes (a tar member read into memory): every check, nothing written to disk."""
    path = where
    if len(data) > MAX_MANIFEST_BYTES:
        raise ExportError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; it is not a tessera manifest")
    try:
        m = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ExportError(f"{path} is not valid JSON ({type(exc).__name__}); the bundle is corrupt, re-export "
                          "it") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ExportError(f"{path} is not a tessera bundle manifest (format != {FORMAT!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"bundle format version {m.get('format_version')!r} is not supported by this tessera "
                          f"(reads {FORMAT_VERSION}); upgrade tessera or re-export")
    try:
        sealed = seal(m).get("manifest_sha256")
    except (TypeError, ValueError) as exc:  # NaN, non-string keys: not what save_bundle writes
        raise ExportError(f"{path} is not canonical JSON ({exc}); the bundle is corrupt") from None
    if sealed != m.get("manifest_sha256"):
        raise ExportError(f"hash mismatch: {path} was modified after export; refuse to load it and re-export "
                          "or re-transfer the bundle")
    check_structure(m, where=path)
    return m


def _bad(where: str, what: str) -> ExportError:
    return ExportError(f"{where}: {what}; the manifest is corrupt or hostile, re-export the bundle")


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _tensor_spec(v: Any) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("shape"), list) and len(v["shape"]) <= MAX_RANK
            and all(_is_int(d) for d in v["shape"]) and isinstance(v.get("dtype"), str) and v["dtype"] in DTYPES)


def check_structure(m: Mapping[str, Any], *, where: str = MANIFEST) -> None:
    """Types and cross-references of every key the loader reads, so a hostile manifest fails here, not deeper.

    Files: plain, unique names of a known kind with a size and a sha256; one reference file; every parameter in a
    weights file; the ONNX entry (if any) names an `onnx` file of the hashed list.
    """
    files = m.get("files")
    if not isinstance(files, list) or not all(isinstance(e, dict) for e in files):
        raise _bad(where, "`files` is not a list of entries")
    names: dict[str, str] = {}
    for e in files:
        name = e.get("file")
        if not (isinstance(name, str) and is_simple_name(name) and name not in (MANIFEST, SIGNATURE)):
            raise _bad(where, f"file {name!r} is not a plain file name")
        if name in names or e.get("kind") not in FILE_KINDS or not _is_int(e.get("bytes")) or not (
                isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64
                and all(c in "0123456789abcdef" for c in e["sha256"])):
            raise _bad(where, f"entry for {name!r} is duplicated or lacks a kind, size or sha256")
        names[name] = e["kind"]
    if [n for n, k in names.items() if k == "reference"] != [REFERENCE]:
        raise _bad(where, f"the reference file must be {REFERENCE}, listed once")
    params = m.get("params")
    if not isinstance(params, list) or not all(
            isinstance(p, dict) and isinstance(p.get("name"), str) and _tensor_spec(p)
            and names.get(str(p.get("file"))) == "weights" for p in params):
        raise _bad(where, "`params` must list name, shape, dtype and a weights file for every tensor")
    if len({p["name"] for p in params}) != len(params):
        raise _bad(where, "`params` names a tensor twice")
    inputs, outputs = m.get("inputs"), m.get("outputs")
    if not (isinstance(inputs, dict) and isinstance(inputs.get("args"), list) and isinstance(inputs.get("kwargs"), dict)
            and all(_tensor_spec(v) for v in [*inputs["args"], *inputs["kwargs"].values()])
            and isinstance(outputs, dict) and all(_tensor_spec(v) for v in outputs.values())):
        raise _bad(where, "`inputs` / `outputs` are not tensor specs")
    tol = m.get("tolerance")
    if not (isinstance(tol, dict) and all(isinstance(tol.get(k), int | float) and not isinstance(tol.get(k), bool)
                                          and 0 <= tol[k] < math.inf for k in ("rtol", "atol", "export_error"))):
        raise _bad(where, "`tolerance` needs finite, non-negative rtol, atol and export_error")
    if not isinstance(m.get("weights_dtype"), str) or m["weights_dtype"] not in DTYPES \
            or not (m.get("arch") is None or isinstance(m.get("arch"), dict)):
        raise _bad(where, "`weights_dtype` or `arch` is malformed")
    if not (m.get("split") is None or isinstance(m.get("split"), dict)) or not isinstance(m.get("provenance"), dict):
        raise _bad(where, "`split` or `provenance` is malformed")
    onnx = m.get("onnx")
    if onnx is not None and not (isinstance(onnx, dict) and names.get(str(onnx.get("file"))) == "onnx"):
        raise _bad(where, "`onnx` must name a plain file of kind 'onnx' in the hashed file list")


def sha256_file(path: Path, *, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def content_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of what the model *is* (architecture, parameter specs, weight files), not of how it was trained.

    Identical weights exported from a simulated and a deployed run share it even when their provenance differs.
    """
    weights = sorted((e["file"], e["sha256"]) for e in manifest["files"] if e["kind"] == "weights")
    return hashlib.sha256(canonical({"arch": manifest.get("arch"), "params": manifest["params"],
                                     "weights": weights})).hexdigest()


def check_files(root: Path, manifest: Mapping[str, Any], *, kinds: Sequence[str] | None = None) -> int:
    """Check size and SHA-256 of every file the manifest lists (of the given kinds); returns how many."""
    n = 0
    for entry in manifest.get("files", []):
        if kinds is not None and entry.get("kind") not in kinds:
            continue
        name = entry.get("file")
        if not isinstance(name, str) or not is_simple_name(name):
            raise ExportError(f"manifest lists file {name!r}, which is not a plain file name; the bundle is corrupt")
        path = root / name
        if not path.is_file():
            raise ExportError(f"bundle file {name} is missing from {root}; re-export or re-transfer the bundle")
        if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            raise ExportError(f"hash mismatch: {name} in {root} is not the file that was exported (changed or "
                              "truncated); refuse to load it and re-export or re-transfer the bundle")
        n += 1
    return n


def file_entry(root: Path, name: str, kind: str) -> dict[str, Any]:
    path = root / name
    return {"file": name, "kind": kind, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def is_simple_name(name: str) -> bool:
    return bool(name) and not name.startswith(".") and all(c.isalnum() or c in "._-" for c in name)


def tolerance_for(dtype: str, *, max_abs_output: float) -> tuple[float, float]:
    """(rtol, atol) for outputs of a model whose weights are stored as `dtype`; atol scales with the outputs."""
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES["float32"])
    return rtol, atol * max(1.0, max_abs_output)
