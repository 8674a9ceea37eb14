"""PSI time vs set size: tessera.vertical.psi.intersect between two parties with 50% overlap, in one process
(the in-process backend encodes every message as on the wire).

Cost is 4 X25519 scalar multiplications per ID pair (each side blinds its own set and the other's), so time
should grow linearly with the set size. ratio = time(10k x 10k) / time(1k x 1k) (linear scaling: ~10).
`--full` adds 100k x 100k with both cores (workers=2), the issue's target being <= 10 s on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, report

from tessera.vertical.psi import intersect


def sets(n: int) -> dict[str, list[str]]:
    return {"alice": [f"user-{i}" for i in range(n)], "bob": [f"user-{i}" for i in range(n // 2, n + n // 2)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true", help="also 100k x 100k on 2 worker processes")
    args = ap.parse_args()
    sizes = [(1_000, 1), (10_000, 1)] + ([(100_000, 2)] if args.full else [])
    times: dict[int, float] = {}
    rows = []
    for n, workers in sizes:
        ids = sets(n)
        out = intersect(ids)
        if len(out["alice"]) != n - n // 2:
            raise SystemExit("PSI returned the wrong intersection size")
        t, _ = best_of(lambda ids=ids, w=workers: intersect(ids, workers=w), 1 if args.quick or n > 10_000 else 3)
        times[n] = t
        rows.append([f"{n:,} x {n:,}", workers, n - n // 2, t, 4 * n / t])
    report("psi", ["sets", "workers", "intersection", "seconds", "scalar mults/s"], rows,
           ratio=times[10_000] / times[1_000], ratio_means="PSI time at 10k x 10k / time at 1k x 1k (linear = 10)")


if __name__ == "__main__":
    main()
