"""Backend: moves messages from the coordinator to clients and back. Round logic never knows which one runs.

A backend is given a `ClientApp`-like handler factory at start and then answers `exchange` calls: one request per
client id, a reply (or a `ClientFailure`) per client id, in the order of the requests. Backends: `InProcessBackend`
here; Ray (`tessera.runtime.ray`) and gRPC (`tessera.runtime.grpc`) implement the same protocol.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, runtime_checkable

from tessera.core.errors import ConfigError, PrivacyBudgetExceeded, SerdeError, ShapeMismatch, TesseraError
from tessera.core.logging import get_logger
from tessera.core.serde import decode_message, encode_message
from tessera.runtime.handover import hand_over_sized
from tessera.runtime.messages import ErrorRes

log = get_logger(__name__)


class FailureKind(Enum):
    """Why a client's reply did not count. Code that must react to a kind (a spent privacy budget stops a run)
    reads this field, never the wording of `reason`."""

    ERROR = "error"  # the client's handler raised
    TIMEOUT = "timeout"  # no reply in time
    UNREACHABLE = "unreachable"  # not connected, actor died, connection reset
    MALFORMED = "malformed"  # undecodable, oversized or of the wrong type
    REJECTED = "rejected"  # decoded, but refused by the server's checks (shape, NaN/Inf, counts)
    BUDGET_EXHAUSTED = "budget_exhausted"  # the client refused: the round would exceed its privacy budget
    DROPPED = "dropped"  # dropped by a protocol stage (secure aggregation)
    NOT_ASKED = "not_asked"  # the server did not ask it (its budget is known to be spent)
    MISCONFIGURED = "misconfigured"  # the job does not fit the client's data or settings (shapes, config)


@dataclass(frozen=True)
class ClientFailure:
    """Why a client gave no usable reply this exchange (never carries tensors or data)."""

    client: str
    reason: str
    kind: FailureKind = FailureKind.ERROR


def failure_from_error(client: str, error_type: str, reason: str) -> ClientFailure:
    """The failure for a client that answered with an error (`ErrorRes` over a wire, or a raised exception)."""
    kind = _ERROR_KINDS.get(error_type, FailureKind.ERROR)
    return ClientFailure(client, f"{error_type}: {reason}", kind)


_ERROR_KINDS = {PrivacyBudgetExceeded.__name__: FailureKind.BUDGET_EXHAUSTED,
                ShapeMismatch.__name__: FailureKind.MISCONFIGURED, ConfigError.__name__: FailureKind.MISCONFIGURED}


@dataclass
class Traffic:
    """Bytes that crossed the wire, counted on encoded messages."""

    up: int = 0
    down: int = 0
    per_client: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add(self, client: str, *, down: int, up: int) -> None:
        self.down += down
        self.up += up
        d, u = self.per_client.get(client, (0, 0))
        self.per_client[client] = (d + down, u + up)


class Handler(Protocol):
    """What runs at a client: one request message in, one reply message out."""

    def handle(self, client: str, msg: Any) -> Any: ...


@runtime_checkable
class ClientStateHandler(Handler, Protocol):
    """A handler whose clients keep state between requests (SCAFFOLD's control variate, a DP ledger) that a
    backend may store elsewhere between calls (Ray actors serve any client, so the state travels with the call)."""

    def set_client_state(self, client: str, state: dict[str, Any]) -> None: ...

    def take_client_state(self, client: str) -> dict[str, Any] | None: ...


Reply = Any  # a message dataclass, or ClientFailure


@runtime_checkable
class LendingHandler(Handler, Protocol):
    """A handler that can reply with tensors it reuses for its next message (a client's model), when the backend
    promises to read or copy each reply first: the in-process backend folds it at once (streaming aggregation) or
    copies it (an exchange that keeps every reply)."""

    def lend_replies(self, lend: bool) -> None: ...


OnReply = Callable[[str, Reply], Reply]
"""Called with each reply as it arrives (one call at a time); returns what the exchange keeps for that client, so
a caller that folds replies into a running sum keeps only a small summary (see `exchange_each`). It must read or
copy the reply's tensors, not keep them: a lending handler (`LendingHandler`) reuses them for its next message."""


class Backend(Protocol):
    traffic: Traffic

    def start(self, clients: list[str]) -> None: ...

    def exchange(self, requests: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Reply]: ...

    def close(self) -> None: ...


@runtime_checkable
class StreamingBackend(Backend, Protocol):
    """A backend that hands each reply to `on_reply` as it arrives instead of holding all of them."""

    def exchange_each(self, requests: Mapping[str, Any], on_reply: OnReply, *,
                      timeout: float | None = None) -> dict[str, Reply]: ...


def exchange_each(backend: Backend, requests: Mapping[str, Any], on_reply: OnReply, *,
                  timeout: float | None = None) -> dict[str, Reply]:
    """`backend.exchange`, with every reply passed through `on_reply` as it arrives where the backend streams
    (the coordinator then holds one reply at a time, not all of them), and after the exchange where it does not."""
    if isinstance(backend, StreamingBackend):
        return backend.exchange_each(requests, on_reply, timeout=timeout)
    return {c: on_reply(c, r) for c, r in backend.exchange(requests, timeout=timeout).items()}


WIRE_ENV = "TESSERA_INPROCESS_WIRE"


class InProcessBackend:
    """Runs every client's handler in this process.

    By default a message is handed over without encoding its tensors (`runtime.handover`): the receiver gets new
    containers and detached CPU tensors sharing the sender's memory, and tensors sent to a client are read-only
    (`FrozenTensor`), so a client can never change the coordinator's params. Bytes up and down are still counted
    exactly: the size of the encoded message, computed from its envelope and tensor sizes. `wire=True` (or the
    environment variable TESSERA_INPROCESS_WIRE=1) encodes and decodes every message as on the network instead;
    both paths train bit-identically (tests/runtime/test_inprocess_zero_copy.py).
    `max_workers=1` (default) runs clients one after another: deterministic and fastest for small models on few
    cores. `timeout` is enforced only with `max_workers > 1` (a sequential client cannot be interrupted).
    """

    def __init__(self, handler: Handler, *, max_workers: int = 1, max_message_bytes: int | None = None,
                 wire: bool | None = None) -> None:
        self.handler = handler
        self.max_workers = max_workers
        self.max_message_bytes = max_message_bytes or 2 * 1024**3
        self.wire = os.environ.get(WIRE_ENV, "") not in ("", "0") if wire is None else wire
        self.traffic = Traffic()
        self._pool: ThreadPoolExecutor | None = None
        self.lends = isinstance(handler, LendingHandler)
        if isinstance(handler, LendingHandler):
            handler.lend_replies(True)

    def start(self, clients: list[str]) -> None:
        if self.max_workers > 1:
            self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="tessera-client")

    def _send(self, msg: Any, *, down: bool, own: bool = False) -> tuple[Any, int]:
        """(what the receiver gets, bytes on the wire); `own`: the receiver gets copies of the tensors."""
        if self.wire:
            blob = encode_message(msg)
            return decode_message(blob, max_bytes=self.max_message_bytes), len(blob)
        received, size = hand_over_sized(msg, frozen=down, own=own)
        if size > self.max_message_bytes:
            raise SerdeError(f"message of {size} bytes exceeds the limit of {self.max_message_bytes}; "
                             "raise max_message_bytes")
        return received, size

    def _call(self, client: str, request: Any, *, keep: bool) -> Reply:
        """One request and its reply; `keep`: the caller keeps the reply past the handler's next message."""
        received, down = self._send(request, down=True)
        try:
            reply, up = self._send(self.handler.handle(client, received), down=False, own=keep and self.lends)
        except (TesseraError, Exception) as exc:  # a client's failure must not take the round down
            log.warning("client %s failed: %s", client, type(exc).__name__)
            self.traffic.add(client, down=down, up=0)
            return failure_from_error(client, type(exc).__name__, _short(exc))
        self.traffic.add(client, down=down, up=up)
        if isinstance(reply, ErrorRes):
            return failure_from_error(client, reply.kind, reply.reason)
        return reply

    def exchange(self, requests: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Reply]:
        return self.exchange_each(requests, _keep, timeout=timeout)

    def exchange_each(self, requests: Mapping[str, Any], on_reply: OnReply, *,
                      timeout: float | None = None) -> dict[str, Reply]:
        keep = on_reply is _keep  # no fold: every reply is kept until the exchange ends
        if self._pool is None:
            return {c: on_reply(c, self._call(c, r, keep=keep)) for c, r in requests.items()}
        lock = threading.Lock()
        got: dict[str, Reply] = {}
        closed = False

        def run(c: str, r: Any) -> None:
            reply = self._call(c, r, keep=keep)
            with lock:  # one on_reply at a time, and none once the exchange has timed out
                if not closed:
                    got[c] = on_reply(c, reply)

        futures = [self._pool.submit(run, c, r) for c, r in requests.items()]
        wait(futures, timeout=timeout)
        with lock:
            closed = True
            return {c: got[c] if c in got else
                    ClientFailure(c, f"timed out after {timeout} s", FailureKind.TIMEOUT) for c in requests}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _keep(client: str, reply: Reply) -> Reply:
    return reply


def _short(exc: BaseException) -> str:
    """A short, value-free message: the first line of a foreign exception's text (tessera's own are whole), capped."""
    if isinstance(exc, SerdeError | TesseraError):
        return str(exc)[:200]
    return (str(exc).splitlines()[0] if str(exc) else "")[:200]


def _reason(exc: BaseException) -> str:
    """A short, value-free reason: the type and the first line of the message, capped."""
    return f"{type(exc).__name__}: {_short(exc)}"


HandlerFactory = Callable[[], Handler]
