"""Failure handling of the gRPC backend over real loopback mTLS, in one process: network blips, deadlines,
identity refusals with a request in flight, outgoing size limits, and the redial schedule.

Oracles: the reply equals what the handler computes from the exact request; a failure names its cause; the
backoff schedule equals the hand-computed one.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from tessera.core.errors import TransportError
from tessera.core.serde import encode_message
from tessera.runtime.backend import ClientFailure
from tessera.runtime.grpc import ClientParty, GrpcBackend
from tessera.runtime.grpc import transport as tp
from tessera.runtime.grpc.config import FederationConfig, RetrySection, build
from tessera.runtime.grpc.party import backoff_delays
from tessera.runtime.messages import EvaluateIns, EvaluateRes, FitIns, FitRes
from tests.e2e.grpc_helpers import open_session
from tests.runtime.test_grpc_backend import ROUTES, Echo, _fed


def _until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


class Proxy:
    """A TCP relay between clients and the coordinator; `cut()` drops every open connection (a network blip)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.server.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [a, b]
            self.accepted += 1
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.conns = []

    def close(self) -> None:
        self.cut()
        self.server.close()


class _Running:
    def __init__(self, certs: Path, names: tuple[str, ...], *, via_proxy: bool = False, **settings: Any) -> None:
        self.backend = GrpcBackend(_fed(certs, **settings), dict(ROUTES), min_clients=1)
        port = self.backend.listen()
        self.proxy = Proxy(port) if via_proxy else None
        self.fed: FederationConfig = _fed(certs, self.proxy.port if self.proxy else port, **settings)
        self.echo = Echo()
        self.clients: dict[str, ClientParty] = {}
        self.threads: list[threading.Thread] = []
        self.errors: dict[str, TransportError] = {}
        self.add_clients(names)

    def add_clients(self, names: tuple[str, ...]) -> None:
        """Start client parties `names` (threads) and wait until they are connected."""
        for n in names:
            self.clients[n] = ClientParty(self.fed, n, self.echo)
            self.threads.append(threading.Thread(target=self._run, args=(n,), daemon=True))
            self.threads[-1].start()
        cids = [c for c, p in ROUTES.items() if p in names]
        assert self.backend.wait_for(cids, 20) == cids

    def _run(self, name: str) -> None:
        try:
            self.clients[name].run()
        except TransportError as exc:  # a client the coordinator refused for good; tests read it from here
            self.errors[name] = exc

    def close(self) -> None:
        self.echo.release.set()
        self.backend.close()
        if self.proxy is not None:
            self.proxy.close()
        for t in self.threads:
            t.join(10)


def test_backoff_schedule_grows_by_the_multiplier_up_to_the_cap() -> None:
    retry = RetrySection(initial_backoff_s=0.5, max_backoff_s=3.0, multiplier=2.0)
    assert list(itertools.islice(backoff_delays(retry), 6)) == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_client_reconnects_after_a_network_blip_and_serves_the_next_round(start: Any) -> None:
    r = start(("alice", "bob"), via_proxy=True, rejoin_wait_s=20,
              retry={"initial_backoff_s": 0.05, "max_backoff_s": 0.2, "max_attempts": 50})
    msg = FitIns(round=1, params={"w": torch.zeros(4)})
    assert all(isinstance(x, FitRes) for x in r.backend.exchange({"c0": msg, "c1": msg}).values())
    r.proxy.cut()  # every TCP connection drops; the client processes stay up
    _until(lambda: r.backend.connected() == [] or r.proxy.accepted > 2)
    replies = r.backend.exchange({"c0": FitIns(round=2, params={"w": torch.ones(4)}),
                                  "c1": FitIns(round=2, params={"w": torch.ones(4)})})  # waits for the rejoin
    assert all(isinstance(x, FitRes) and torch.equal(x.params["w"], torch.full((4,), 2.0)) for x in replies.values())
    assert [c.stats.connections for c in r.clients.values()] == [2, 2]
    assert r.proxy.accepted == 4


def test_rpc_deadline_from_federation_toml_fails_a_silent_client(start: Any) -> None:
    r = start(("alice", "bob"), rpc_deadline_s=0.5)
    replies = r.backend.exchange({c: EvaluateIns(round=1, params={}, config={"block": "c0"}) for c in ("c0", "c1")})
    assert isinstance(replies["c0"], ClientFailure) and "no reply within 0.5 s" in replies["c0"].reason
    assert isinstance(replies["c1"], EvaluateRes) and replies["c1"].loss == 1.0


def test_an_oversize_request_fails_that_client_only(start: Any) -> None:
    r = start(("alice", "bob"), max_message_bytes=65536)
    big = FitIns(round=1, params={"w": torch.zeros(20_000)})
    replies = r.backend.exchange({"c0": big, "c1": FitIns(round=1, params={"w": torch.zeros(2)})})
    assert isinstance(replies["c0"], ClientFailure)
    assert f"FitIns of {len(encode_message(big))} bytes exceeds max_message_bytes=65536" in replies["c0"].reason
    assert isinstance(replies["c1"], FitRes)
    assert r.backend.connected() == ["c0", "c1"] and r.clients["alice"].stats.connections == 1


def test_an_impostor_cannot_answer_a_request_in_flight(start: Any, certs: Path) -> None:
    r = start(("alice",))
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(r.backend.exchange(
        {"c0": EvaluateIns(round=7, params={}, config={"block": "c0"})})))
    t.start()
    forged = [tp.control(tp.Kind.HELLO, b"alice"),
              *(f for i in range(1, 4) for f in tp.split(i, encode_message(EvaluateRes(loss=666.0, num_examples=1)),
                                                         16384))]
    # bob's genuine certificate, claiming to be alice, with well-formed replies to the pending request ids
    assert open_session(r.fed, cert=certs / "bob.crt", claim="alice", send=forged) == grpc.StatusCode.PERMISSION_DENIED
    assert r.backend.refused[-1].claimed == "alice" and "not issued to 'alice'" in r.backend.refused[-1].reason
    r.echo.release.set()
    t.join(20)
    assert isinstance(result["c0"], EvaluateRes) and result["c0"].loss == 7.0


def test_a_peer_that_never_says_hello_is_closed(start: Any, certs: Path) -> None:
    r = start(("alice",), hello_deadline_s=0.3)
    hold = threading.Event()

    def silent() -> Iterator[bytes]:
        hold.wait(20)
        yield from ()

    try:
        status = open_session(r.fed, cert=certs / "carol.crt", claim="carol", send=silent())
        assert status == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        hold.set()
    assert "c2" not in r.backend.connected() and "no HELLO" in r.backend.refused[-1].reason


def test_a_client_refuses_a_coordinator_whose_certificate_names_another_party(certs: Path) -> None:
    def fed(port: int, cert: str) -> FederationConfig:
        parties = [{"name": "server", "role": "coordinator", "address": f"127.0.0.1:{port}", "cert": f"{cert}.crt",
                    "key": f"{cert}.key"}, *({"name": n} for n in ROUTES.values())]
        settings = {"ca_cert": "ca.crt", "certs_dir": ".", "retry": {"initial_backoff_s": 0.01, "max_attempts": 2}}
        return build({"federation": settings, "parties": parties}, source="test", base=certs)

    impostor = GrpcBackend(fed(0, "alice"), dict(ROUTES))  # a genuine certificate, but alice's, not "server"'s
    port = impostor.listen()
    try:
        with pytest.raises(TransportError, match="could not reach the coordinator"):
            ClientParty(fed(port, "server"), "bob", Echo()).run()
        assert impostor.connected() == [] and impostor.refused == []  # no stream was ever opened
    finally:
        impostor.close()
