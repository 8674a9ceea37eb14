"""Helpers for the gRPC end-to-end tests: certificates and config files in tmp_path, party processes whose
output is read line by line (so tests await events instead of sleeping), and raw gRPC attackers."""

from __future__ import annotations

import io
import multiprocessing
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import grpc
import torch
from torch import nn

from tessera.runtime.backend import Backend
from tessera.runtime.grpc import transport as tp
from tessera.runtime.grpc.certs import init_ca, issue
from tessera.runtime.grpc.config import FederationConfig, load_federation
from tessera.vertical import ConcatFuse, DataOwner, SplitTrainer

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
CLIENTS = ("alice", "bob", "carol")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_certs(folder: Path, names: tuple[str, ...]) -> Path:
    init_ca(folder)
    for n in names:
        issue(folder, n)
    return folder


def write_federation(path: Path, *, port: int, clients: tuple[str, ...] = CLIENTS, certs: str = "certs",
                     extra: str = "", retry: str = "", rpc_deadline: float = 60) -> Path:
    parties = "".join(f'\n[[parties]]\nname = "{c}"\nrole = "client"\n' for c in clients)
    path.write_text(
        f'[federation]\nca_cert = "{certs}/ca.crt"\ncerts_dir = "{certs}"\nchunk_bytes = 16384\n'
        f"rpc_deadline_s = {rpc_deadline}\nround_deadline_s = 60\nquorum_deadline_s = 60\n{extra}\n"
        f"[federation.retry]\nmax_attempts = 40\ninitial_backoff_s = 0.2\nmax_backoff_s = 1.0\n{retry}\n"
        f'[[parties]]\nname = "server"\nrole = "coordinator"\naddress = "127.0.0.1:{port}"\n{parties}'
    )
    return path


JOB = """[job]
name = "e2e"
rounds = {rounds}
seed = 7
output_dir = "{out}"

[data]
dataset = "digits"
num_clients = {clients}
partition = "iid"

[model]
name = "mlp"
hidden = [16]

[train]
local_epochs = 1
batch_size = 64
lr = 0.1

[strategy]
name = "fedavg"
min_available = 2
"""


def write_job(path: Path, *, out: Path, rounds: int = 3, clients: int = 3) -> Path:
    path.write_text(JOB.format(rounds=rounds, out=out, clients=clients))
    return path


PRELOAD = ["torch", "torch._dynamo", "sklearn.datasets", "tessera.cli.main", "tessera.cli.jobs", "tessera.vertical",
           "tessera.privacy", "tessera.secagg"]


def _forkserver() -> Any:
    """Party processes fork from a server that imported torch and tessera once (gRPC is not imported before the
    fork): each party then starts in well under a second instead of several, on 2 shared cores."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


# Fault injection, so failure tests are deterministic instead of racing a signal against the protocol: a party
# started with env {FAULT_ENV: "kill:FitIns:2"} SIGKILLs itself on receiving the FitIns of round 2;
# "stop:ForwardIns:5" makes it SIGSTOP itself (silent, connection open) on the ForwardIns of step 5.
FAULT_ENV = "TESSERA_TEST_FAULT"


class Faulty:
    """Wraps a party's handler: kills or freezes this process on the request named by `spec` (see FAULT_ENV)."""

    def __init__(self, handler: Any, spec: str) -> None:
        self.handler, self.spec = handler, spec
        action, self.kind, at = spec.split(":")
        self.at = int(at)
        self.sig = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}[action]

    def handle(self, client: str, msg: Any) -> Any:
        if type(msg).__name__ == self.kind and getattr(msg, "round", getattr(msg, "step", None)) == self.at:
            print(f"fault {self.spec}: signalling this process", flush=True)
            os.kill(os.getpid(), self.sig)
        return self.handler.handle(client, msg)


def install_fault(spec: str) -> None:
    """Every ClientParty this process creates serves its handler through `Faulty(handler, spec)`."""
    from tessera.runtime.grpc.party import ClientParty

    init = ClientParty.__init__

    def faulty_init(self: ClientParty, fed: FederationConfig, name: str, handler: Any, **kw: Any) -> None:
        init(self, fed, name, Faulty(handler, spec), **kw)

    ClientParty.__init__ = faulty_init  # type: ignore[method-assign]


def _run_cli(argv: list[str], env: dict[str, str], out: Any) -> None:
    """Child of the fork server: the `tessera` CLI with stdout/stderr going to the test's pipe (and the fault of
    `env[FAULT_ENV]` installed, if any)."""
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    out.close()
    os.environ.update(env)
    if env.get(FAULT_ENV):
        install_fault(env[FAULT_ENV])
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True)
    import torch

    torch.set_num_threads(1)
    sys.argv = ["tessera", *argv]
    from tessera.cli.main import main

    main()


class SplitApp:
    """The split job of the e2e tests (`--split tests.e2e.grpc_helpers:SplitApp`): data owners alice and bob hold
    4 and 6 columns of the same 48 rows; the label party (the coordinator) holds the labels and a concat fuse."""

    FIT: ClassVar[dict[str, Any]] = {"epochs": 3, "batch_size": 16}  # 3 steps per epoch
    COLUMNS: ClassVar[dict[str, int]] = {"alice": 4, "bob": 6}

    @staticmethod
    def data() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        g = torch.Generator().manual_seed(3)
        x = {p: torch.randn(48, c, generator=g) for p, c in SplitApp.COLUMNS.items()}
        return x, ((x["alice"].sum(1) - x["bob"][:, :3].sum(1)) > 0).float().unsqueeze(1)

    @staticmethod
    def owner(name: str, out: Path) -> DataOwner:
        x, _ = SplitApp.data()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(len(name))
            base = nn.Sequential(nn.Linear(SplitApp.COLUMNS[name], 3), nn.Tanh())
        return DataOwner(name, base, lambda p: torch.optim.SGD(p, lr=0.3), data={"train": x[name]}, state_dir=out)

    @staticmethod
    def label_party(name: str, backend: Backend, out: Path) -> SplitTrainer:
        _, y = SplitApp.data()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            fuse = ConcatFuse(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1)))
        trainer = SplitTrainer(fuse=fuse, loss_fn=nn.BCEWithLogitsLoss(), optimizer_fn=lambda p: torch.optim.SGD(
            p, lr=0.3), label_party=name, order=list(SplitApp.COLUMNS), backend=backend, output_dir=out)
        trainer.add_split("train", y=y)
        return trainer


class Party:
    """A `tessera party` OS process whose stdout lines are queued for `expect`.

    By default it is forked from a warm fork server (same CLI code path, separate process, real sockets);
    `exec_cli=True` starts a fresh `python -m tessera party` instead, as a user would.
    """

    def __init__(self, fed: Path, name: str, job: Path | None = None, *, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = (), exec_cli: bool = False) -> None:
        env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200",
               **(env or {})}
        argv = ["party", "--federation", str(fed), "--name", name, "--no-plots", *args]
        if job is not None:
            argv += ["--job", str(job)]
        self.name = name
        self.proc: Any
        if exec_cli:
            assert FAULT_ENV not in env, "faults are installed by the fork-server entry (_run_cli), not exec_cli"
            self.proc = subprocess.Popen([PYTHON, "-m", "tessera", *argv], cwd=ROOT, env={**os.environ, **env},
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            stream = self.proc.stdout
        else:
            ctx = _forkserver()
            r, w = ctx.Pipe(duplex=False)
            self.proc = ctx.Process(target=_run_cli, args=(argv, env, w), daemon=False)
            self.proc.start()
            w.close()
            stream = os.fdopen(os.dup(r.fileno()), encoding="utf-8", errors="replace")
            r.close()
        self.pid: int = self.proc.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        with stream:
            for line in stream:
                self.log.append(line)
                self.lines.put(line)
        self.lines.put(None)

    def expect(self, pattern: str, timeout: float = 60.0) -> str:
        """Block until a line matches (the process prints it when the event happened)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{self.name}: no line matching {pattern!r} within {timeout} s:\n"
                                     + "".join(self.log[-30:])) from None
            if line is None:
                raise AssertionError(f"{self.name} exited before {pattern!r}:\n" + "".join(self.log[-30:]))
            if re.search(pattern, line):
                return line

    def poll(self) -> int | None:
        if isinstance(self.proc, subprocess.Popen):
            return self.proc.poll()
        return self.proc.exitcode  # type: ignore[no-any-return]

    def wait(self, timeout: float = 90.0) -> int:
        """The exit code (negative: killed by that signal)."""
        if isinstance(self.proc, subprocess.Popen):
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        else:
            self.proc.join(timeout)
            if self.proc.exitcode is not None:
                return self.proc.exitcode  # type: ignore[no-any-return]
        raise AssertionError(f"{self.name} still running after {timeout} s:\n" + "".join(self.log[-30:]))

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_stopped(self, timeout: float = 60.0) -> None:
        """Until the process has frozen itself (state T), e.g. through a "stop:..." fault hook."""
        deadline = time.monotonic() + timeout
        stat = Path(f"/proc/{self.pid}/stat")
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
            if time.monotonic() > deadline or self.poll() is not None:
                raise AssertionError(f"{self.name} did not stop:\n" + "".join(self.log[-30:]))
            time.sleep(0.02)

    def output(self) -> str:
        return "".join(self.log)

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGCONT)  # a stopped process must run to die cleanly
            os.kill(self.pid, signal.SIGKILL)
            self.wait(10)


@contextmanager
def parties() -> Iterator[list[Party]]:
    """Collects started parties; every one still alive is killed on exit, whatever happened."""
    started: list[Party] = []
    try:
        yield started
    finally:
        for p in started:
            p.kill()


def run_to_end(fed: Path, job: Path, *, args: tuple[str, ...] = ()) -> str:
    """The coordinator (with `args`) and every client of CLIENTS run `job` to the end; each must exit 0. Returns
    the coordinator's output."""
    with parties() as ps:
        coord = Party(fed, "server", job, args=args)
        ps.append(coord)
        coord.expect("listening on port")
        ps += [Party(fed, n, job) for n in CLIENTS]
        assert coord.wait() == 0, coord.output()
        for p in ps[1:]:
            assert p.wait() == 0, p.output()
        return coord.output()


def attack(fed_path: Path, *, claim: str, cert: Path | None, send: list[bytes] | None = None,
           timeout: float = 20.0) -> grpc.StatusCode:
    """`open_session` against the coordinator of the federation.toml at `fed_path`."""
    return open_session(load_federation(fed_path), claim=claim, cert=cert, send=send, timeout=timeout)


def open_session(fed: FederationConfig, *, claim: str, cert: Path | None, send: Iterable[bytes] | None = None,
                 timeout: float = 20.0) -> grpc.StatusCode:
    """Open a session as `claim` presenting `cert` (with the .key beside it; None = no client certificate),
    send raw frames (a list, or a generator that may hold the stream open), and return the status the coordinator
    ended the stream with."""
    ca = fed.ca_cert.read_bytes()
    if cert is None:
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=cert.with_suffix(".key").read_bytes(),
                                             certificate_chain=cert.read_bytes())
    options = [*tp.channel_options(fed), ("grpc.ssl_target_name_override", "server")]
    assert fed.coordinator.address is not None
    with grpc.secure_channel(fed.coordinator.address, creds, options=options) as channel:
        call = channel.stream_stream(tp.FULL_METHOD, request_serializer=None, response_deserializer=None)(
            iter(send or []), metadata=((tp.PARTY_KEY, claim),), timeout=timeout)
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK
