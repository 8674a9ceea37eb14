"""SecAgg+ and CKKS cost per round vs plain aggregation, by number of clients, model size and dropout rate.

Every protocol runs among in-process clients over the same wire path (InProcessBackend: each message encoded and
decoded as on a network), one process, clients one after another, so a "round" is the total compute of all
parties plus (de)serialisation; the network itself is not simulated, only counted (MB). Plain aggregation is:
every client sends its update as a FitRes, the server sums the survivors' updates.

    .venv/bin/python benchmarks/secagg_cost.py [--quick | --targets]

Rows "complete" use the complete graph (degree n - 1, classic SecAgg), the others the SecAgg+ degree chosen from
the dropout rate. `--targets` runs only issue 22's target rows: N=20 x 1M complete graph at 0% and 30% dropout
and 100 clients x 1M at 30% dropout.

Both sides run one untimed warm-up round first (thread pool, caches, first allocations). "x cpu" is the same
ratio in CPU seconds (all threads), steadier than wall time on a shared machine. "consist. s" is the wall time of
the consistency round (each survivor signs the survivor story; the server checks the signatures), the round that
the malicious-coordinator protection adds.

"floor s" is the plain round plus what the protocol's cryptography alone costs, measured in this process: during
the warm-up round the benchmark counts the masks expanded (the `masks` lists handed to prg.add_masks), the Ed25519
verifications and the X25519 agreements (wrappers around those functions, the library untouched); each primitive
is then timed alone: a mask of `params` words through add_masks, degree + 1 at once with fresh seeds as in a
client's call (so on the thread pool, key derivation included); one verify on one thread, and the thread pool's
speed-up on a batch of them; one agreement, HKDF included:
floor = plain s + masks x mask s + verifies x verify s / pool speed-up + agreements x agreement s.
"x plain floor" = floor / plain s is the best ratio this protocol can reach on this machine; "x floor" = round s /
floor says how close the implementation is to it (quantisation, serde, Python and the server's bookkeeping).

Headline: `ratio` = SecAgg+ / plain round time at 100 clients, 1M parameters, 30% dropout after masking
(--quick: 20 clients, 100k parameters, 30% dropout).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from common import best_of, report
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tessera.core.types import Params
from tessera.runtime.backend import InProcessBackend
from tessera.runtime.messages import FitIns, FitRes
from tessera.secagg import client as secagg_client
from tessera.secagg import crypto, pki, prg, run_round
from tessera.secagg import server as secagg_server
from tessera.secagg.ckks import simulate_ckks_round
from tessera.secagg.prg import PRG_NAME


class Updates(Sequence[Params]):
    """n deterministic random updates of `size` float32 values, built on demand (100 x 1M would be 400 MB)."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size
        self.first = self.make(0)  # run_round reads updates[0] for its shape: kept, not drawn again

    def __len__(self) -> int:
        return self.n

    def make(self, i: int) -> Params:
        g = torch.Generator().manual_seed(i)
        return {"w": torch.randn(self.size, generator=g) * 0.1}

    def __getitem__(self, i: Any) -> Any:
        return self.first if int(i) == 0 else self.make(int(i))


class _PlainClients:
    def __init__(self, updates: Updates, drop: set[str]) -> None:
        self.updates, self.drop = updates, drop

    def handle(self, client: str, msg: Any) -> Any:
        if client in self.drop:
            raise ConnectionError("client went offline")
        return FitRes(params=self.updates[int(client.removeprefix("client"))], num_examples=1)


def plain_round(updates: Updates, dropped: set[int]) -> tuple[float, int, float]:
    """Median of 5 after a warm-up round (it is short and noisy); bytes of one round; mean CPU seconds of one."""
    clients = [f"client{i}" for i in range(len(updates))]
    backend = InProcessBackend(_PlainClients(updates, {clients[i] for i in dropped}))

    def one() -> None:
        replies = backend.exchange({c: FitIns(round=1, params={}) for c in clients})
        total = torch.zeros(updates.size, dtype=torch.float64)
        for r in replies.values():
            if isinstance(r, FitRes):
                total += r.params["w"].double()

    one()  # warm-up
    up0, cpu0 = backend.traffic.up, time.process_time()
    seconds, _ = best_of(one, 5)
    return seconds, (backend.traffic.up - up0) // 5, (time.process_time() - cpu0) / 5


@dataclass
class Counts:
    """Cryptographic work done in one SecAgg+ round (all parties)."""

    masks: int = 0  # PRG expansions of a full vector
    verifies: int = 0  # Ed25519 signature checks
    agreements: int = 0  # X25519 scalar multiplications with a peer's key (agreements, key validity probes)


@contextmanager
def counting() -> Iterator[Counts]:
    """Count the round's masks, verifies and agreements by wrapping the functions the client and server call."""
    counts, lock = Counts(), threading.Lock()

    def counted(fn: Callable[..., Any], field: str, many: Callable[..., int]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with lock:  # verifies run on the thread pool
                setattr(counts, field, getattr(counts, field) + many(*args, **kwargs))
            return fn(*args, **kwargs)

        return wrapper

    patches = [(secagg_client, "add_masks", counted(prg.add_masks, "masks", lambda acc, masks, **_: len(masks))),
               (secagg_server, "add_masks", counted(prg.add_masks, "masks", lambda acc, masks, **_: len(masks))),
               (pki, "verify_ed25519", counted(pki.verify_ed25519, "verifies", lambda *_: 1)),
               (crypto, "agree_many", counted(crypto.agree_many, "agreements", lambda sk, peers, **_: len(peers))),
               (crypto, "valid_public", counted(crypto.valid_public, "agreements", lambda *_: 1))]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, fn in patches:
        setattr(module, name, fn)
    try:
        yield counts
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


@dataclass(frozen=True)
class Costs:
    """Seconds of each primitive alone, on this machine, in this process."""

    mask: float  # one mask of `params` words, amortised over degree + 1 through add_masks (the thread pool)
    verify: float  # one Ed25519 verify on one thread
    pool_speedup: float  # verifies per second on the thread pool / on one thread
    agreement: float  # one X25519 agreement + HKDF

    def totals(self, c: Counts) -> dict[str, float]:
        """Seconds of each kind of cryptographic work in a round with counts `c`."""
        return {"masks_total_s": c.masks * self.mask, "verifies_total_s": c.verifies * self.verify / self.pool_speedup,
                "agreements_total_s": c.agreements * self.agreement}

    def floor(self, plain: float, c: Counts) -> float:
        return plain + sum(self.totals(c).values())


def _median_seconds(fn: Callable[[], Any], repeats: int = 5) -> float:
    fn()
    return statistics.median(best_of(fn, repeats)[1])


@functools.cache
def primitive_costs(size: int, k: int) -> Costs:
    """`k`: masks per add_masks call (a client's: its own and one per neighbour)."""
    acc = np.zeros(size + 1, dtype=prg.word(32))

    def masks() -> None:  # fresh seeds each call: the per-mask key derivation (HKDF) is part of a mask's cost
        prg.add_masks(acc, [(os.urandom(32), (-1) ** i) for i in range(k)], bits=32, prg=PRG_NAME)

    mask = _median_seconds(masks) / k
    signer = Ed25519PrivateKey.generate()
    public = signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    msgs = [b"tessera-secagg statement %d " % i * 8 for i in range(64)]
    sigs = [signer.sign(m) for m in msgs]
    pairs = list(zip(msgs, sigs, strict=True))
    serial = _median_seconds(lambda: [pki.verify_ed25519(public, m, s) for m, s in pairs])
    pooled = _median_seconds(lambda: prg.parallel_map(lambda p: pki.verify_ed25519(public, *p), pairs))
    secret, _ = crypto.keypair()
    peers = {str(i): crypto.keypair()[1] for i in range(64)}
    agreement = _median_seconds(lambda: crypto.agree_many(secret, peers, info=crypto.MASK_INFO)) / len(peers)
    return Costs(mask=mask, verify=serial / len(pairs), pool_speedup=serial / pooled, agreement=agreement)


def secagg_round(updates: Updates, dropped: set[int], rate: float, *,
                 complete: bool = False) -> tuple[float, int, int, float, float, Counts]:
    """Round seconds (median of 5 like the plain round, where rounds are short: n x params <= 20M) after a
    warm-up round, bytes up, degree, the seconds of the consistency round (malicious-server protection), the
    round's mean CPU seconds (all threads), and the cryptographic work counted in the warm-up round."""
    repeats = 5 if len(updates) * updates.size <= 20_000_000 else 1
    reps = []

    def one() -> None:
        reps.append(run_round(updates, threshold=0.6, dropouts=dropped, clip=8.0, bits=32, seed=0,
                              dropout=max(rate, 0.05), degree=len(updates) - 1 if complete else None))

    with counting() as counts:  # the warm-up round (same seeds, so the same work as the timed ones)
        one()
    cpu0 = time.process_time()
    seconds, _ = best_of(one, repeats)
    rep = reps[-1]
    return (seconds, rep.bytes_up, rep.server.state.setup.degree, rep.server.seconds.get("consistency", 0.0),
            (time.process_time() - cpu0) / repeats, counts)


def ckks_round(updates: Updates, dropped: set[int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    _, _, backend = simulate_ckks_round(updates, dropouts=dropped)
    return time.perf_counter() - t0, backend.traffic.up


def cases(args: argparse.Namespace) -> list[tuple[int, int, float, bool]]:
    """(clients, params, dropout rate, complete graph) for each row."""
    if args.targets:
        return [(20, 1_000_000, 0.0, True), (20, 1_000_000, 0.3, True), (100, 1_000_000, 0.3, False)]
    clients = (5, 10, 20) if args.quick else (10, 50, 100)
    sizes = (10_000, 100_000) if args.quick else (100_000, 1_000_000)
    out = [(n, size, rate, False) for n in clients for size in sizes for rate in (0.0, 0.3)]
    if not args.quick:
        out[4:4] = [(20, 1_000_000, 0.0, True), (20, 1_000_000, 0.3, True)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--targets", action="store_true", help="only the N=20 complete-graph and 100 x 1M rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # dropouts are deliberate here
    ckks_max = (20, 10_000) if args.quick else (100, 100_000)  # CKKS rows up to this many clients / params
    head = (20, 100_000, 0.3) if args.quick else (100, 1_000_000, 0.3)
    first = 5 if args.quick else 10
    rows: list[list[Any]] = []
    floors: list[dict[str, Any]] = []
    headline = float("nan")
    for n, size, rate, complete in cases(args):
        updates = Updates(n, size)
        dropped = set(np.random.default_rng(n).choice(n, size=round(rate * n), replace=False).tolist())
        plain_s, plain_b, plain_cpu = plain_round(updates, dropped)
        sa_s, sa_b, degree, check_s, sa_cpu, counts = secagg_round(updates, dropped, rate, complete=complete)
        costs = primitive_costs(size, degree + 1)
        floor = costs.floor(plain_s, counts)
        row = ["secagg" + (" complete" if complete else ""), n, size, f"{rate:.0%}", degree, sa_s, plain_s,
               sa_s / plain_s, sa_cpu / plain_cpu, sa_b / n / 1e6, sa_b / plain_b, check_s, floor, floor / plain_s,
               sa_s / floor]
        rows.append(row)
        floors.append({"n": n, "params": size, "drop": rate, "complete": complete, **vars(counts),
                       **{f"{k}_s" if k != "pool_speedup" else k: v for k, v in vars(costs).items()},
                       **costs.totals(counts)})
        print(row, floors[-1], flush=True)
        if (n, size, rate) == head and not complete:
            headline = sa_s / plain_s
        ckks_row = (n <= ckks_max[0] and size <= ckks_max[1]) or (n == first and not args.quick)
        if ckks_row and not complete and not args.targets:
            ck_s, ck_b = ckks_round(updates, dropped)
            rows.append(["ckks", n, size, f"{rate:.0%}", "-", ck_s, plain_s, ck_s / plain_s, "-",
                         ck_b / n / 1e6, ck_b / plain_b, "-", "-", "-", "-"])
            print(rows[-1], flush=True)
    report("secagg_cost", ["proto", "n", "params", "drop", "deg", "round s", "plain s", "x time", "x cpu", "MB up/cl",
                           "x bytes", "consist. s", "floor s", "x plain floor", "x floor"], rows, ratio=headline,
           ratio_means=f"SecAgg+ / plain round time at {head[0]} clients, {head[1]:,} params, "
                       f"{head[2]:.0%} dropout after masking (one process, all parties' compute)",
           extra={"quick": args.quick, "targets": args.targets, "threshold": 0.6, "bits": 32, "clip": 8.0,
                  "prg": PRG_NAME, "floors": floors})


if __name__ == "__main__":
    main()
