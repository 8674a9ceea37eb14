"""Helpers for the gRPC end-to-end tests: certificates and config files in tmp_path, party processes whose
output is read line by line (so tests await events instead of sleeping), and raw gRPC attackers."""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from tessera.runtime.grpc import transport as tp
from tessera.runtime.grpc.certs import init_ca, issue
from tessera.runtime.grpc.config import load_federation

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
                     extra: str = "", retry: str = "") -> Path:
    parties = "".join(f'\n[[parties]]\nname = "{c}"\nrole = "client"\n' for c in clients)
    path.write_text(
        f'[federation]\nca_cert = "{certs}/ca.crt"\ncerts_dir = "{certs}"\nchunk_bytes = 16384\n'
        f"rpc_deadline_s = 60\nround_deadline_s = 60\nquorum_deadline_s = 60\n{extra}\n"
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


class Party:
    """A `python -m tessera party` process whose stdout lines are queued for `expect`."""

    def __init__(self, fed: Path, name: str, job: Path, *, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    "COLUMNS": "200", **(env or {})}
        self.name = name
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "tessera", "party", "--federation", str(fed), "--name", name, "--job", str(job),
             "--no-plots", *args],
            cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
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

    def wait(self, timeout: float = 90.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout} s:\n" + "".join(self.log[-30:])) \
                from None

    def output(self) -> str:
        return "".join(self.log)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextmanager
def parties() -> Iterator[list[Party]]:
    """Collects started parties; every one still alive is killed on exit, whatever happened."""
    started: list[Party] = []
    try:
        yield started
    finally:
        for p in started:
            p.kill()


def attack(fed_path: Path, *, claim: str, cert: Path | None, send: list[bytes] | None = None,
           timeout: float = 20.0) -> grpc.StatusCode:
    """Open a session as `claim` presenting `cert` (with the .key beside it; None = no client certificate),
    send raw frames, and return the status the coordinator ended the stream with."""
    fed = load_federation(fed_path)
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
