"""DP-SGD across rounds: tessera (DPSGD plugin, in-process FedAvg) vs Opacus alone on the same local work.

Realistic work, so a few percent of overhead is measurable: 5 clients (IID digits, ~360 examples each), 5 rounds
of `--epochs` (3) local DP-SGD epochs (Poisson sampling, sigma=1.0, C=1.0, batch 32) on an MLP 64-512-512-10
(301,066 parameters), SGD; each side runs for at least 10 s of CPU. "Opacus alone" is what a careful user writes
by hand: `make_private` once per client, then each round load the global params into the wrapped module, train,
free the per-sample gradients, average by example count. Both sides use the same Poisson-sampling and noise
generators per (round, client), so the final params must agree; the benchmark checks they do, and that tessera's
per-client epsilon equals the PrivacyEngine's.

tessera does more per round than the baseline: it passes every message through the in-process backend (bytes
counted), and runs with a budget (large enough never to stop the run), so every round each client checks its
budget before training, the coordinator predicts each client's epsilon before asking it and checks each reply's
report against its own ledger, and records every client's epsilon. Each tessera run starts with cold epsilon
caches, as a fresh process does. The baseline's own epsilon queries are *not* in its time (shown apart): a
conservative baseline.

Allocator: Opacus builds each layer's per-sample gradients in a fresh `torch.zeros` of batch x weight (33 MB for a
512x512 layer at batch 32), above glibc's largest mmap threshold, so with the default allocator every step maps
and unmaps it and pays ~60,000 page faults: ~40% of both sides' CPU time is the kernel zeroing pages, and how long
that takes swings with the other processes on the machine. By default the benchmark raises glibc's mmap and trim
thresholds (`mallopt`, the same as MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ in the environment) for the whole
process, so both sides reuse the buffer from the heap; `--system-malloc` keeps the defaults.

ratio = median over interleaved pairs of tessera / Opacus-alone process CPU time (target <= 1.03); the spread of
the paired ratios, the ratio of the two sides' fastest runs and the wall-time ratio are printed and in the JSON.
`--profile` writes a pyinstrument profile of one tessera run to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, report

from tessera.core.datasets import digits
from tessera.core.models import MLP
from tessera.core.types import get_params, set_params
from tessera.horizontal.client import client_seed
from tessera.horizontal.partition import iid
from tessera.horizontal.simulation import JobParts, initial_params, simulate
from tessera.horizontal.strategies import FedAvg
from tessera.horizontal.task import SupervisedTask
from tessera.privacy import DPSGD
from tessera.privacy.ledger import _epsilon, _rdp_per_step
from tessera.privacy.opacus import round_generators

CLIENTS, BATCH, LR, SIGMA, CLIP, SEED, DELTA, HIDDEN = 5, 32, 0.05, 1.0, 1.0, 0, 1e-5, (512, 512)
BUDGET = 100.0  # never reached (epsilon ~4 after 5 rounds): the budget checks run every round, nothing stops


def model_fn() -> nn.Module:
    return MLP(64, 10, HIDDEN)


def setup() -> tuple[dict[str, TensorDataset], SupervisedTask]:
    x, y = digits()
    parts = iid(len(y), CLIENTS, np.random.default_rng(SEED))
    data = {f"c{i}": TensorDataset(torch.from_numpy(x[p]), torch.from_numpy(y[p])) for i, p in enumerate(parts)}

    def data_fn(cid: str) -> tuple[DataLoader[Any], None]:
        return DataLoader(data[cid], batch_size=BATCH), None

    task = SupervisedTask(model_fn=model_fn, loss_fn=nn.CrossEntropyLoss(),
                          optimizer_fn=lambda p: torch.optim.SGD(p, lr=LR), data_fn=data_fn)
    return data, task


def opacus_alone(data: dict[str, TensorDataset], start: dict[str, torch.Tensor], rounds: int, epochs: int
                 ) -> tuple[dict[str, torch.Tensor], dict[str, PrivacyEngine]]:
    """make_private once per client; each round: load global params, DP epochs, average by example count."""
    loss_fn = nn.CrossEntropyLoss()
    clients = {}
    for cid, ds in data.items():
        model = model_fn()
        with warnings.catch_warnings():  # the "secure RNG turned off" notice, once per engine
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp")
            pm, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                             data_loader=DataLoader(ds, batch_size=BATCH), noise_multiplier=SIGMA,
                                             max_grad_norm=CLIP)
        clients[cid] = (model, pm, opt, engine, DataLoader(ds, batch_size=BATCH))
    global_params = {k: v.clone() for k, v in start.items()}
    for rnd in range(1, rounds + 1):
        new = []
        for cid, (model, pm, opt, _, loader) in clients.items():
            set_params(model, global_params)
            sample_gen, noise_gen = round_generators(client_seed(SEED, rnd, cid))
            opt.generator = noise_gen
            opt.original_optimizer.state.clear()
            for _ in range(epochs):
                for xb, yb in DPDataLoader.from_data_loader(loader, generator=sample_gen):
                    opt.zero_grad(set_to_none=True)
                    loss_fn(pm(xb), yb).backward()
                    opt.step()
            opt.zero_grad(set_to_none=True)  # free the per-sample gradients between rounds, as DPTrainer does
            new.append((get_params(model), len(loader.dataset)))  # type: ignore[arg-type]
        total = sum(n for _, n in new)
        global_params = {k: sum(p[k].double() * (n / total) for p, n in new).float()  # type: ignore[union-attr]
                         for k in global_params}
    return global_params, {cid: c[3] for cid, c in clients.items()}  # epsilon is queried outside the timing


def tessera_run(task: SupervisedTask, rounds: int, epochs: int) -> tuple[dict[str, torch.Tensor], Any]:
    _epsilon.cache_clear()  # cold caches, as in a fresh process: the per-step RDP of (sigma, q) is computed once
    _rdp_per_step.cache_clear()
    parts = JobParts(task=task, strategy=FedAvg(fraction_evaluate=0.0, local_config={"local_epochs": epochs}),
                     clients=list(f"c{i}" for i in range(CLIENTS)))
    history, params = simulate(parts, rounds=rounds, seed=SEED,
                               plugins=[DPSGD(noise_multiplier=SIGMA, max_grad_norm=CLIP, delta=DELTA,
                                              budget=BUDGET, reproducible=True)])
    return params, history


def timed(fn: Any) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring); False off glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 31))
    except (OSError, AttributeError):
        return False


def quartiles(xs: list[float]) -> list[float]:
    """[min, lower quartile, median, upper quartile, max]."""
    if len(xs) < 2:
        return [xs[0]] * 5
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return [min(xs), q1, q2, q3, max(xs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=8, help="interleaved pairs")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3, help="local DP-SGD epochs per round")
    ap.add_argument("--quick", action="store_true", help="2 rounds, 1 pair: a smoke run, not a measurement")
    ap.add_argument("--profile", action="store_true", help="also profile one tessera run (pyinstrument)")
    ap.add_argument("--system-malloc", action="store_true", help="keep glibc's default mmap threshold")
    args = ap.parse_args()
    repeats, rounds = (1, 2) if args.quick else (args.repeats, args.rounds)
    malloc_tuned = False if args.system_malloc else tune_malloc()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # benchmark output only
    data, task = setup()
    start = initial_params(task, SEED)
    num_params = sum(t.numel() for t in start.values())
    opacus_alone(data, start, 1, 1), tessera_run(task, 1, 1)  # warm-up (lazy inits) of both, untimed
    # First pair: the correctness check (same params, same epsilon), timed like the others.
    pairs = []
    (ref, engines), o = _timed_result(lambda: opacus_alone(data, start, rounds, args.epochs))
    (got, history), t = _timed_result(lambda: tessera_run(task, rounds, args.epochs))
    pairs.append((o, t))
    max_diff = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    assert max_diff < 1e-5, f"tessera and Opacus alone disagree by {max_diff}: not the same work"
    t_eps = timed(lambda: {c: float(e.get_epsilon(delta=DELTA)) for c, e in engines.items()})[1]
    ref_eps = {c: float(e.get_epsilon(delta=DELTA)) for c, e in engines.items()}
    eps_diff = max(abs(history.last["epsilon"][c] - e) for c, e in ref_eps.items())
    assert eps_diff < 1e-9, f"tessera's epsilon differs from the PrivacyEngine's by {eps_diff}"
    # Interleaved pairs in process CPU time as well as wall time: the machine is shared, so wall time swings
    # between identical runs; both sides are single-threaded, so CPU time measures the work each does.
    for i in range(1, repeats):
        first, second = (lambda: opacus_alone(data, start, rounds, args.epochs)), \
            (lambda: tessera_run(task, rounds, args.epochs))
        if i % 2:  # alternate which side runs first, so a slow phase of the machine hits both
            t, o = timed(second), timed(first)
        else:
            o, t = timed(first), timed(second)
        pairs.append((o, t))
        print(f"pair {i + 1}/{repeats}: Opacus {o[1]:.2f} s, tessera {t[1]:.2f} s CPU, ratio {t[1] / o[1]:.4f}",
              flush=True)
    cpu_ratios = [t[1] / o[1] for o, t in pairs]
    ratio = statistics.median(cpu_ratios)
    wall_ratio = statistics.median(t[0] / o[0] for o, t in pairs)
    min_ratio = min(t[1] for _, t in pairs) / min(o[1] for o, _ in pairs)
    spread = quartiles(cpu_ratios)
    if args.profile:
        from pyinstrument import Profiler

        prof = Profiler(interval=0.002)
        prof.start()
        tessera_run(task, rounds, args.epochs)
        prof.stop()
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "dp_overhead_profile.txt").write_text(prof.output_text(unicode=False, color=False))

    def row(name: str, samples: list[tuple[float, float]]) -> list[Any]:
        return [name, statistics.median(c for _, c in samples), min(c for _, c in samples),
                statistics.median(w for w, _ in samples)]

    print("paired CPU ratios min / q1 / median / q3 / max: " + " / ".join(f"{x:.4f}" for x in spread)
          + f"; fastest tessera / fastest Opacus {min_ratio:.4f}; wall {wall_ratio:.4f}; "
          + f"allocator {'tuned' if malloc_tuned else 'system default'}")
    report("dp_overhead", ["run", "median CPU s", "min CPU s", "median wall s"],
           [row("Opacus alone (make_private once per client)", [o for o, _ in pairs]),
            row("tessera DPSGD (in-process, budget checks + epsilon per client per round)", [t for _, t in pairs]),
            [f"(not timed above) Opacus get_epsilon for {CLIENTS} clients", t_eps, t_eps, t_eps]],
           ratio=ratio, ratio_means="median of paired tessera / Opacus-alone CPU times, same DP-SGD work "
                                    "(target <= 1.03)",
           extra={"clients": CLIENTS, "rounds": rounds, "local_epochs": args.epochs, "num_params": num_params,
                  "noise_multiplier": SIGMA, "max_grad_norm": CLIP, "budget": BUDGET, "max_param_diff": max_diff,
                  "epsilon": ref_eps, "pairs": len(pairs), "wall_ratio": wall_ratio, "min_ratio": min_ratio,
                  "paired_cpu_ratios": cpu_ratios, "paired_cpu_ratio_min_q1_median_q3_max": spread,
                  "malloc_tuned": malloc_tuned})


def _timed_result(fn: Any) -> tuple[Any, tuple[float, float]]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - w0, time.process_time() - c0)


if __name__ == "__main__":
    main()
