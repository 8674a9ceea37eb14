"""DP-SGD across rounds: tessera (DPSGD plugin, in-process FedAvg) vs Opacus alone on the same local work.

Realistic work, so a few percent of overhead is measurable: 5 clients (IID digits, ~360 examples each), 5 rounds
of `--epochs` (2) local DP-SGD epochs (Poisson sampling, sigma=1.0, C=1.0, batch 32) on an MLP 64-512-512-10
(301,066 parameters), SGD; each side runs for at least 10 s of CPU. "Opacus alone" is what a careful user writes
by hand: `make_private` once per client, then each round load the global params into the wrapped module, train,
free the per-sample gradients, average by example count. Both sides use the same Poisson-sampling and noise
generators per (round, client), so the final params must agree; the benchmark checks they do, and that tessera's
per-client epsilon equals the PrivacyEngine's.

tessera does more per round than the baseline: it passes every message through the in-process backend (bytes
counted), checks each client's budget before and records its epsilon after every round. The baseline's own
epsilon queries are *not* in its time (shown apart): a conservative baseline.
ratio = median over interleaved pairs of tessera / Opacus-alone process CPU time (target <= 1.03); the wall-time
ratio is in the JSON too. `--profile` writes a pyinstrument profile of one tessera run to benchmarks/results/.
"""

from __future__ import annotations

import argparse
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
from tessera.privacy.ledger import _epsilon
from tessera.privacy.opacus import round_generators

CLIENTS, BATCH, LR, SIGMA, CLIP, SEED, DELTA, HIDDEN = 5, 32, 0.05, 1.0, 1.0, 0, 1e-5, (512, 512)


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
        global_params = {k: sum(p[k].double() * (n / total) for p, n in new).float()  # type: ignore[misc]
                         for k in global_params}
    return global_params, {cid: c[3] for cid, c in clients.items()}  # epsilon is queried outside the timing


def tessera_run(task: SupervisedTask, rounds: int, epochs: int) -> tuple[dict[str, torch.Tensor], Any]:
    _epsilon.cache_clear()  # epsilon per history: a fresh run has fresh histories, so never carry it over
    parts = JobParts(task=task, strategy=FedAvg(fraction_evaluate=0.0, local_config={"local_epochs": epochs}),
                     clients=list(f"c{i}" for i in range(CLIENTS)))
    history, params = simulate(parts, rounds=rounds, seed=SEED,
                               plugins=[DPSGD(noise_multiplier=SIGMA, max_grad_norm=CLIP, delta=DELTA,
                                              reproducible=True)])
    return params, history


def timed(fn: Any) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved pairs")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2, help="local DP-SGD epochs per round")
    ap.add_argument("--quick", action="store_true", help="2 rounds, 1 pair: a smoke run, not a measurement")
    ap.add_argument("--profile", action="store_true", help="also profile one tessera run (pyinstrument)")
    args = ap.parse_args()
    repeats, rounds = (1, 2) if args.quick else (args.repeats, args.rounds)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # benchmark output only
    data, task = setup()
    start = initial_params(task, SEED)
    num_params = sum(t.numel() for t in start.values())
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
    ratio = statistics.median(t[1] / o[1] for o, t in pairs)
    wall_ratio = statistics.median(t[0] / o[0] for o, t in pairs)
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

    report("dp_overhead", ["run", "median CPU s", "min CPU s", "median wall s"],
           [row("Opacus alone (make_private once per client)", [o for o, _ in pairs]),
            row("tessera DPSGD (in-process, per-round epsilon + budget)", [t for _, t in pairs]),
            [f"(not timed above) Opacus get_epsilon for {CLIENTS} clients", t_eps, t_eps, t_eps]],
           ratio=ratio, ratio_means="median of paired tessera / Opacus-alone CPU times, same DP-SGD work "
                                    "(target <= 1.03)",
           extra={"clients": CLIENTS, "rounds": rounds, "local_epochs": args.epochs, "num_params": num_params,
                  "noise_multiplier": SIGMA, "max_grad_norm": CLIP, "max_param_diff": max_diff,
                  "epsilon": ref_eps, "pairs": len(pairs), "wall_ratio": wall_ratio,
                  "paired_cpu_ratios": [t[1] / o[1] for o, t in pairs]})


def _timed_result(fn: Any) -> tuple[Any, tuple[float, float]]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, (time.perf_counter() - w0, time.process_time() - c0)


if __name__ == "__main__":
    main()
