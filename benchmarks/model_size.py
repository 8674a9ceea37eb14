"""Model size: tessera FLModel in-process FedAvg vs a plain PyTorch FedAvg loop, as the model grows.

Models: a stack of square Linear layers (width W, ReLU) with about 1M, 50M and 200M parameters; 2 and 8 clients;
2 rounds; each client trains 1 local epoch of 64 rows in batches of 32 (2 SGD steps). The plain loop is what a user
writes by hand: deepcopy the global model per client, train it, fold its state dict into a float64 weighted sum,
load the mean. Each point runs in a fresh process so its peak RSS (ru_maxrss) is its own; wall time covers the
2 rounds only (model construction excluded on both sides). Each point runs `--repeats` times (default 3; 200M
once) and keeps the fastest time, since other jobs on a shared machine only ever add time.

`--grpc` adds the deployed point: a coordinator process serving FedAvg at 50M over loopback gRPC + mutual TLS to 3
client processes (the same Server with an in-process backend, in its own fresh process, gives the round it is
compared with). Reported: round time (round 2, warm) against the in-process round, and the peak RSS of the
coordinator and of each client, in GiB and in model sizes (targets: coordinator <= 3 model sizes, round <= 2x).
`--accumulate float64,float32` picks FedAvg's sum dtype, `--spool on` sets federation.toml's `reply_spool_dir`,
`--window BYTES` its `receive_window_bytes` (docs/scale.md has the figures of each).

ratio = tessera / plain wall time at 50M parameters and 8 clients (target <= 1.2; peak RSS <= 1.3x).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import multiprocessing
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report

import tessera
from tessera.horizontal.client import ClientApp, TaskClient, client_seed
from tessera.horizontal.server import Server, ServerConfig
from tessera.horizontal.strategies import FedAvg
from tessera.horizontal.task import SupervisedTask
from tessera.runtime.backend import Handler, InProcessBackend
from tessera.runtime.grpc import ClientParty, GrpcBackend, init_ca, issue, load_federation

ROOT = Path(__file__).resolve().parent.parent
ROUNDS, ROWS, BATCH, LR, SEED = 2, 64, 32, 0.01, 0
SIZES = {"1M": (256, 15), "50M": (2048, 12), "200M": (4096, 12)}  # name -> (width, depth)


def build(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def data(width: int, clients: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(SEED)
    xs = [torch.randn(ROWS, width, generator=g) for _ in range(clients)]
    ys = [torch.randint(0, 10, (ROWS,), generator=g) for _ in range(clients)]
    return xs, ys


def plain(model: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
    """The hand-written loop: deepcopy per client, local SGD, float64 weighted mean of the state dicts."""
    loss_fn = nn.CrossEntropyLoss()
    for rnd in range(1, ROUNDS + 1):
        total = sum(len(y) for y in ys)
        acc: dict[str, torch.Tensor] = {}
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            local = copy.deepcopy(model)
            torch.default_generator.manual_seed(client_seed(SEED, rnd, f"c{i}"))
            opt = torch.optim.SGD(local.parameters(), lr=LR)
            perm = torch.randperm(len(y))
            for s in range(0, len(y), BATCH):
                idx = perm[s : s + BATCH]
                opt.zero_grad()
                loss_fn(local(x[idx]), y[idx]).backward()
                opt.step()
            w = len(y) / total
            for k, v in local.state_dict().items():
                if k in acc:
                    acc[k].add_(v.double(), alpha=w)
                else:
                    acc[k] = v.double().mul_(w)
            del local, opt
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(acc[k])


def tessera_fit(model: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
    fl = tessera.FLModel(parties=[f"c{i}" for i in range(len(xs))], model=model, loss_fn=nn.CrossEntropyLoss(),
                         optimizer_fn=lambda p: torch.optim.SGD(p, lr=LR), seed=SEED)
    fl.fit(x=xs, y=ys, rounds=ROUNDS, batch_size=BATCH)


def point(kind: str, size: str, clients: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    torch.set_num_threads(1)  # the 2-core box is shared: spinning OpenMP threads make timings noise
    torch.manual_seed(SEED)
    width, depth = SIZES[size]
    model = build(width, depth)
    xs, ys = data(width, clients)
    t0 = time.perf_counter()
    (plain if kind == "plain" else tessera_fit)(model, xs, ys)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    checksum = float(sum(p.double().sum() for p in model.state_dict().values()))
    return {"kind": kind, "size": size, "params": sum(p.numel() for p in model.parameters()), "clients": clients,
            "seconds": seconds, "peak_rss_gib": rss / 1024**3, "checksum": checksum,
            "tessera": str(Path(tessera.__file__).parent)}


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _app(size: str, clients: int) -> Handler:
    """The clients' side of the deployed point: FLModel's task (same model, data, loss, optimizer) as a ClientApp."""
    from torch.utils.data import DataLoader, TensorDataset

    width, depth = SIZES[size]
    xs, ys = data(width, clients)

    def data_fn(cid: str, rnd: int) -> tuple[DataLoader[Any], None]:
        i = int(cid[1:])
        return DataLoader(TensorDataset(xs[i], ys[i]), batch_size=BATCH, shuffle=True), None

    task = SupervisedTask(model_fn=lambda: build(width, depth), loss_fn=nn.CrossEntropyLoss(),
                          optimizer_fn=lambda p: torch.optim.SGD(p, lr=LR), data_fn=data_fn)
    return ClientApp(TaskClient(task))


def _server(size: str, clients: int, backend: Any, accumulate: str) -> tuple[Server, int]:
    torch.manual_seed(SEED)
    model = build(*SIZES[size])
    params = {k: v.detach() for k, v in model.state_dict().items()}  # the Server copies them once
    nbytes = sum(v.numel() * v.element_size() for v in params.values())
    strategy = FedAvg(min_available=clients, fraction_evaluate=0.0, accumulate=accumulate)
    server = Server(strategy=strategy, backend=backend, clients=[f"c{i}" for i in range(clients)],
                    initial_params=params, config=ServerConfig(rounds=ROUNDS, seed=SEED))
    del model, params
    return server, nbytes


def _party(fed_path: str, name: str, cid: str, spec: tuple[str, int], out: str) -> None:
    torch.set_num_threads(1)
    ClientParty(load_federation(fed_path), name, _app(*spec), expected_client_id=cid).run()
    Path(out).write_text(json.dumps({"party": name, "peak_rss_gib": _rss() / 1024**3}))


def deployed_point(kind: str, size: str, clients: int, accumulate: str = "float64", *,
                   spool: bool = False, window: int | None = None) -> dict[str, Any]:
    """The Server's rounds with an in-process backend (`inproc`) or over gRPC to client processes (`grpc`)."""
    torch.set_num_threads(1)
    base = _rss()
    parties: list[dict[str, Any]] = []
    if kind == "inproc":
        server, nbytes = _server(size, clients, InProcessBackend(_app(size, clients)), accumulate)
        server.run()
    elif kind == "ray":  # 2 actors (the machine's 2 CPUs), each serving half the clients
        from tessera.runtime.ray import RayBackend

        width, depth = SIZES[size]
        model_bytes = 4 * (depth * (width * width + width) + 10 * width + 10)
        backend = RayBackend(functools.partial(_app, size, clients), num_actors=2, model_bytes=model_bytes)
        server, nbytes = _server(size, clients, backend, accumulate)
        server.run()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            names = [f"p{i}" for i in range(clients)]
            init_ca(folder / "certs")
            for name in ("server", *names):
                issue(folder / "certs", name)
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            fed_path = folder / "federation.toml"
            (folder / "spool").mkdir()
            fed_path.write_text('[federation]\nca_cert = "certs/ca.crt"\n'
                                + ('reply_spool_dir = "spool"\n' if spool else "")
                                + (f"receive_window_bytes = {window}\n" if window else "")
                                + '[[parties]]\nname = "server"\n'
                                f'role = "coordinator"\naddress = "127.0.0.1:{port}"\n'
                                + "".join(f'[[parties]]\nname = "{n}"\nrole = "client"\n' for n in names))
            fed = load_federation(fed_path)
            routes = {f"c{i}": n for i, n in enumerate(names)}
            backend = GrpcBackend(fed, routes, min_clients=clients, return_memory=True)  # as `tessera coordinator`
            server, nbytes = _server(size, clients, backend, accumulate)
            ctx = multiprocessing.get_context("spawn")
            procs = [ctx.Process(target=_party, args=(str(fed_path), n, c, (size, clients), str(folder / f"{n}.json")))
                     for c, n in routes.items()]
            for p in procs:
                p.start()
            try:
                server.run()
            finally:
                for p in procs:
                    p.join(120)
            parties = [json.loads((folder / f"{n}.json").read_text()) for n in names]
    seconds = [r["seconds"] for r in server.history.records]
    checksum = float(sum(v.double().sum() for v in server.params.values()))
    return {"kind": kind, "size": size, "clients": clients, "accumulate": accumulate, "spool": spool,
            "window": window, "round_seconds": seconds,
            "model_gib": nbytes / 1024**3,
            "peak_rss_gib": _rss() / 1024**3, "base_rss_gib": base / 1024**3, "parties": parties,
            "checksum": checksum}


def run_point(kind: str, size: str, clients: int, repeats: int, accumulate: str = "float64", *,
              spool: bool = False, window: int | None = None) -> dict[str, Any]:
    """The point measured `repeats` times, each in a fresh process: the fastest run's time (other jobs on the
    shared machine only ever add time) and the largest peak RSS."""
    runs = []
    for _ in range(repeats):
        flags = ["--accumulate", accumulate, "--spool", "on" if spool else "off"]
        flags += ["--window", str(window)] if window else []
        out = subprocess.run([sys.executable, __file__, "--point", kind, size, str(clients), *flags], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        runs.append(dict(json.loads(out.stdout.strip().splitlines()[-1])))
    if "seconds" not in runs[0]:
        return runs[0]
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "peak_rss_gib": max(r["peak_rss_gib"] for r in runs), "all_seconds": [r["seconds"] for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--point", nargs=3, metavar=("KIND", "SIZE", "CLIENTS"))
    ap.add_argument("--sizes", default="1M,50M", help="comma-separated subset of 1M,50M,200M")
    ap.add_argument("--clients", default="2,8")
    ap.add_argument("--name", default="model_size")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per point (fastest time is kept)")
    ap.add_argument("--grpc", default="", help="comma-separated client counts for the deployed 50M point (e.g. 1,3)")
    ap.add_argument("--ray", default="", help="client counts for the 50M point on Ray with 2 actors (e.g. 4)")
    ap.add_argument("--accumulate", default="float64,float32",
                    help="the coordinator's accumulation dtypes for the deployed points (FedAvg(accumulate=...))")
    ap.add_argument("--spool", default="off", help="deployed points with reply_spool_dir: off, on or off,on")
    ap.add_argument("--window", type=int, default=None,
                    help="deployed points with this fixed receive_window_bytes (default: gRPC's probed window)")
    args = ap.parse_args()
    if args.point:
        kind, size, clients = args.point
        if kind in ("grpc", "inproc", "ray"):
            print(json.dumps(deployed_point(kind, size, int(clients), args.accumulate.split(",")[0],
                                            spool=args.spool == "on", window=args.window)))
        else:
            print(json.dumps(point(kind, size, int(clients))))
        return
    rows: list[list[Any]] = []
    points: list[dict[str, Any]] = []
    for size in (s for s in args.sizes.split(",") if s):
        for clients in (int(c) for c in args.clients.split(",")):
            if size == "200M" and clients > 2:
                continue  # 200M x 8 adds nothing the 2-client point does not show, at 8x the time
            reps = 1 if size == "200M" else args.repeats
            p, t = run_point("plain", size, clients, reps), run_point("tessera", size, clients, reps)
            points += [p, t]
            rows.append([size, clients, p["seconds"], t["seconds"], t["seconds"] / p["seconds"],
                         p["peak_rss_gib"], t["peak_rss_gib"], t["peak_rss_gib"] / p["peak_rss_gib"]])
            print(json.dumps(rows[-1]), file=sys.stderr)
    modes = [(a, sp == "on") for a in args.accumulate.split(",") for sp in args.spool.split(",")]
    for acc, spool in (m for m in modes if args.grpc):
        for clients in (int(c) for c in args.grpc.split(",") if c):
            local = run_point("inproc", "50M", clients, 1, acc)
            remote = run_point("grpc", "50M", clients, 1, acc, spool=spool, window=args.window)
            acc_label = acc + (", spool" if spool else "")
            acc_label += f", window {args.window >> 20} MiB" if args.window else ""
            points += [local, remote]
            model, coord, base = remote["model_gib"], remote["peak_rss_gib"], remote["base_rss_gib"]
            worst = max(p["peak_rss_gib"] for p in remote["parties"])
            print(json.dumps({"grpc_clients": clients, "accumulate": acc, "spool": spool,
                              "round_s": remote["round_seconds"],
                              "inproc_round_s": local["round_seconds"], "coordinator_gib": coord,
                              "coordinator_base_gib": base, "client_gib": worst, "model_gib": model,
                              "same_params": remote["checksum"] == local["checksum"]}), file=sys.stderr)
            # RSS x for the coordinator: model sizes above the process before the model existed (interpreter,
            # torch, gRPC: 0.26-0.30 GiB here), which is what grows with the model
            rows.append([f"50M gRPC coord ({acc_label})", clients, local["round_seconds"][-1],
                         remote["round_seconds"][-1], remote["round_seconds"][-1] / local["round_seconds"][-1],
                         model, coord, (coord - base) / model])
            rows.append([f"50M gRPC client ({acc_label})", clients, "", "", "", model, worst, worst / model])
    for clients in (int(c) for c in args.ray.split(",") if c):
        local, remote = run_point("inproc", "50M", clients, 1), run_point("ray", "50M", clients, 1)
        points += [local, remote]
        print(json.dumps({"ray_clients": clients, "round_s": remote["round_seconds"],
                          "inproc_round_s": local["round_seconds"],
                          "same_params": remote["checksum"] == local["checksum"]}), file=sys.stderr)
        rows.append(["50M Ray (2 actors)", clients, local["round_seconds"][-1], remote["round_seconds"][-1],
                     remote["round_seconds"][-1] / local["round_seconds"][-1], remote["model_gib"],
                     remote["peak_rss_gib"], (remote["peak_rss_gib"] - remote["base_rss_gib"]) / remote["model_gib"]])
    headline = [r for r in rows if r[0] == "50M" and r[1] == 8]
    coords = [r for r in rows if "coord" in str(r[0])]
    ratio = headline[0][4] if headline else (coords or rows)[-1][4]
    report(args.name, ["size", "clients", "plain s", "tessera s", "time x", "plain GiB", "tessera GiB", "RSS x"],
           rows, ratio=ratio, ratio_means="tessera / plain wall time, 50M params x 8 clients, 2 rounds",
           extra={"points": points})


if __name__ == "__main__":
    main()
