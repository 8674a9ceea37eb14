"""The client party's loop: dial the coordinator, serve whatever it pushes, redial with backoff when cut off.

Any registered message type is served (FitIns, EvaluateIns, secure-aggregation stages, split-learning steps): the
request is decoded, handed to `handler.handle(client_id, msg)`, and the reply streamed back under the same
message id. A handler error travels back as `ErrorRes`, so the coordinator records a failure instead of hanging.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from tessera.core.errors import ConfigError, TesseraError, TransportError
from tessera.core.logging import get_logger
from tessera.core.serde import Parts, decode_message, encode_message_parts, parts_size
from tessera.runtime.backend import Handler, LendingHandler
from tessera.runtime.federation import Role
from tessera.runtime.grpc import transport as tp
from tessera.runtime.grpc.config import FederationConfig, PartyConfig, RetrySection
from tessera.runtime.messages import ErrorRes

log = get_logger(__name__)

_FATAL = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT,
          grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED}


@dataclass
class ClientStats:
    requests: int = 0
    connections: int = 0
    client_id: str | None = None


def _drain(outbox: queue.Queue[bytes | Iterable[bytes] | None]) -> Iterator[bytes]:
    while (item := outbox.get()) is not None:
        if isinstance(item, bytes):
            yield item
        else:
            yield from item  # one reply's frames, made as they are sent


class _Reply:
    """One reply's frames, made as the stream sends them; `sent` is set once the last one is made (after that the
    reply's tensors are no longer read, so the handler may reuse them)."""

    def __init__(self, frames: Iterator[bytes]) -> None:
        self.frames = frames
        self.sent = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.frames
        finally:
            self.sent.set()


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:200]


def backoff_delays(retry: RetrySection) -> Iterator[float]:
    """Seconds to wait before each redial: initial, then times `multiplier`, capped at `max_backoff_s`."""
    delay = retry.initial_backoff_s
    while True:
        yield min(delay, retry.max_backoff_s)
        delay = min(delay * retry.multiplier, retry.max_backoff_s)


class ClientParty:
    """Runs one client party until the coordinator says BYE, `stop()` is called, or retries run out."""

    def __init__(self, fed: FederationConfig, name: str, handler: Handler, *,
                 expected_client_id: str | None = None) -> None:
        self.fed = fed
        self.me: PartyConfig = fed.party(name)
        if self.me.role is not Role.CLIENT:
            raise ConfigError(f"{fed.source}: party {name!r} is the coordinator; ClientParty serves client parties")
        self.handler = handler
        self.expected_client_id = expected_client_id
        self.stats = ClientStats()
        self._stop = threading.Event()
        self._call: Any = None
        self._welcomed = False
        if isinstance(handler, LendingHandler):  # each reply is framed before the next request is handled
            handler.lend_replies(True)

    def stop(self) -> None:
        """Leave now (signal-safe): the current stream is cancelled and `run` returns."""
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()

    def run(self) -> ClientStats:
        retry = self.fed.settings.retry
        failures, delays = 0, backoff_delays(retry)
        while not self._stop.is_set():
            try:
                if self._stream():
                    log.info("coordinator closed the federation; %d requests served", self.stats.requests)
                    return self.stats
            except grpc.RpcError as exc:
                code = exc.code()
                if self._stop.is_set():
                    break
                if code in _FATAL:
                    raise TransportError(f"the coordinator refused party {self.me.name!r}: {code.name}: "
                                         f"{exc.details()}") from None
                log.info("connection to the coordinator failed (%s); retrying", code.name)
            if self._welcomed:  # we were in: a blip, not a misconfiguration; start the backoff over
                failures, delays = 0, backoff_delays(retry)
            failures += 1
            if failures >= retry.max_attempts:
                raise TransportError(f"party {self.me.name!r} could not reach the coordinator at "
                                     f"{self.fed.coordinator.address} after {failures} attempts; check the address, "
                                     "that it is running, and that both use the same federation CA")
            self._stop.wait(next(delays))
        return self.stats

    def _stream(self) -> bool:
        """One connection; True when the coordinator said BYE."""
        s = self.fed.settings
        self._welcomed = False
        outbox: queue.Queue[bytes | Iterable[bytes] | None] = queue.Queue()
        outbox.put(tp.control(tp.Kind.HELLO, self.me.name.encode()))
        channel = tp.client_channel(self.fed, self.me)
        call = channel.stream_stream(tp.FULL_METHOD, request_serializer=None, response_deserializer=None)(
            _drain(outbox), metadata=((tp.PARTY_KEY, self.me.name),))
        self._call = call
        self.stats.connections += 1
        reasm = tp.Reassembler()
        limit, why = tp.ceiling(s.max_message_bytes, largest_sent=None)
        last: _Reply | None = None
        try:
            for raw in call:
                frame = tp.parse(raw, max_message_bytes=limit, chunk_bytes=s.chunk_bytes, ceiling_reason=why)
                if frame.kind is tp.Kind.BYE:
                    return True
                if frame.kind is tp.Kind.WELCOME:
                    self._welcome(bytes(frame.payload).decode("utf-8", "replace"))
                    continue
                if not self._welcomed:
                    raise tp.FrameError("the coordinator sent a request before WELCOME")
                done = reasm.feed(frame)
                if done is not None:
                    msg_id, blob = done
                    assert isinstance(blob, bytearray)  # a party's reassembler keeps requests in memory
                    done = None  # the request's buffer is freed once answered, not kept until the next one
                    while last is not None and not last.sent.wait(0.5) and not call.done():
                        pass  # the previous reply still reads tensors the handler lends: let it be framed first
                    last = _Reply(tp.split(msg_id, self._answer(blob), s.chunk_bytes))
                    outbox.put(last)
                    del blob
            return False
        finally:
            self._call = None
            outbox.put(None)
            call.cancel()
            channel.close()

    def _welcome(self, client_id: str) -> None:
        if self.expected_client_id is not None and client_id != self.expected_client_id:
            raise ConfigError(f"the coordinator assigned {self.me.name!r} to client {client_id!r} but this party "
                              f"expected {self.expected_client_id!r}; use the same federation.toml everywhere")
        self.stats.client_id = client_id
        self._welcomed = True
        log.info("party %s joined as %s", self.me.name, client_id)

    def _answer(self, blob: bytearray) -> Parts:
        """The encoded reply to one request, as buffers (views of the reply's tensors, sent piecewise)."""
        limit = self.fed.settings.max_message_bytes
        client_id = self.stats.client_id
        assert client_id is not None  # requests come only after WELCOME
        try:
            msg = decode_message(blob, take=True)  # the reassembly buffer is ours; its size was checked on arrival
            reply = encode_message_parts(self.handler.handle(client_id, msg))
            self.stats.requests += 1
        except (TesseraError, Exception) as exc:  # any failure goes back as ErrorRes; the party keeps serving
            log.warning("request failed: %s", type(exc).__name__)
            reply = encode_message_parts(ErrorRes(kind=type(exc).__name__, reason=_short(exc)))
        if limit is not None and parts_size(reply) > limit:
            reply = encode_message_parts(ErrorRes(kind="SerdeError", reason=f"reply of {parts_size(reply)} bytes "
                                                  f"exceeds max_message_bytes={limit}"))
        return reply
