"""GrpcBackend: the coordinator's side of the Backend protocol over one mTLS stream per client party.

Clients dial in and hold a stream open; `exchange` pushes each request down its client's stream and waits for the
reply with the same message id. A client that is not connected, disconnects mid-request, sends garbage, or stays
silent past the deadline becomes a `ClientFailure` for that exchange only; when it reconnects it is used again
(`rejoin_wait_s` lets the coordinator wait for it at the start of a fit phase).

Against a hostile but authenticated party: identity comes only from the certificate's CN (`certs.identity_problem`);
one certificate holds at most `max_streams_per_party` streams and a stream that sends no HELLO within
`hello_deadline_s` is closed, so one party cannot take the workers the others need; a reply larger than the
session's ceiling (`transport.ceiling`) is refused from its first frame header, before any allocation; and any
reply that does not decode is that client's failure for the exchange, never the end of the job.

Memory: replies are reassembled under one `ReplyBudget` shared by all streams. A reply that would take the bytes
held past `reply_buffer_bytes` waits, before its buffer is allocated, until the replies before it are folded (or it
is the only one); gRPC's flow control pauses its sender meanwhile. So a coordinator folding replies as they come
holds the global params, its accumulator and one model-sized reply, however many clients finish at once. With
`reply_spool_dir`, a reply larger than the budget waits on disk instead and takes none of it (`spool.py`): the
coordinator then holds no reply at all, only the tensor of it being checked or folded.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, as_completed
from dataclasses import dataclass, field
from typing import Any

import grpc

from tessera.core.errors import ConfigError, TesseraError, TransportError
from tessera.core.logging import get_logger
from tessera.core.memory import MMAP_THRESHOLD, return_freed_memory
from tessera.core.serde import decode_message, encode_message_parts, parts_size
from tessera.core.types import OwnedParams
from tessera.runtime.backend import ClientFailure, FailureKind, OnReply, Reply, Traffic, failure_from_error
from tessera.runtime.grpc import transport as tp
from tessera.runtime.grpc.certs import identity_problem
from tessera.runtime.grpc.config import FederationConfig
from tessera.runtime.grpc.spool import MappedParams, SpoolError, SpoolFile, check_spool_dir
from tessera.runtime.messages import ErrorRes, FitRes

log = get_logger(__name__)


@dataclass(frozen=True)
class Refusal:
    """A stream the coordinator closed: who it claimed to be and why (no payload is kept)."""

    claimed: str
    reason: str


_CLOSE = object()


class ReplyBudget:
    """Bytes of replies being reassembled or waiting to be folded, across every stream of a coordinator."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self.peak = 0  # the most bytes held at once (the tests read it)
        self._cond = threading.Condition()

    def acquire(self, n: int, *, gone: Callable[[], bool]) -> Lease | None:
        """Wait until `n` more bytes fit (or nothing is held), then hold them; None once `gone()` says the stream
        asking has closed."""
        with self._cond:
            while self.held and self.held + n > self.capacity:
                if gone():
                    return None
                self._cond.wait(0.25)
            self.held += n
            self.peak = max(self.peak, self.held)
        return Lease(self, n)

    def release(self, n: int) -> None:
        with self._cond:
            self.held -= n
            self._cond.notify_all()


class Lease:
    """The bytes one reply holds in its `ReplyBudget`; `release` is idempotent."""

    def __init__(self, budget: ReplyBudget, n: int) -> None:
        self._budget, self._n = budget, n
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            n, self._n = self._n, 0
        if n:
            self._budget.release(n)


Delivery = tuple[bytearray | SpoolFile, Lease | None]  # a reassembled reply and the budget it holds until folded


@dataclass
class _Abort:
    code: grpc.StatusCode
    details: str


class Session:
    """One client's open stream: an outbox of frames and the replies it owes."""

    def __init__(self, party: str, chunk_bytes: int) -> None:
        self.party = party
        self.chunk_bytes = chunk_bytes
        self.outbox: queue.Queue[Any] = queue.Queue()  # frames, frame iterators (one per message), _CLOSE, _Abort
        self.pending: dict[int, Future[Delivery]] = {}
        self.receiving = False  # the reader holds budget for a reply it is reassembling
        self.largest_sent = 0  # the automatic reply ceiling follows the largest request
        self.next_id = 1
        self.client_id: str | None = None  # set by HELLO; until then the session is not registered
        self.closed = False
        self.lock = threading.Lock()

    def send(self, parts: Sequence[bytes | memoryview]) -> Future[Delivery]:
        """Queue one encoded message; its frames are made as the stream sends them (one chunk copied at a time)."""
        fut: Future[Delivery] = Future()
        with self.lock:
            if self.closed:
                fut.set_exception(TransportError(f"party {self.party} disconnected"))
                return fut
            msg_id, self.next_id = self.next_id, self.next_id + 1
            self.pending[msg_id] = fut
            self.largest_sent = max(self.largest_sent, parts_size(parts))
            self.outbox.put(tp.split(msg_id, parts, self.chunk_bytes))
        return fut

    def deliver(self, msg_id: int, blob: bytearray | SpoolFile, lease: Lease | None = None) -> None:
        with self.lock:  # resolved under the lock: `forget` sees the future either pending or done, never between
            fut = self.pending.pop(msg_id, None)
            issued = msg_id < self.next_id
            if fut is not None:
                fut.set_result((blob, lease))
                return
        if lease is not None:  # a late reply (its deadline passed) is dropped, and so is its hold on the budget
            lease.release()
        if not issued:
            raise tp.FrameError(f"reply to message {msg_id}, which was never sent")

    def forget(self, fut: Future[Delivery]) -> None:
        """Stop waiting for a reply (its deadline passed, or its consumer gave up): a reply arriving later is
        dropped, and one that arrived but was never consumed gives its budget back."""
        with self.lock:
            self.pending = {k: f for k, f in self.pending.items() if f is not fut}
            arrived = fut.done() and not fut.cancelled() and fut.exception() is None
        if arrived:
            lease = fut.result()[1]
            if lease is not None:
                lease.release()

    def close(self, reason: str, abort: _Abort | None = None) -> None:
        with self.lock:
            self.closed = True
            pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():  # a bad frame is the party's malformed reply; anything else, a lost connection
                fut.set_exception(tp.FrameError(reason) if abort is not None else TransportError(reason))
        self.outbox.put(abort if abort is not None else _CLOSE)


@dataclass
class GrpcBackend:
    """Backend over gRPC + mTLS. `routes` maps each job client id to the party name serving it.

    `min_clients`: `start` waits up to `quorum_deadline_s` for every client and fails unless at least this many
    joined.
    """

    fed: FederationConfig
    routes: dict[str, str]
    min_clients: int = 1
    # a process that only coordinates (no training in it): have freed model-sized buffers go back to the OS at
    # once (`core.memory.return_freed_memory`; process-wide, so not for a label party that trains)
    return_memory: bool = False
    traffic: Traffic = field(default_factory=Traffic)
    refused: list[Refusal] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = set(self.routes.values()) - set(self.fed.client_names)
        if unknown:
            raise ConfigError(f"routes name parties not in {self.fed.source}: {sorted(unknown)}")
        self._sessions: dict[str, Session] = {}
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None
        self.port: int | None = None
        self._stopping = False  # no more requests go out (abort/close)
        self._rejoin_round = -1  # the last round whose first exchange waited for disconnected clients
        self._no_waiting = False  # shutdown requested: stop waiting for absent clients
        self._streams: dict[str, int] = {}  # open streams per authenticated party
        self.budget = ReplyBudget(self.fed.settings.reply_buffer_bytes)
        if self.fed.spool_dir is not None:
            check_spool_dir(self.fed.spool_dir, self.fed.source)

    # ------------------------------------------------------------------------------------------ server side
    def listen(self) -> int:
        """Bind and start serving; returns the port (useful when the address says port 0)."""
        if self._server is not None:
            assert self.port is not None
            return self.port
        from concurrent.futures import ThreadPoolExecutor

        me = self.fed.coordinator
        addr = me.listen or me.address
        assert addr is not None
        if self.return_memory:  # each round's freed replies and accumulators go back to the OS, not the heap;
            # frames (a chunk and its header) stay below the threshold, in the heap, reused frame after frame
            return_freed_memory(max(MMAP_THRESHOLD, self.fed.settings.chunk_bytes + 1024**2))
        # every party may hold its streams at once and headroom remains for refused ones, so one party holding all
        # it may cannot starve another; each stream's reader gets its own thread
        workers = len(self.routes) * self.fed.settings.max_streams_per_party + 8
        busy = TransportError(f"port {addr.rpartition(':')[2]} ({addr}) is in use by another process (a second "
                              f"coordinator?); stop it, or change {me.name}'s listen/address in {self.fed.source}")
        if not _port_free(addr):  # before gRPC tries, so the user sees one line and no gRPC log
            raise busy
        # exclusive bind: without so_reuseport=0 a second coordinator binds the same port and splits the clients
        server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tessera-grpc"),
                             options=[*tp.channel_options(self.fed), *tp.coordinator_window(self.fed),
                                      ("grpc.so_reuseport", 0)])
        handler = grpc.stream_stream_rpc_method_handler(self._session, request_deserializer=None,
                                                        response_serializer=None)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(tp.SERVICE, {tp.METHOD: handler}),))
        try:
            port = int(server.add_secure_port(addr, tp.server_credentials(self.fed, me)))
        except RuntimeError:  # grpcio >= 1.6x raises where it used to return 0
            port = 0
        if port == 0:
            raise busy
        server.start()
        self._server, self.port = server, port
        log.info("coordinator listening on %s (port %d)", addr, port)
        return port

    def _refuse(self, context: grpc.ServicerContext, claimed: str, code: grpc.StatusCode, reason: str) -> None:
        self.refused.append(Refusal(claimed, reason))
        log.warning("refused a stream claiming %r: %s", claimed, reason)
        context.abort(code, reason)

    def _session(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        claimed = dict(context.invocation_metadata()).get(tp.PARTY_KEY)
        name = claimed if isinstance(claimed, str) else ""
        # checked before a single frame is read: an impostor's bytes never reach the reassembler
        problem = identity_problem(context.auth_context(), name, list(self.routes.values()))
        if problem is not None:
            self._refuse(context, name, grpc.StatusCode.PERMISSION_DENIED, problem)
        limit = self.fed.settings.max_streams_per_party
        with self._cond:
            held = self._streams.get(name, 0)
            if held < limit:
                self._streams[name] = held + 1
        if held >= limit:  # UNAVAILABLE: a genuine client retries with backoff once its stale stream is gone
            self._refuse(context, name, grpc.StatusCode.UNAVAILABLE,
                         f"party {name} already holds {held} streams (max_streams_per_party={limit})")
        try:
            yield from self._serve(name, requests, context)
        finally:
            with self._cond:
                self._streams[name] -= 1

    def _serve(self, name: str, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        session = Session(name, self.fed.settings.chunk_bytes)
        context.add_callback(lambda: session.close(f"party {name} disconnected"))
        threading.Thread(target=self._read, args=(session, requests), daemon=True,
                         name=f"tessera-read-{name}").start()
        hello_s = self.fed.settings.hello_deadline_s
        try:
            timeout: float | None = hello_s  # the first item is WELCOME once the reader saw HELLO
            while True:
                try:
                    item = session.outbox.get(timeout=timeout)
                except queue.Empty:
                    session.close(f"party {name} sent no HELLO")
                    self._refuse(context, name, grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"no HELLO frame within hello_deadline_s={hello_s}")
                timeout = None
                if item is _CLOSE:
                    return
                if isinstance(item, _Abort):
                    self._refuse(context, name, item.code, item.details)
                if isinstance(item, bytes):
                    yield item
                else:
                    yield from item  # one message's frames, made as they are sent
        finally:
            self._detach(session)

    def _read(self, session: Session, requests: Iterator[bytes]) -> None:
        s = self.fed.settings
        reasm = tp.Reassembler(self.fed.spool_dir, s.reply_buffer_bytes)
        lease: Lease | None = None
        try:
            for raw in requests:
                limit, why = tp.ceiling(s.max_message_bytes, largest_sent=session.largest_sent)
                frame = tp.parse(raw, max_message_bytes=limit, chunk_bytes=s.chunk_bytes, ceiling_reason=why)
                if frame.kind is tp.Kind.HELLO and session.client_id is None:
                    self._hello(session, bytes(frame.payload))
                    continue
                if frame.kind is not tp.Kind.DATA or session.client_id is None:
                    raise tp.FrameError(f"unexpected {frame.kind.name} frame (a session starts with one HELLO, "
                                        "then carries DATA)")
                if not session.receiving:  # a new reply: wait for room before its buffer exists (or spool it)
                    if not reasm.spools(frame.total):
                        lease = self.budget.acquire(frame.total, gone=lambda: session.closed)
                        if lease is None:
                            return
                    session.receiving = True
                done = reasm.feed(frame)
                if done is not None:
                    session.receiving = False
                    held, lease = lease, None
                    session.deliver(*done, held)
                    done = None  # the reply belongs to its consumer now: this thread must not keep it alive
        except tp.FrameError as exc:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.oversize else grpc.StatusCode.INVALID_ARGUMENT
            session.close(f"party {session.party} sent a bad frame: {exc}", _Abort(code, str(exc)))
            return
        except SpoolError as exc:  # our disk, not the party's fault: its reply is lost, it may reconnect
            log.error("%s", exc)
            session.close(f"the coordinator could not keep the reply of {session.party}: {exc}",
                          _Abort(grpc.StatusCode.UNAVAILABLE, "the coordinator could not store the reply"))
            return
        except Exception as exc:  # the stream broke (peer gone, cancelled): just a disconnect
            log.debug("stream of %s ended: %s", session.party, type(exc).__name__)
        finally:
            reasm.close()  # a reply cut off mid-way is dropped (a spooled one deleted) and gives its room back
            session.receiving = False
            if lease is not None:
                lease.release()
        session.close(f"party {session.party} disconnected")

    def _hello(self, session: Session, payload: bytes) -> None:
        """Register the session: only now does it count as connected and receive requests."""
        if payload != session.party.encode():
            raise tp.FrameError("HELLO names a different party than the call metadata")
        session.client_id = next(c for c, p in self.routes.items() if p == session.party)
        session.outbox.put(tp.control(tp.Kind.WELCOME, session.client_id.encode()))  # before any request can
        self._attach(session)

    def _attach(self, session: Session) -> None:
        with self._cond:
            old = self._sessions.get(session.party)
            self._sessions[session.party] = session
            self._cond.notify_all()
        if old is not None:  # a reconnect: the old stream is dead or about to be
            old.close(f"party {session.party} reconnected")
        log.info("party %s connected", session.party)

    def _detach(self, session: Session) -> None:
        with self._cond:
            if self._sessions.get(session.party) is session:
                del self._sessions[session.party]
                log.info("party %s disconnected", session.party)
            self._cond.notify_all()

    def _live(self, party: str) -> Session | None:
        session = self._sessions.get(party)
        return None if session is None or session.closed else session

    def connected(self) -> list[str]:
        with self._cond:
            return [c for c, p in self.routes.items() if self._live(p) is not None]

    def wait_for(self, clients: list[str], timeout: float) -> list[str]:
        """Wait until all `clients` are connected or `timeout` passes; returns the connected ones."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self._stopping or self._no_waiting):
                up = [c for c in clients if self._live(self.routes[c]) is not None]
                left = deadline - time.monotonic()
                if len(up) == len(clients) or left <= 0:
                    return up
                self._cond.wait(min(left, 1.0))
            return []

    # -------------------------------------------------------------------------------------- Backend protocol
    def start(self, clients: list[str]) -> None:
        missing = [c for c in clients if c not in self.routes]
        if missing:
            raise ConfigError(f"clients {missing} have no party in {self.fed.source}")
        self.listen()
        up = self.wait_for(clients, self.fed.settings.quorum_deadline_s)
        if len(up) < self.min_clients:
            gone = [self.routes[c] for c in clients if c not in up]
            raise TransportError(f"only {len(up)} of {len(clients)} clients joined within quorum_deadline_s="
                                 f"{self.fed.settings.quorum_deadline_s} (need {self.min_clients}); missing: {gone}")

    def exchange(self, requests: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Reply]:
        return self.exchange_each(requests, _keep, timeout=timeout)

    def exchange_each(self, requests: Mapping[str, Any], on_reply: OnReply, *,
                      timeout: float | None = None) -> dict[str, Reply]:
        """Send every request, then decode each reply as soon as it is reassembled and pass it to `on_reply` (one
        call at a time, in arrival order) before the next: a caller that folds replies into a running sum holds
        one decoded reply plus the replies still arriving, never all of them. Returns what `on_reply` kept."""
        s = self.fed.settings
        budget = s.rpc_deadline_s if timeout is None else min(timeout, s.rpc_deadline_s)
        self._maybe_wait_for_rejoin(requests)
        deadline = time.monotonic() + budget
        out: dict[str, Reply] = {}
        sent: dict[Future[Delivery], tuple[str, Session]] = {}
        for cid, msg in requests.items():
            with self._cond:
                session = None if self._stopping else self._live(self.routes[cid])
            if session is None:
                out[cid] = on_reply(cid, ClientFailure(cid, f"party {self.routes[cid]} is not connected",
                                                       FailureKind.UNREACHABLE))
                continue
            parts = encode_message_parts(msg)  # the envelope and views of the tensors: no copy of the model
            size = parts_size(parts)
            if s.max_message_bytes is not None and size > s.max_message_bytes:  # the peer would refuse it
                out[cid] = on_reply(cid, ClientFailure(
                    cid, f"{type(msg).__name__} of {size} bytes exceeds max_message_bytes={s.max_message_bytes}; "
                    "raise it in federation.toml on every party", FailureKind.MALFORMED))
                continue
            self.traffic.add(cid, down=size, up=0)
            sent[session.send(parts)] = (cid, session)
        try:
            try:
                for fut in as_completed(list(sent), timeout=max(0.0, deadline - time.monotonic())):
                    cid, session = sent.pop(fut)
                    out[cid] = self._consume(cid, session, fut, budget, on_reply)
                    del fut  # the future holds the reassembled bytes: drop them before the next reply
            except TimeoutError:
                pass
            while sent:  # past the deadline
                fut, (cid, session) = sent.popitem()
                out[cid] = self._consume(cid, session, fut, budget, on_reply)
        finally:  # an on_reply that raised: replies not consumed give their budget back
            for fut, (_, session) in sent.items():
                session.forget(fut)
        return {c: out[c] for c in requests}

    def _consume(self, cid: str, session: Session, fut: Future[Delivery], budget: float,
                 on_reply: OnReply) -> Reply:
        """`on_reply` of one request's outcome; the reply's hold on the reassembly budget ends after it."""
        reply, lease = self._reply(cid, session, fut, budget)
        try:
            return on_reply(cid, reply)
        finally:
            del reply
            if lease is not None:
                lease.release()

    def _maybe_wait_for_rejoin(self, requests: Mapping[str, Any]) -> None:
        """At the first exchange of a new round (FitIns, or a secure-aggregation setup), give clients that dropped
        out up to `rejoin_wait_s` to reconnect, so a client restarted after a crash or a network blip is in it."""
        wait = self.fed.settings.rejoin_wait_s
        rounds = [r for m in requests.values() if isinstance(r := getattr(m, "round", None), int)]
        if wait <= 0 or not rounds or max(rounds) <= self._rejoin_round:
            return
        self._rejoin_round = max(rounds)
        self.wait_for(list(requests), wait)

    def _late(self, cid: str, session: Session, fut: Future[Delivery], budget: float) -> ClientFailure:
        session.forget(fut)
        if session.receiving:  # still sending a reply past its deadline: it holds budget others are waiting for
            session.close(f"party {session.party} was still sending past the {budget} s deadline",
                          _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"reply not complete within {budget} s"))
        return ClientFailure(cid, f"party {session.party} sent no reply within {budget} s", FailureKind.TIMEOUT)

    def _reply(self, cid: str, session: Session, fut: Future[Delivery],
               budget: float) -> tuple[Reply, Lease | None]:
        """The decoded reply of a finished request and its hold on the reassembly budget, or why there is none
        (not finished: its deadline passed)."""
        if not fut.done():
            return self._late(cid, session, fut, budget), None
        try:
            blob, lease = fut.result(timeout=0)
        except TimeoutError:
            return self._late(cid, session, fut, budget), None
        except tp.FrameError as exc:
            return ClientFailure(cid, str(exc), FailureKind.MALFORMED), None
        except TransportError as exc:
            return ClientFailure(cid, str(exc), FailureKind.UNREACHABLE), None
        self.traffic.add(cid, down=0, up=len(blob))
        try:  # the reassembly buffer is ours: tensors become views over it (its size was checked on arrival)
            mapping = None
            if isinstance(blob, SpoolFile):
                mapping = blob.mapped()
                reply = decode_message(memoryview(mapping), take=True)
            else:
                reply = decode_message(blob, take=True)
        except SpoolError as exc:
            log.error("%s", exc)
            return ClientFailure(cid, f"the coordinator could not read the reply of {session.party}: {exc}",
                                 FailureKind.UNREACHABLE), lease
        except TesseraError as exc:
            return ClientFailure(cid, f"party {session.party} sent an undecodable reply: {exc}",
                                 FailureKind.MALFORMED), lease
        if isinstance(reply, ErrorRes):
            return failure_from_error(cid, reply.kind, reply.reason), lease
        if isinstance(reply, FitRes):  # its tensors are views of our own buffer: an aggregation may reuse them
            params = OwnedParams(reply.params) if mapping is None else MappedParams(reply.params, mapping)
            reply = dataclasses.replace(reply, params=params)
        return reply, lease

    def stop_waiting(self) -> None:
        """Shutdown requested (first Ctrl-C): waits for absent clients end now; requests in flight continue."""
        with self._cond:
            self._no_waiting = True
            self._cond.notify_all()

    def abort(self, reason: str = "coordinator is shutting down") -> None:
        """Fail every pending request now (second Ctrl-C): the round in flight is abandoned."""
        with self._cond:
            self._stopping = True
            sessions = list(self._sessions.values())
            self._cond.notify_all()
        for s in sessions:
            with s.lock:
                pending, s.pending = s.pending, {}
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(TransportError(reason))

    def close(self) -> None:
        """Tell every client the job is over (BYE), then stop serving."""
        with self._cond:
            self._stopping = True
            sessions = list(self._sessions.values())
            self._cond.notify_all()
        for s in sessions:
            s.outbox.put(tp.control(tp.Kind.BYE))
            s.close("coordinator closed the federation")
        if self._server is not None:
            self._server.stop(grace=5.0).wait(10.0)
            self._server = None


def _keep(client: str, reply: Reply) -> Reply:
    return reply


def _port_free(addr: str) -> bool:
    """Whether `host:port` can be bound now (port 0 always can). SO_REUSEADDR as gRPC sets it, so a restarted
    coordinator is not refused over connections still in TIME_WAIT; any listener on the port makes it busy."""
    import socket

    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or int(port) == 0:
        return True
    try:
        infos = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return True  # let gRPC report an address it cannot resolve
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError:
            return False
    return True
