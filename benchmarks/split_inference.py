"""Split inference throughput: predictions/s across 3 parties over loopback gRPC + mTLS (alice fuses and owns a
base; bob and carol are separate OS processes serving embeddings of their aligned rows, tessera.vertical.serve)
vs the exported composed model (save_bundle -> load_bundle) in one process, both at batch 1,024.

The model: per party 64 columns -> MLP 64-512-512-128, fuse concat(384) -> 256 -> 1. Predictions from both paths
are checked to be equal (torch.equal) before timing. ratio = split predictions/s / exported predictions/s
(target >= 0.5), against the exported model's best of 1 and 2 torch threads (on a busy shared machine OpenMP's
second thread can make it several times slower). Best of `repeats` timed passes over all rows.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from common import report
from torch import nn

PARTIES = ("alice", "bob", "carol")
COLS, BATCH = 64, 1024


def models() -> tuple[dict[str, nn.Module], nn.Module]:
    from tessera.vertical import ConcatFuse

    torch.manual_seed(0)
    bases: dict[str, nn.Module] = {p: nn.Sequential(nn.Linear(COLS, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                                    nn.Linear(512, 128)) for p in PARTIES}
    return bases, ConcatFuse(nn.Sequential(nn.Linear(384, 256), nn.ReLU(), nn.Linear(256, 1)))


def data(rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {p: torch.randn(rows, COLS, generator=g) for p in PARTIES}


def fed(certs: str, port: int) -> Any:
    from tessera.runtime.grpc.config import build

    parties = [{"name": "alice", "role": "coordinator", "address": f"127.0.0.1:{port}"}, {"name": "bob"},
               {"name": "carol"}]
    return build({"federation": {"ca_cert": "ca.crt", "certs_dir": ".", "chunk_bytes": 4 * 1024**2},
                  "parties": parties}, source="bench", base=Path(certs))


def owner(name: str, certs: str, port: int, rows: int) -> None:
    from tessera.vertical.serve import run_owner

    torch.set_num_threads(1)  # two owners share the two cores
    bases, _ = models()
    run_owner(fed(certs, port), name, bases[name], data(rows)[name], log_path=Path(certs) / f"{name}.jsonl",
              notify=lambda _: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--owner", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.owner:
        owner(args.owner[0], args.owner[1], int(args.owner[2]), int(args.owner[3]))
        return
    from tessera.export import load_bundle, save_bundle
    from tessera.runtime.grpc import GrpcBackend
    from tessera.runtime.grpc.certs import init_ca, issue
    from tessera.vertical import SplitModel
    from tessera.vertical.serve import SplitPredictor

    rows, repeats = (8 * BATCH, 1) if args.quick else (32 * BATCH, 3)
    bases, fuse = models()
    x = data(rows)
    order = torch.arange(rows)
    with tempfile.TemporaryDirectory() as tmp:
        save_bundle(SplitModel(bases, fuse, label_party="alice"), Path(tmp) / "b", party="alice", audit_log=False,
                    example_inputs={p: v[:4] for p, v in x.items()})
        exported = load_bundle(Path(tmp) / "b")

        def run_exported() -> torch.Tensor:
            with torch.inference_mode():
                return torch.cat([exported({p: v[order[i : i + BATCH]] for p, v in x.items()})
                                  for i in range(0, rows, BATCH)])

        init_ca(tmp)
        for p in PARTIES:
            issue(tmp, p)
        backend = GrpcBackend(fed(tmp, 0), {"bob": "bob", "carol": "carol"}, min_clients=2)
        port = backend.listen()
        procs = [subprocess.Popen([sys.executable, __file__, "--owner", p, tmp, str(port), str(rows)])
                 for p in ("bob", "carol")]
        predictor = SplitPredictor(fuse=fuse, order=list(PARTIES), backend=backend, me="alice",
                                   local_base=bases["alice"], local_x=x["alice"], timeout=120)
        try:
            if not torch.equal(predictor.predict(order, batch_size=BATCH), run_exported()):
                raise SystemExit("split inference differs from the exported model")
            t_split: list[float] = []
            t_exp: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(repeats):
                torch.set_num_threads(1)  # alice's base and the fuse; the owners use one thread each
                t0 = time.perf_counter()
                predictor.predict(order, batch_size=BATCH)
                t_split.append(time.perf_counter() - t0)
                for threads, samples in t_exp.items():  # the exported model gets its best thread count
                    torch.set_num_threads(threads)
                    t0 = time.perf_counter()
                    run_exported()
                    samples.append(time.perf_counter() - t0)
            logged = len((Path(tmp) / "bob.jsonl").read_text().splitlines()) if (Path(tmp) / "bob.jsonl").exists() \
                else 0
        finally:
            predictor.close()
            for proc in procs:
                proc.wait(60)
    best = min(min(v) for v in t_exp.values())
    split_rate, exp_rate = rows / min(t_split), rows / best
    rows_out = [*[[f"exported model, one process, {k} thread(s)", BATCH, min(v), rows / min(v)]
                  for k, v in t_exp.items()],
                ["3 parties over loopback gRPC + mTLS", BATCH, min(t_split), split_rate]]
    report("split_inference", ["path", "batch", "seconds", "predictions/s"], rows_out, ratio=split_rate / exp_rate,
           ratio_means="split predictions/s over gRPC / exported model predictions/s in one process (target >= 0.5)",
           extra={"rows": rows, "samples": {"split": t_split, "exported": t_exp}, "requests_logged_at_bob": logged})


if __name__ == "__main__":
    main()
