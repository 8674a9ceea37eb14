"""Model export: bundles (safetensors shards + manifest.json), loading without pickle, verification, hand-over.

>>> from tessera.export import save_bundle, load_bundle, verify_bundle
>>> save_bundle(model, "bundle", example_inputs=x[:8])
>>> served = load_bundle("bundle", map_location="cpu")
>>> verify_bundle("bundle").ok
True
"""

from __future__ import annotations

from tessera.export.arch import Rebuildable, record_init
from tessera.export.audit import read_audit_log
from tessera.export.bundle import load_bundle, save_bundle
from tessera.export.handover import BundleReceiver, TransferReport, send_bundle
from tessera.export.manifest import Provenance
from tessera.export.onnx_export import export_onnx
from tessera.export.sign import SigningKey, Trust
from tessera.export.split import SplitInference, fused_model
from tessera.export.verify import VerifyReport, inspect_bundle, verify_bundle

__all__ = [
    "BundleReceiver",
    "Provenance",
    "Rebuildable",
    "SigningKey",
    "SplitInference",
    "TransferReport",
    "Trust",
    "VerifyReport",
    "export_onnx",
    "fused_model",
    "inspect_bundle",
    "load_bundle",
    "read_audit_log",
    "record_init",
    "save_bundle",
    "send_bundle",
    "verify_bundle",
]
