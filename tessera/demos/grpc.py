"""`tessera demo grpc`: a federation over real loopback gRPC + mTLS next to its in-process simulation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from tessera.core.errors import TransportError
from tessera.demos import JobBuilder
from tessera.horizontal.deploy import client_routes
from tessera.runtime.grpc.config import FederationConfig

console = Console()
DEMO_JOB: dict[str, dict[str, Any]] = {
    "job": {"name": "grpc-demo", "seed": 0}, "data": {"dataset": "digits", "num_clients": 3},
    "model": {"name": "mlp", "hidden": [32]}, "train": {"batch_size": 32, "lr": 0.1},
    "strategy": {"name": "fedavg", "min_available": 2}}


class _OneAtATime:
    """Client threads of one process share torch's global RNG, so the demo lets one train at a time (as the
    in-process simulation does); `tessera party` processes train in parallel and need no such lock."""

    def __init__(self, handler: Any, lock: Any) -> None:
        self.handler, self.lock = handler, lock

    def handle(self, client: str, msg: Any) -> Any:
        with self.lock:
            return self.handler.handle(client, msg)


def demo_grpc(out: Path, quick: bool, job_parts: JobBuilder) -> None:
    """3 clients and a coordinator over real loopback gRPC + mTLS (parties as threads of this process; `tessera
    party` runs each in its own process), two impostors refused, and the final params compared with simulation."""
    import threading

    import torch

    from tessera.core.config import JobConfig, validate
    from tessera.horizontal.server import Server, ServerConfig
    from tessera.horizontal.simulation import initial_params, simulate
    from tessera.runtime.grpc import ClientParty, GrpcBackend, init_ca, issue
    from tessera.runtime.grpc.config import build

    torch.set_num_threads(1)  # small model, shared cores: threads would only contend
    rounds = 2 if quick else 5
    cfg = validate(JobConfig, {**DEMO_JOB, "job": {**DEMO_JOB["job"], "rounds": rounds}}, source="demo")
    certs, evil = out / "certs", out / "other-ca"
    for folder, names in ((certs, ("server", "alice", "bob", "carol", "mallory")), (evil, ("alice",))):
        init_ca(folder, force=True)
        for n in names:
            issue(folder, n, force=True)

    def fed(port: int, cert: Path | None = None) -> FederationConfig:
        """The federation; with `cert`, alice and bob present that certificate instead of their own."""
        me = {"cert": str(cert), "key": str(cert.with_suffix(".key"))} if cert else {}
        parties = [{"name": "server", "role": "coordinator", "address": f"127.0.0.1:{port}"},
                   {"name": "alice", **me}, {"name": "bob", **me}, {"name": "carol"}]
        settings = {"ca_cert": str(certs / "ca.crt"), "certs_dir": str(certs),
                    "retry": {"max_attempts": 1 if cert else 20, "initial_backoff_s": 0.1}}
        return build({"federation": settings, "parties": parties}, source="demo", base=out)

    parts = job_parts(cfg)
    backend = GrpcBackend(fed(0), client_routes(fed(0), parts.clients), min_clients=2)
    port = backend.listen()
    lock = threading.Lock()
    threads = [threading.Thread(target=ClientParty(fed(port), n, _OneAtATime(job_parts(cfg).client_app(), lock)).run,
                                daemon=True) for n in ("alice", "bob", "carol")]
    for t in threads:
        t.start()
    backend.wait_for(parts.clients, 60)
    impostors = {"alice, certificate from another CA": fed(port, evil / "alice.crt"),
                 "mallory's genuine certificate, claiming bob": fed(port, cert=certs / "mallory.crt")}
    refused = {}
    for what, f in impostors.items():
        try:
            ClientParty(f, "alice" if "alice," in what else "bob", job_parts(cfg).client_app()).run()
        except TransportError as exc:
            refused[what] = str(exc).split(";")[0]
    server = Server(strategy=parts.strategy, backend=backend, clients=parts.clients,
                    initial_params=initial_params(parts.task, 0),
                    config=ServerConfig(rounds=rounds, seed=0, output_dir=out / "grpc"))
    deployed = server.run()
    for t in threads:
        t.join(30)
    simulated, want = simulate(job_parts(cfg), rounds=rounds, seed=0, output_dir=out / "simulation")
    diff = max(float((server.params[k] - want[k]).abs().max()) for k in want)
    _demo_report(out, deployed.records, simulated.records, refused, diff)


def _demo_report(out: Path, grpc_rec: list[dict[str, Any]], sim_rec: list[dict[str, Any]],
                 refused: dict[str, str], diff: float) -> None:
    import matplotlib.pyplot as plt
    from rich.table import Table

    table = Table(title="3 clients over loopback gRPC + mTLS vs in-process simulation (digits, FedAvg)")
    for col in ("round", "loss gRPC", "loss simulation", "KB down / up (gRPC)", "s gRPC", "s simulation"):
        table.add_column(col, justify="right")
    for g, s in zip(grpc_rec, sim_rec, strict=True):
        table.add_row(str(g["round"]), f"{g['train_loss']:.5f}", f"{s['train_loss']:.5f}",
                      f"{g['bytes_down'] / 1e3:.0f} / {g['bytes_up'] / 1e3:.0f}", f"{g['seconds']:.3f}",
                      f"{s['seconds']:.3f}")
    console.print(table)
    for what, why in refused.items():
        console.print(f"refused: {what} -> {why}", highlight=False)
    console.print(f"largest difference between deployed and simulated final params: {diff}")
    (out / "summary.json").write_text(json.dumps({
        "rounds": len(grpc_rec), "max_param_diff": diff, "refused": refused,
        "grpc": [{k: r[k] for k in ("round", "train_loss", "bytes_up", "bytes_down", "seconds")} for r in grpc_rec],
        "simulation": [{k: r[k] for k in ("round", "train_loss", "seconds")} for r in sim_rec]}, indent=2))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    rnds = [r["round"] for r in grpc_rec]
    ax1.plot(rnds, [r["train_loss"] for r in sim_rec], "o-", color="tab:blue", lw=4, alpha=0.4,
             label="in-process simulation")
    ax1.plot(rnds, [r["train_loss"] for r in grpc_rec], "x--", color="tab:red", label="gRPC + mTLS (deployed)")
    ax1.set(xlabel="round", ylabel="train loss", title=f"same job, same seed: max param diff {diff:g}", xticks=rnds)
    ax1.legend()
    ax2.bar([r - 0.2 for r in rnds], [r["bytes_down"] / 1e3 for r in grpc_rec], 0.4, label="coordinator -> clients")
    ax2.bar([r + 0.2 for r in rnds], [r["bytes_up"] / 1e3 for r in grpc_rec], 0.4, label="clients -> coordinator")
    ax2.set(xlabel="round", ylabel="KB on the wire (encoded messages)", title="traffic per round (gRPC)")
    ax2.set_ylim(0, 1.4 * max(r["bytes_down"] / 1e3 for r in grpc_rec))
    ax2.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(out / "grpc_vs_simulation.png", dpi=110)
    plt.close(fig)
    console.print(f"wrote {out / 'summary.json'} and {out / 'grpc_vs_simulation.png'}")
