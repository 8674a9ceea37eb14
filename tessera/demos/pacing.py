"""`tessera demo pacing`: stragglers on the real clock, and compressed updates.

Digits, 10 IID clients whose local steps are slowed by injected delays with a 10x spread (`Pacing`). By default
every client is a gRPC client party (mutual TLS, loopback, certificates made for the run) served from a thread of
this process, and the coordinator drives them through the real `GrpcBackend`: bytes are the frames on the wire.
`transport="inprocess"` runs the same clients on the in-process backend's threads instead.
1. Synchronous FedAvg vs deadline rounds (FedNova, late updates folded) vs FedBuff on the real clock: accuracy
   against wall-clock seconds (pacing_time.png).
2. Synchronous FedAvg with uncompressed / fp16 / 8-bit / 4-bit / top-1% (error feedback) updates: accuracy against
   megabytes sent by the clients (pacing_bytes.png).
benchmarks/pacing.py reuses `run_policy` and `run_codec`.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tessera.core.datasets import digits
from tessera.core.metrics import History
from tessera.core.models import MLP
from tessera.core.types import Params, set_params
from tessera.horizontal.compression import Compression
from tessera.horizontal.job import Plugin, compose
from tessera.horizontal.pacing import Pacing, speed_spread
from tessera.horizontal.realtime import Asynchronous, Deadline, Late
from tessera.horizontal.scheduling import Scheduling
from tessera.horizontal.server import Server, ServerConfig
from tessera.horizontal.simulation import JobParts, initial_params, simulate
from tessera.horizontal.strategies import FedAvg, FedBuff, FedNova, Strategy
from tessera.horizontal.task import SupervisedTask

POLICIES = ("synchronous", "deadline", "fedbuff")
CODECS = ("none", "fp16", "q8", "q4", "topk")
TRANSPORTS = ("grpc", "inprocess")
_CERTS: dict[int, Path] = {}  # clients -> a folder with a CA and certificates for "server", "p0", ... (per process)


def _certs(clients: int) -> Path:
    from tessera.runtime.grpc.certs import init_ca, issue

    if clients not in _CERTS:
        folder = Path(tempfile.mkdtemp(prefix="tessera-pacing-certs-"))
        init_ca(folder)
        for name in ("server", *(f"p{i}" for i in range(clients))):
            issue(folder, name)
        _CERTS[clients] = folder
    return _CERTS[clients]


def grpc_run(parts: JobParts, *, rounds: int, seed: int, plugins: Sequence[Plugin] = (),
             scheduling: Scheduling | None = None) -> History:
    """The job over loopback gRPC + mTLS: one `ClientParty` per client (each on its own thread, dialling the
    coordinator like a separate process would) and the coordinator's `Server` on a `GrpcBackend`."""
    from tessera.runtime.grpc import ClientParty, GrpcBackend
    from tessera.runtime.grpc.config import build

    parts = compose(parts, plugins)
    routes = {c: f"p{i}" for i, c in enumerate(parts.clients)}
    certs = _certs(len(routes))

    def fed(port: int) -> Any:
        members = [{"name": "server", "role": "coordinator", "address": f"127.0.0.1:{port}"},
                   *({"name": n} for n in routes.values())]
        settings = {"ca_cert": "ca.crt", "certs_dir": ".", "quorum_deadline_s": 60, "rpc_deadline_s": 120,
                    "round_deadline_s": 300, "retry": {"initial_backoff_s": 0.05, "max_attempts": 100}}
        return build({"federation": settings, "parties": members}, source="demo", base=certs)

    backend = GrpcBackend(fed(0), routes, min_clients=parts.strategy.min_available)
    port = backend.listen()
    threads = [threading.Thread(target=ClientParty(fed(port), n, parts.client_app()).run, daemon=True,
                                name=f"party-{n}") for n in routes.values()]
    for t in threads:
        t.start()
    server = Server(strategy=parts.strategy, backend=backend, clients=parts.clients,
                    initial_params=initial_params(parts.task, seed), config=ServerConfig(rounds=rounds, seed=seed),
                    aggregation=parts.aggregation, central_eval=parts.central_eval, extensions=parts.extensions,
                    scheduling=scheduling)
    history = server.run()  # ends with BYE to every party
    for t in threads:
        t.join(30)
    return history


def _run(parts: JobParts, *, transport: str, rounds: int, seed: int, plugins: Sequence[Plugin],
         scheduling: Callable[[], Scheduling | None]) -> History:
    if transport == "grpc":
        return grpc_run(parts, rounds=rounds, seed=seed, plugins=plugins, scheduling=scheduling())

    def use(server: Server) -> None:
        policy = scheduling()
        if policy is not None:
            server.scheduling = policy

    hist, _ = simulate(parts, rounds=rounds, seed=seed, plugins=plugins, on_server=use,
                       backend_options={"max_workers": len(parts.clients)})
    return hist


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
               deadline_s: float = 0.08, buffer_size: int = 5, transport: str = "grpc") -> Curve:
    """One run of `policy` on 10 paced clients; `rounds` server steps (a FedBuff step is `buffer_size` updates)."""
    kw: dict[str, Any] = {"fraction_evaluate": 0.0}
    strategy: Strategy = {"synchronous": FedAvg, "deadline": FedNova}.get(policy, FedAvg)(**kw) \
        if policy != "fedbuff" else FedBuff(buffer_size=buffer_size, **kw)
    parts = digits_job(strategy, seed=seed)
    pacing = Pacing(speed_spread(parts.clients, spread=spread, base_delay=base_delay, seed=seed))

    def scheduling() -> Scheduling | None:
        if policy == "deadline":
            return Deadline(seconds=deadline_s, late=Late.FOLD)
        return Asynchronous(buffer_size=buffer_size) if policy == "fedbuff" else None

    hist = _run(parts, transport=transport, rounds=rounds, seed=seed, plugins=[pacing], scheduling=scheduling)
    done = [int(u) for u in hist["updates"]] if policy == "fedbuff" else \
        list(np.cumsum(hist["clients_succeeded"]).tolist())
    return _curve(policy, hist.records, done)


def run_codec(codec: str, *, rounds: int, seed: int = 0, fraction: float = 0.01,
              hidden: tuple[int, ...] = (256,), transport: str = "grpc") -> Curve:
    """Synchronous FedAvg (no pacing) with `codec` ("none" or a Compression codec)."""
    parts = digits_job(FedAvg(fraction_evaluate=0.0), seed=seed, hidden=hidden)
    plugins: list[Plugin] = [] if codec == "none" else [Compression(codec, fraction=fraction)]
    hist = _run(parts, transport=transport, rounds=rounds, seed=seed, plugins=plugins, scheduling=lambda: None)
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


def demo_pacing(out: Path, quick: bool, transport: str = "grpc") -> None:
    out.mkdir(parents=True, exist_ok=True)
    sync_rounds = 6 if quick else 15
    run_policy("synchronous", rounds=1, transport=transport)  # warm-up (threads, channels, first model builds)
    runs = [run_policy("synchronous", rounds=sync_rounds, transport=transport),
            run_policy("deadline", rounds=3 * sync_rounds, transport=transport),
            run_policy("fedbuff", rounds=4 * sync_rounds, transport=transport)]
    where = "loopback gRPC + mTLS" if transport == "grpc" else "in-process threads"
    _plot(runs, "seconds", "wall-clock seconds", f"10 clients on {where}, 10x speed spread (injected delays)",
          out / "pacing_time.png")
    codecs = [run_codec(c, rounds=6 if quick else 20, transport=transport) for c in CODECS]
    _plot(codecs, "mb_up", "megabytes sent by clients", f"FedAvg with compressed updates, {where}",
          out / "pacing_bytes.png")
    summary: dict[str, Any] = {c.name: {"seconds": c.seconds[-1], "accuracy": c.accuracy[-1],
                                        "mb_up": c.mb_up[-1]} for c in [*runs, *codecs]}
    summary["transport"] = transport
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
