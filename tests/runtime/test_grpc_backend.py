"""GrpcBackend and ClientParty in one process over real loopback gRPC + mTLS (threads instead of processes).

Oracles: replies equal what the handler computed from the exact request; byte counts equal the encoded message
sizes; a failing, silent, absent or misbehaving client becomes a ClientFailure while the others are served.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
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
from tessera.runtime.grpc.config import FederationConfig, build
from tessera.runtime.messages import EvaluateIns, EvaluateRes, FitIns, FitRes

ROUTES = {"c0": "alice", "c1": "bob", "c2": "carol"}


class Echo:
    """Replies params + 1; EvaluateIns with config fail=... raises; config block=... waits for `release`."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def handle(self, client: str, msg: Any) -> Any:
        if isinstance(msg, EvaluateIns):
            if msg.config.get("fail") == client:
                raise ValueError("no test data here")
            if msg.config.get("block") == client:
                self.release.wait(30)
            return EvaluateRes(loss=float(msg.round), num_examples=len(client))
        return FitRes(params={k: v + 1 for k, v in msg.params.items()}, num_examples=int(client[1:]) + 1)


def _fed(certs: Path, port: int = 0, **settings: Any) -> FederationConfig:
    parties = [{"name": "server", "role": "coordinator", "address": f"127.0.0.1:{port}"},
               *({"name": n} for n in ROUTES.values())]
    fed = {"ca_cert": "ca.crt", "certs_dir": ".", "chunk_bytes": 16384, "quorum_deadline_s": 20,
           "rpc_deadline_s": 20, "retry": {"initial_backoff_s": 0.05, "max_attempts": 50}, **settings}
    return build({"federation": fed, "parties": parties}, source="test", base=certs)


@contextlib.contextmanager
def _federation(certs: Path, **settings: Any) -> Iterator[tuple[GrpcBackend, Echo, dict[str, ClientParty],
                                                                   FederationConfig]]:
    """A coordinator and alice + bob (threads) serving an Echo; carol stays away. `settings` go to federation.toml."""
    backend = GrpcBackend(_fed(certs, **settings), dict(ROUTES), min_clients=2)
    fed = _fed(certs, backend.listen(), **settings)
    echo = Echo()
    clients = {n: ClientParty(fed, n, echo) for n in ("alice", "bob")}
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients.values()]
    for t in threads:
        t.start()
    try:
        assert backend.wait_for(["c0", "c1"], 20) == ["c0", "c1"]
        yield backend, echo, clients, fed
    finally:
        echo.release.set()
        backend.close()
        for t in threads:
            t.join(10)


@pytest.fixture
def running(certs: Path) -> Iterator[tuple[GrpcBackend, Echo, dict[str, ClientParty], FederationConfig]]:
    with _federation(certs) as parts:
        yield parts


def test_large_params_cross_in_many_chunks_and_bytes_are_counted(running: Any) -> None:
    backend, _, clients, _ = running
    big = FitIns(round=1, params={"w": torch.arange(300_000, dtype=torch.float32), "b": torch.ones(3)})
    small = FitIns(round=1, params={"w": torch.zeros(2)})
    replies = backend.exchange({"c0": big, "c1": small})
    assert list(replies) == ["c0", "c1"]
    assert torch.equal(replies["c0"].params["w"], torch.arange(300_000, dtype=torch.float32) + 1)
    assert torch.equal(replies["c1"].params["w"], torch.ones(2)) and replies["c1"].num_examples == 2
    sizes = {c: (len(encode_message(req)), len(encode_message(replies[c]))) for c, req in (("c0", big), ("c1", small))}
    assert backend.traffic.per_client == sizes
    assert len(encode_message(big)) > 70 * 16384  # really chunked: > 70 frames
    assert clients["alice"].stats.client_id == "c0" and clients["bob"].stats.client_id == "c1"


def test_absent_failing_and_silent_clients_fail_alone(running: Any) -> None:
    backend, echo, _, _ = running
    replies = backend.exchange({c: EvaluateIns(round=1, params={}, config={"fail": "c1"}) for c in ROUTES})
    assert isinstance(replies["c0"], EvaluateRes) and replies["c0"].loss == 1.0
    assert isinstance(replies["c1"], ClientFailure) and "ValueError: no test data here" in replies["c1"].reason
    assert isinstance(replies["c2"], ClientFailure) and "carol is not connected" in replies["c2"].reason
    silent = backend.exchange({c: EvaluateIns(round=2, params={}, config={"block": "c0"}) for c in ("c0", "c1")},
                              timeout=0.5)
    assert isinstance(silent["c0"], ClientFailure) and "no reply within 0.5 s" in silent["c0"].reason
    assert isinstance(silent["c1"], EvaluateRes)
    echo.release.set()  # alice's late reply to round 2 is dropped; the next exchange gets the right answer
    again = backend.exchange({"c0": EvaluateIns(round=3, params={})})
    assert isinstance(again["c0"], EvaluateRes) and again["c0"].loss == 3.0


def _raw_session(fed: FederationConfig, certs: Path, frames: list[bytes]) -> grpc.StatusCode:
    creds = grpc.ssl_channel_credentials((certs / "ca.crt").read_bytes(), (certs / "carol.key").read_bytes(),
                                         (certs / "carol.crt").read_bytes())
    assert fed.coordinator.address is not None
    with grpc.secure_channel(fed.coordinator.address, creds,
                             options=[("grpc.ssl_target_name_override", "server")]) as ch:
        call = ch.stream_stream(tp.FULL_METHOD, request_serializer=None, response_deserializer=None)(
            iter(frames), metadata=((tp.PARTY_KEY, "carol"),), timeout=20)
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("after_hello", "code"), [
    (tp.HEADER.pack(tp.MAGIC, tp.Kind.DATA, 1, 0, 1, 4, 0) + b"abcd", grpc.StatusCode.INVALID_ARGUMENT),
    (tp.HEADER.pack(tp.MAGIC, tp.Kind.DATA, 1, 0, 1, 2**33, 0) + b"x", grpc.StatusCode.RESOURCE_EXHAUSTED),
    (b"\x00" * (16384 + 8192), grpc.StatusCode.RESOURCE_EXHAUSTED),  # over gRPC's own message limit
    (tp.control(tp.Kind.BYE), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_a_bad_frame_closes_only_that_stream(running: Any, certs: Path, after_hello: bytes,
                                             code: grpc.StatusCode) -> None:
    backend, _, clients, fed = running
    hello = tp.control(tp.Kind.HELLO, b"carol")
    assert _raw_session(fed, certs, [hello, after_hello]) == code
    assert "c2" not in backend.connected()
    replies = backend.exchange({"c0": FitIns(round=1, params={"w": torch.zeros(1)}),
                                "c1": FitIns(round=1, params={"w": torch.zeros(1)})})
    assert all(isinstance(r, FitRes) for r in replies.values())
    assert clients["alice"].stats.connections == 1 and clients["bob"].stats.connections == 1


def test_quorum_not_reached_names_who_is_missing(certs: Path) -> None:
    backend = GrpcBackend(_fed(certs, quorum_deadline_s=0.2), dict(ROUTES), min_clients=1)
    try:
        with pytest.raises(TransportError, match=r"only 0 of 3 clients joined.*'alice', 'bob', 'carol'"):
            backend.start(list(ROUTES))
    finally:
        backend.close()


def test_a_client_that_cannot_reach_the_coordinator_gives_up_with_advice(certs: Path) -> None:
    fed = _fed(certs, 1, retry={"initial_backoff_s": 0.01, "max_attempts": 2})  # nothing listens on port 1
    with pytest.raises(TransportError, match="after 2 attempts; check the address"):
        ClientParty(fed, "alice", Echo()).run()


def test_client_stop_leaves_cleanly(running: Any) -> None:
    backend, _, _, fed = running
    carol = ClientParty(fed, "carol", Echo())
    t = threading.Thread(target=carol.run, daemon=True)
    t.start()
    assert backend.wait_for(["c2"], 20) == ["c2"]
    carol.stop()
    t.join(10)
    assert not t.is_alive() and carol.stats.connections == 1


def test_exchange_each_folds_each_reply_as_it_arrives_not_in_request_order(running: Any) -> None:
    """c0 is held until c1's reply has been folded: only a backend that hands over each reply on arrival lets c0
    finish within the exchange (in request order it would wait for c0 first and time it out)."""
    backend, echo, _, _ = running
    order: list[str] = []

    def fold(cid: str, reply: Any) -> Any:
        order.append(cid)
        if cid == "c1":
            echo.release.set()
        return ("folded", type(reply).__name__)

    ins = EvaluateIns(round=1, params={"w": torch.ones(3)}, config={"block": "c0"})
    kept = backend.exchange_each({"c0": ins, "c1": ins, "c2": ins}, fold, timeout=15)
    assert order == ["c2", "c1", "c0"]  # carol never connected: failed before anything was sent
    assert kept == {"c0": ("folded", "EvaluateRes"), "c1": ("folded", "EvaluateRes"),
                    "c2": ("folded", "ClientFailure")}
    assert list(kept) == ["c0", "c1", "c2"]


@pytest.fixture
def one_at_a_time(certs: Path) -> Iterator[tuple[GrpcBackend, Echo]]:
    """A coordinator whose reply budget admits one reply at a time (reply_buffer_bytes=0)."""
    with _federation(certs, reply_buffer_bytes=0) as (backend, echo, _, _):
        yield backend, echo


def test_replies_are_reassembled_one_at_a_time_within_the_budget(one_at_a_time: Any) -> None:
    """However many clients reply at once, the coordinator holds one reply's buffer: the budget's peak is the
    largest single reply, never the sum, and every reply still arrives intact."""
    backend, _ = one_at_a_time
    ins = {c: FitIns(round=1, params={"w": torch.full((200_000,), float(i))}) for i, c in enumerate(("c0", "c1"))}
    seen: list[int] = []

    def fold(cid: str, reply: Any) -> Any:
        seen.append(backend.budget.held)  # while a reply is being folded, only it is held
        return float(reply.params["w"][0])

    for _ in range(3):
        assert backend.exchange_each(ins, fold) == {"c0": 1.0, "c1": 2.0}
    size = len(encode_message(FitRes(params={"w": torch.zeros(200_000)}, num_examples=1)))
    assert backend.budget.peak == size and set(seen) == {size} and backend.budget.held == 0


def test_a_fold_that_raises_gives_the_budget_back(one_at_a_time: Any) -> None:
    backend, _ = one_at_a_time
    ins = {c: FitIns(round=1, params={"w": torch.zeros(50_000)}) for c in ("c0", "c1")}

    def boom(cid: str, reply: Any) -> Any:
        raise RuntimeError("fold failed")

    with pytest.raises(RuntimeError, match="fold failed"):
        backend.exchange_each(ins, boom)
    replies = backend.exchange(ins)  # the next exchange is not starved by the first one's replies
    assert all(isinstance(r, FitRes) for r in replies.values()) and backend.budget.held == 0


def test_fit_replies_decoded_from_the_wire_are_marked_owned(running: Any) -> None:
    from tessera.core.types import OwnedParams

    backend, _, _, _ = running
    reply = backend.exchange({"c0": FitIns(round=1, params={"w": torch.zeros(3)})})["c0"]
    assert isinstance(reply.params, OwnedParams) and reply.params["w"].tolist() == [1.0, 1.0, 1.0]


class Lender(Echo):
    """Replies with one tensor it refills for every request (a client model's params, lent rather than copied)."""

    def __init__(self) -> None:
        super().__init__()
        self.lent = False
        self.buf = torch.zeros(100_000)

    def lend_replies(self, lend: bool) -> None:
        self.lent = lend

    def handle(self, client: str, msg: Any) -> Any:
        self.buf.fill_(float(msg.round))
        return FitRes(params={"w": self.buf}, num_examples=1)


def test_a_party_lends_its_replies_and_each_is_framed_before_the_next_request(certs: Path) -> None:
    backend = GrpcBackend(_fed(certs), {"c0": "alice"}, min_clients=1)
    fed = _fed(certs, backend.listen())
    lender = Lender()
    party = ClientParty(fed, "alice", lender)
    thread = threading.Thread(target=party.run, daemon=True)
    thread.start()
    try:
        assert lender.lent and backend.wait_for(["c0"], 20) == ["c0"]
        for rnd in range(1, 4):
            reply = backend.exchange({"c0": FitIns(round=rnd, params={})})["c0"]
            assert torch.equal(reply.params["w"], torch.full((100_000,), float(rnd)))
    finally:
        backend.close()
        thread.join(10)


def test_a_reply_past_its_deadline_gives_the_budget_back(one_at_a_time: Any) -> None:
    """With room for one reply at a time, a late reply that kept its hold would stall every later exchange."""
    backend, echo = one_at_a_time
    late = backend.exchange({"c0": EvaluateIns(round=1, params={}, config={"block": "c0"})}, timeout=0.3)
    assert isinstance(late["c0"], ClientFailure) and late["c0"].kind.name == "TIMEOUT"
    echo.release.set()  # alice's reply to round 1 arrives now, after its deadline, and is dropped
    replies = backend.exchange({c: FitIns(round=2, params={"w": torch.zeros(10)}) for c in ("c0", "c1")}, timeout=20)
    assert all(isinstance(r, FitRes) for r in replies.values()) and backend.budget.held == 0
