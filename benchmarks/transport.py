"""Transport cost of deployment: loopback gRPC + mutual TLS vs the in-process backend.

1. Throughput: one FitIns carrying 1 MB / 100 MB of float32 params goes to a client, which acks with a tiny reply.
   gRPC: the client is a separate OS process dialling the coordinator over TLS on 127.0.0.1 (1 MiB chunks, sha256
   checked on arrival). In-process: the same message through InProcessBackend (encoded and decoded exactly as on
   the wire, no socket).
2. Round time: a 3-party FedAvg on digits (MLP 64-64-10, 1 local epoch) with the coordinator in this process and
   three client processes over gRPC, vs `simulate` of the same job in-process. The final params are checked equal,
   so both sides did the same work. Median round time, the first (warm-up) round excluded.

ratio = gRPC round time / in-process round time (3-party FedAvg).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, report

from tessera.cli.jobs import build_parts, job_parts
from tessera.core.config import load_job
from tessera.horizontal.deploy import client_routes, run_client
from tessera.horizontal.server import Server, ServerConfig
from tessera.horizontal.simulation import initial_params, simulate
from tessera.runtime.backend import InProcessBackend
from tessera.runtime.grpc import ClientParty, GrpcBackend, init_ca, issue, load_federation
from tessera.runtime.messages import EvaluateRes, FitIns

CLIENTS = ("alice", "bob", "carol")
JOB = """[job]
name = "transport-bench"
rounds = {rounds}
seed = 0
[data]
dataset = "digits"
num_clients = 3
partition = "iid"
[model]
name = "mlp"
hidden = [64, 64]
[train]
local_epochs = 1
batch_size = 32
lr = 0.05
[strategy]
name = "fedavg"
min_available = 3
fraction_evaluate = 0.0
"""


class Ack:
    """Client handler for the throughput test: acknowledge with the number of values received."""

    def handle(self, client: str, msg: Any) -> Any:
        return EvaluateRes(loss=0.0, num_examples=sum(t.numel() for t in msg.params.values()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _federation(folder: Path) -> Path:
    certs = folder / "certs"
    init_ca(certs)
    for name in ("server", *CLIENTS):
        issue(certs, name)
    parties = "".join(f'[[parties]]\nname = "{c}"\nrole = "client"\n' for c in CLIENTS)
    path = folder / "federation.toml"
    path.write_text(f'[federation]\nca_cert = "certs/ca.crt"\nmax_message_bytes = 268435456\n'
                    f'[[parties]]\nname = "server"\nrole = "coordinator"\naddress = "127.0.0.1:{_free_port()}"\n'
                    f"{parties}")
    return path


def _ack_party(fed_path: str) -> None:
    torch.set_num_threads(1)
    ClientParty(load_federation(fed_path), "alice", Ack()).run()


def _job_party(fed_path: str, name: str, job_path: str) -> None:
    torch.set_num_threads(1)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        run_client(load_federation(fed_path), name, job_parts(load_job(job_path)))


def throughput(fed_path: Path, sizes_mb: list[int], repeats: int) -> list[list[Any]]:
    ctx = multiprocessing.get_context("spawn")
    fed = load_federation(fed_path)
    backend = GrpcBackend(fed, {"c0": "alice"})
    backend.listen()
    proc = ctx.Process(target=_ack_party, args=(str(fed_path),))
    proc.start()
    rows = []
    try:
        backend.start(["c0"])
        local = InProcessBackend(Ack())
        for mb in sizes_mb:
            msg = FitIns(round=1, params={"w": torch.randn(mb * 2**20 // 4)})
            for be in (backend, local):  # warm-up, and check the payload arrived whole
                reply = be.exchange({"c0": msg})["c0"]
                assert isinstance(reply, EvaluateRes) and reply.num_examples == msg.params["w"].numel(), reply
            t_grpc, _ = best_of(lambda: backend.exchange({"c0": msg}), repeats)  # noqa: B023 - called right here
            t_local, _ = best_of(lambda: local.exchange({"c0": msg}), repeats)  # noqa: B023
            rows += [[f"send {mb} MB params", "gRPC + mTLS (loopback)", t_grpc, mb / t_grpc, t_grpc / t_local],
                     [f"send {mb} MB params", "in-process", t_local, mb / t_local, 1.0]]
    finally:
        backend.close()
        proc.join(30)
    return rows


def round_times(fed_path: Path, folder: Path, rounds: int) -> tuple[float, float, float]:
    job = folder / "job.toml"
    job.write_text(JOB.format(rounds=rounds))
    cfg = load_job(job)
    history, want = simulate(build_parts(cfg), rounds=rounds, seed=0)
    t_local = statistics.median(r["seconds"] for r in history.records[1:])

    fed = load_federation(fed_path)
    parts = build_parts(cfg)
    backend = GrpcBackend(fed, client_routes(fed, parts.clients), min_clients=3)
    server = Server(strategy=parts.strategy, backend=backend, clients=parts.clients,
                    initial_params=initial_params(parts.task, 0), config=ServerConfig(rounds=rounds, seed=0))
    backend.listen()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_job_party, args=(str(fed_path), n, str(job))) for n in CLIENTS]
    for p in procs:
        p.start()
    try:
        grpc_history = server.run()
    finally:
        for p in procs:
            p.join(60)
    diff = max(float((server.params[k] - want[k]).abs().max()) for k in want)
    assert diff == 0.0, f"the gRPC run and the simulation disagree by {diff}: not the same work"
    t_grpc = statistics.median(r["seconds"] for r in grpc_history.records[1:])
    return t_grpc, t_local, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and rounds")
    args = ap.parse_args()
    torch.set_num_threads(1)
    repeats, rounds = (1, 3) if args.quick else (3, 6)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fed_path = _federation(folder)
        rows = throughput(fed_path, [1, 100], repeats)
        t_grpc, t_local, diff = round_times(fed_path, folder, rounds)
    ratio = t_grpc / t_local
    rows += [["3-party FedAvg round", "gRPC + mTLS, 3 client processes", t_grpc, "", ratio],
             ["3-party FedAvg round", "in-process simulation", t_local, "", 1.0]]
    report("transport", ["what", "backend", "median s", "MB/s", "x in-process"], rows, ratio=ratio,
           ratio_means="gRPC + mTLS round time / in-process round time, 3-party FedAvg on digits",
           extra={"repeats": repeats, "rounds": rounds, "max_param_diff": diff, "chunk_bytes": 2**20})


if __name__ == "__main__":
    main()
