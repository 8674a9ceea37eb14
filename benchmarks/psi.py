"""PSI time vs set size: tessera.vertical.psi between two parties with 50% overlap (the smaller set inside the
larger one when they differ).

Cost is 2 X25519 scalar multiplications per ID of either party (each side blinds its own set and the other's),
so time grows linearly with |A| + |B|. ratio = time(10k x 10k) / time(1k x 1k) (linear scaling: ~10).
Each case runs in a fresh process so its peak RSS is its own; `cpu s` is the CPU time of that process and its
curve workers (the machine is shared: on 2 idle cores the wall time is about cpu s / 2).

--full adds, on 2 worker processes per party: 100k x 100k, 1M x 1M in one process (in-process backend: every
message encoded as on the wire), 1M x 1M over loopback gRPC + mTLS (the party in a thread of the same process),
and the unbalanced 10k x 1M. Targets (issue 18): 100k x 100k <= 8 s, 1M x 1M <= 80 s, peak RSS <= 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report


def sets(a: int, b: int) -> dict[str, list[str]]:
    start = a // 2 if a == b else 0
    return {"alice": [f"user-{i}" for i in range(a)], "bob": [f"user-{i}" for i in range(start, start + b)]}


def _grpc(ids: dict[str, list[str]], workers: int) -> int:
    from tessera.runtime.grpc import ClientParty, GrpcBackend
    from tessera.runtime.grpc.certs import init_ca, issue
    from tessera.runtime.grpc.config import build
    from tessera.vertical.psi import PsiParty, lead

    with tempfile.TemporaryDirectory() as certs:
        init_ca(certs)
        for name in ("server", "bob"):
            issue(certs, name)

        def fed(port: int) -> Any:
            parties = [{"name": "server", "role": "coordinator", "address": f"127.0.0.1:{port}"}, {"name": "bob"}]
            return build({"federation": {"ca_cert": "ca.crt", "certs_dir": ".", "chunk_bytes": 4 * 1024**2},
                          "parties": parties}, source="bench", base=Path(certs))

        backend = GrpcBackend(fed(0), {"bob": "bob"})
        port = backend.listen()
        party = ClientParty(fed(port), "bob", PsiParty("bob", ids["bob"], workers=workers))
        thread = threading.Thread(target=party.run, daemon=True)
        thread.start()
        try:
            backend.start(["bob"])
            rows = lead(ids["alice"], backend, ["bob"], workers=workers)
        finally:
            backend.close()
            thread.join(30)
    return len(rows)


def _peak_mib(pid: int) -> float:
    """A live process's peak RSS (VmHWM); RUSAGE_CHILDREN would count the parent's pages copied at fork."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one(a: int, b: int, mode: str, workers: int) -> dict[str, Any]:
    """Run one case in this process and return its figures."""
    from tessera.vertical import psi_curve
    from tessera.vertical.psi import intersect

    ids = sets(a, b)
    want = len(set(ids["alice"]) & set(ids["bob"]))
    t0, c0 = time.perf_counter(), time.process_time()
    got = _grpc(ids, workers) if mode == "grpc" else len(intersect(ids, workers=workers)["alice"])
    wall = time.perf_counter() - t0
    worker_rss = max([_peak_mib(p.pid) for pool in psi_curve._POOLS.values() for p in pool.procs], default=0.0)
    psi_curve.shutdown()  # the workers exit, so their CPU time is counted below
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - c0 + kids.ru_utime + kids.ru_stime
    if got != want:
        raise SystemExit(f"PSI returned {got} rows, the intersection has {want}")
    return {"seconds": wall, "cpu_seconds": cpu, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_rss_mib": worker_rss, "intersection": got}


def run_case(a: int, b: int, mode: str, workers: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--one", str(a), str(b), mode, str(workers)], check=True,
                         capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true", help="also 100k, 1M x 1M (in-process and gRPC) and 10k x 1M")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        a, b, mode, w = args.one
        print(json.dumps(one(int(a), int(b), mode, int(w))))
        return
    small = [(1_000, 1_000, "in-process", 1), (10_000, 10_000, "in-process", 1)]
    big = [(100_000, 100_000, "in-process", 2), (1_000_000, 1_000_000, "in-process", 2),
           (1_000_000, 1_000_000, "grpc", 2), (10_000, 1_000_000, "in-process", 2)]
    repeats = 1 if args.quick else 3
    results: dict[tuple[int, int, str, int], list[dict[str, Any]]] = {}
    for _ in range(repeats):  # interleaved; the fastest run of each case is kept (contention only adds time)
        for case in small:
            results.setdefault(case, []).append(run_case(*case))
    for case in big if args.full else []:
        results[case] = [run_case(*case)]
    rows = []
    for (a, b, mode, w), runs in results.items():
        r = min(runs, key=lambda x: x["seconds"])
        rows.append([f"{a:,} x {b:,}", mode, w, r["intersection"], r["seconds"], r["cpu_seconds"],
                     2 * (a + b) / r["seconds"], r["rss_mib"], r["worker_rss_mib"]])
    t = {(a, b, m): min(x["seconds"] for x in runs) for (a, b, m, _), runs in results.items()}
    report("psi", ["sets", "backend", "workers", "intersection", "seconds", "cpu s", "scalar mults/s",
                   "peak RSS MiB", "worker RSS MiB"], rows,
           ratio=t[(10_000, 10_000, "in-process")] / t[(1_000, 1_000, "in-process")],
           ratio_means="PSI time at 10k x 10k / time at 1k x 1k (linear = 10)",
           extra={"samples": {f"{k[0]}x{k[1]} {k[2]}": v for k, v in results.items()}})


if __name__ == "__main__":
    main()
