"""Export cost: save_bundle + load_bundle vs torch.save + torch.load(weights_only=True), and hand-over throughput.

Model: MLP 1024-[2048, 2048]-10 (6.3M float32 parameters, 25 MB; --quick: 1024-[1024]-10, 4.2 MB). Baseline:
`torch.save(state_dict)` then `torch.load(weights_only=True)` into the same architecture (the usual safe way
without tessera). Tessera: `save_bundle` (hashing, reference outputs, manifest) then `load_bundle` (hash check,
safetensors, rebuild from the manifest) and `verify_bundle`. Hand-over: `send_bundle` over the InProcessBackend
(every chunk encoded/decoded like the wire) in 4 MiB chunks, raw and zstd, vs `shutil.copytree`.
Each cell is the median of `--repeats` runs. ratio = (save_bundle + load_bundle) / (torch.save + torch.load).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, report

from tessera.core.models import MLP
from tessera.export import BundleReceiver, load_bundle, save_bundle, send_bundle, verify_bundle
from tessera.runtime.backend import InProcessBackend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    hidden = [1024] if args.quick else [2048, 2048]
    repeats = 3 if args.quick else args.repeats
    model = MLP(1024, 10, hidden)
    x = torch.randn(8, 1024)
    mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
    tmp = Path(tempfile.mkdtemp(prefix="tessera-bench-export-"))
    try:
        counter = iter(range(10**6))

        def torch_save() -> None:
            torch.save(model.state_dict(), tmp / "model.pt")

        def torch_load() -> None:
            fresh = MLP(1024, 10, hidden)
            fresh.load_state_dict(torch.load(tmp / "model.pt", weights_only=True))

        def bundle_save() -> None:
            save_bundle(model, tmp / "bundle", example_inputs=x, overwrite=True)

        def bundle_load() -> None:
            load_bundle(tmp / "bundle")

        def send(compression: str | None) -> None:
            rx = BundleReceiver(tmp / "rx")
            send_bundle(InProcessBackend(rx), tmp / "bundle", to="s", name=f"b{next(counter)}",
                        compression=compression)

        def copy() -> None:
            shutil.copytree(tmp / "bundle", tmp / f"copy{next(counter)}")

        t_save, _ = best_of(torch_save, repeats)
        t_load, _ = best_of(torch_load, repeats)
        b_save, _ = best_of(bundle_save, repeats)
        b_load, _ = best_of(bundle_load, repeats)
        b_verify, _ = best_of(lambda: verify_bundle(tmp / "bundle"), repeats)
        t_copy, _ = best_of(copy, repeats)
        t_send, _ = best_of(lambda: send(None), repeats)
        t_zstd, _ = best_of(lambda: send("zstd"), repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        ("torch.save + torch.load(weights_only)", t_save + t_load, mb / (t_save + t_load)),
        ("save_bundle + load_bundle", b_save + b_load, mb / (b_save + b_load)),
        ("  save_bundle", b_save, mb / b_save),
        ("  load_bundle (hash check + rebuild)", b_load, mb / b_load),
        ("verify_bundle (hashes + rerun)", b_verify, mb / b_verify),
        ("copytree (baseline for hand-over)", t_copy, mb / t_copy),
        ("send_bundle, 4 MiB chunks", t_send, mb / t_send),
        ("send_bundle, 4 MiB chunks, zstd", t_zstd, mb / t_zstd),
    ]
    ratio = (b_save + b_load) / (t_save + t_load)
    report("export", ["operation", "seconds", "MB/s"], rows, ratio=ratio,
           ratio_means="(save_bundle + load_bundle) / (torch.save + torch.load(weights_only=True))",
           extra={"model_mb": mb, "repeats": repeats, "handover_vs_copy": t_send / t_copy})


if __name__ == "__main__":
    main()
