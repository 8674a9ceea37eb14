"""Stragglers and slow links: time to a target accuracy per scheduling policy, bytes to it per compression codec.

Digits, 10 IID clients (MLP 64-64-10, SGD lr 0.1, batch 16, 1 local epoch = 9 steps), each a gRPC client party
(loopback, mutual TLS, on its own thread of this process; `--transport inprocess`: the in-process backend's threads)
with an injected delay per local step drawn log-uniformly with a 10x spread (4-40 ms; `Pacing`).
Policies: synchronous FedAvg; deadline rounds (80 ms budget + 40 ms grace, FedNova, late updates folded with weight
(1 + s)^-1/2); FedBuff on the real clock (K = 5, all 10 clients training continuously). Time = the sum of the
server steps' wall seconds (training, aggregation and the server's held-out evaluation) until the held-out
accuracy first reaches the target.
Codecs (synchronous FedAvg, MLP 64-256-10, no delays): uncompressed float32, fp16, 8-bit and 4-bit stochastic
quantisation, top-1% with error feedback; bytes = bytes sent by the clients (uplink; the downlink model is not
compressed) until the target.
Columns: B/round = uplink bytes per round vs float32; s, steps, updates, MB up = to the target; B vs fp32 = uplink
bytes to the target vs uncompressed.
ratio = synchronous time / FedBuff time to the target (target >= 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report

from tessera.demos.pacing import CODECS, TRANSPORTS, run_codec, run_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--codec-target", type=float, default=0.90)
    ap.add_argument("--quick", action="store_true", help="fewer rounds (targets may not be reached)")
    ap.add_argument("--transport", choices=TRANSPORTS, default="grpc")
    args = ap.parse_args()
    scale = 0.4 if args.quick else 1.0
    tr = args.transport
    run_policy("synchronous", rounds=1, transport=tr)  # warm-up: threads, channels, first model builds
    steps = {"synchronous": 30, "deadline": 60, "fedbuff": 90}
    rows = []
    times: dict[str, float | None] = {}
    for policy, n in steps.items():
        c = run_policy(policy, rounds=max(2, int(n * scale)), transport=tr)
        t = c.first(args.target, "seconds")
        times[policy] = t
        k = c.first(args.target, "steps")
        rows.append([policy, "-", t if t is not None else "not reached", int(k) if k else "-",
                     c.updates[int(k) - 1] if k else "-", c.accuracy[-1], c.seconds[-1], "-", "-"])
    base_bytes: float | None = None
    base_rounds: float | None = None
    for codec in CODECS:
        c = run_codec(codec, rounds=max(2, int(25 * scale)), transport=tr)
        mb = c.first(args.codec_target, "mb_up")
        k = c.first(args.codec_target, "steps")
        per_round = c.mb_up[0]
        if codec == "none":
            base_bytes, base_rounds, base_round = mb, k, per_round
        rows.append([f"fedavg+{codec}", per_round / base_round, "-", int(k) if k else "not reached", "-",
                     c.accuracy[-1], c.seconds[-1], mb if mb is not None else "not reached",
                     (mb / base_bytes) if mb is not None and base_bytes else "-"])
    sync, fb = times["synchronous"], times["fedbuff"]
    ratio = sync / fb if sync and fb else 0.0
    report("pacing", ["run", "B/round", "s", "steps", "updates", "final acc", "total s", "MB up", "B vs fp32"], rows,
           ratio=ratio, ratio_means=f"synchronous / FedBuff wall seconds to {args.target:.0%} held-out accuracy "
                                    "(10 clients, 10x speed spread); target >= 2",
           extra={"target": args.target, "times": times, "base_rounds": base_rounds, "transport": tr})


if __name__ == "__main__":
    main()
