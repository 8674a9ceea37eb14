"""`tessera demo pacing`: stragglers on the real clock, and compressed updates.

Digits, 10 IID clients whose local steps are slowed by injected delays with a 10x spread (`Pacing`), all training
concurrently in this process (threads; over gRPC each client would be its own process, see docs/pacing.md).
1. Synchronous FedAvg vs deadline rounds (FedNova, late updates folded) vs FedBuff on the real clock: accuracy
   against wall-clock seconds (pacing_time.png).
2. Synchronous FedAvg with uncompressed / fp16 / 8-bit / 4-bit / top-1% (error feedback) updates: accuracy against
   megabytes sent by the clients (pacing_bytes.png).
benchmarks/pacing.py reuses `run_policy` and `run_codec`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tessera.core.datasets import digits
from tessera.core.models import MLP
from tessera.core.types import Params, set_params
from tessera.horizontal.compression import Compression
from tessera.horizontal.job import Plugin
from tessera.horizontal.pacing import Pacing, speed_spread
from tessera.horizontal.realtime import Asynchronous, Deadline, Late
from tessera.horizontal.server import Server
from tessera.horizontal.simulation import JobParts, simulate
from tessera.horizontal.strategies import FedAvg, FedBuff, FedNova, Strategy
from tessera.horizontal.task import SupervisedTask

POLICIES = ("synchronous", "deadline", "fedbuff")
CODECS = ("none", "fp16", "q8", "q4", "topk")


@dataclass(frozen=True)
class Curve:
    name: str
    seconds: list[float]  # cumulative wall seconds at each server step
    mb_up: list[float]  # cumulative megabytes sent by the clients
    accuracy: list[float]
    updates: list[int]  # cumulative client updates aggregated

    def first(self, target: float, axis: str) -> float | None:
        """The value of `axis` ("seconds", "mb_up", or "steps") at the first step reaching `target`."""
        for i, a in enumerate(self.accuracy):
            if a >= target:
                return float(i + 1) if axis == "steps" else float(getattr(self, axis)[i])
        return None


def digits_job(strategy: Strategy, *, clients: int = 10, hidden: tuple[int, ...] = (64,), seed: int = 0,
               batch_size: int = 16, lr: float = 0.1) -> JobParts:
    """Digits split IID over `clients`; 20% held out for the server's accuracy."""
    x, y = digits()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    perm = np.random.default_rng(seed).permutation(len(y))
    cut = len(y) // 5
    test, train = perm[:cut], perm[cut:]
    ids = [f"c{i}" for i in range(clients)]
    rows = dict(zip(ids, np.array_split(train, clients), strict=True))

    def data_fn(cid: str) -> tuple[DataLoader[Any], None]:
        r = torch.from_numpy(rows[cid])
        return DataLoader(TensorDataset(xt[r], yt[r]), batch_size=batch_size, shuffle=True), None

    task = SupervisedTask(model_fn=lambda: MLP(64, 10, hidden), loss_fn=nn.CrossEntropyLoss(),
                          optimizer_fn=lambda p: torch.optim.SGD(p, lr=lr), data_fn=data_fn)
    model = MLP(64, 10, hidden)
    loader = DataLoader(TensorDataset(xt[torch.from_numpy(test)], yt[torch.from_numpy(test)]), batch_size=1024)

    def central_eval(params: Params) -> Any:
        set_params(model, params)
        return task.evaluate(model, loader)

    return JobParts(task=task, strategy=strategy, clients=ids, central_eval=central_eval)


def _curve(name: str, records: list[dict[str, Any]], updates: list[int]) -> Curve:
    return Curve(name, list(np.cumsum([r["seconds"] for r in records]).tolist()),
                 list((np.cumsum([r["bytes_up"] for r in records]) / 1e6).tolist()),
                 [float(r["central_metrics"]["accuracy"]) for r in records], updates)


def run_policy(policy: str, *, rounds: int, spread: float = 10.0, base_delay: float = 0.004, seed: int = 0,
               deadline_s: float = 0.08, buffer_size: int = 5) -> Curve:
    """One run of `policy` on 10 paced clients; `rounds` server steps (a FedBuff step is `buffer_size` updates)."""
    kw: dict[str, Any] = {"fraction_evaluate": 0.0}
    strategy: Strategy = {"synchronous": FedAvg, "deadline": FedNova}.get(policy, FedAvg)(**kw) \
        if policy != "fedbuff" else FedBuff(buffer_size=buffer_size, **kw)
    parts = digits_job(strategy, seed=seed)
    pacing = Pacing(speed_spread(parts.clients, spread=spread, base_delay=base_delay, seed=seed))

    def use(server: Server) -> None:
        if policy == "deadline":
            server.scheduling = Deadline(seconds=deadline_s, late=Late.FOLD)
        elif policy == "fedbuff":
            server.scheduling = Asynchronous(buffer_size=buffer_size)

    hist, _ = simulate(parts, rounds=rounds, seed=seed, plugins=[pacing], on_server=use,
                       backend_options={"max_workers": len(parts.clients)})
    done = [int(u) for u in hist["updates"]] if policy == "fedbuff" else \
        list(np.cumsum(hist["clients_succeeded"]).tolist())
    return _curve(policy, hist.records, done)


def run_codec(codec: str, *, rounds: int, seed: int = 0, fraction: float = 0.01,
              hidden: tuple[int, ...] = (256,)) -> Curve:
    """Synchronous FedAvg (no pacing) with `codec` ("none" or a Compression codec)."""
    parts = digits_job(FedAvg(fraction_evaluate=0.0), seed=seed, hidden=hidden)
    plugins: list[Plugin] = [] if codec == "none" else [Compression(codec, fraction=fraction)]
    hist, _ = simulate(parts, rounds=rounds, seed=seed, plugins=plugins)
    return _curve(codec, hist.records, list(np.cumsum(hist["clients_succeeded"]).tolist()))


def _plot(curves: list[Curve], axis: str, xlabel: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in curves:
        ax.plot(getattr(c, axis), c.accuracy, label=c.name, marker=".", markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo_pacing(out: Path, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sync_rounds = 6 if quick else 15
    run_policy("synchronous", rounds=1)  # warm-up (thread pools, first model builds), so no policy pays for it
    runs = [run_policy("synchronous", rounds=sync_rounds), run_policy("deadline", rounds=3 * sync_rounds),
            run_policy("fedbuff", rounds=4 * sync_rounds)]
    _plot(runs, "seconds", "wall-clock seconds", "10 clients, 10x speed spread (injected per-step delays)",
          out / "pacing_time.png")
    codecs = [run_codec(c, rounds=6 if quick else 20) for c in CODECS]
    _plot(codecs, "mb_up", "megabytes sent by clients", "FedAvg with compressed updates", out / "pacing_bytes.png")
    summary = {c.name: {"seconds": c.seconds[-1], "accuracy": c.accuracy[-1], "mb_up": c.mb_up[-1]}
               for c in [*runs, *codecs]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
