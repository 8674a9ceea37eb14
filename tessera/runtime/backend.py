"""Backend: moves messages from the coordinator to clients and back. Round logic never knows which one runs.

A backend is given a `ClientApp`-like handler factory at start and then answers `exchange` calls: one request per
client id, a reply (or a `ClientFailure`) per client id, in the order of the requests. Backends: `InProcessBackend`
here; Ray (`tessera.runtime.ray`) and gRPC (`tessera.runtime.grpc`) implement the same protocol.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, runtime_checkable

from tessera.core.errors import PrivacyBudgetExceeded, SerdeError, TesseraError
from tessera.core.logging import get_logger
from tessera.core.serde import decode_message, encode_message
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


@dataclass(frozen=True)
class ClientFailure:
    """Why a client gave no usable reply this exchange (never carries tensors or data)."""

    client: str
    reason: str
    kind: FailureKind = FailureKind.ERROR


def failure_from_error(client: str, error_type: str, reason: str) -> ClientFailure:
    """The failure for a client that answered with an error (`ErrorRes` over a wire, or a raised exception)."""
    kind = FailureKind.BUDGET_EXHAUSTED if error_type == PrivacyBudgetExceeded.__name__ else FailureKind.ERROR
    return ClientFailure(client, f"{error_type}: {reason}", kind)


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


class Backend(Protocol):
    traffic: Traffic

    def start(self, clients: list[str]) -> None: ...

    def exchange(self, requests: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Reply]: ...

    def close(self) -> None: ...


class InProcessBackend:
    """Runs every client's handler in this process.

    Each request and reply is encoded and decoded exactly as it would be on the network, so byte counts are real,
    a client can never alias the server's tensors, and anything that would not survive the wire fails here too.
    `max_workers=1` (default) runs clients one after another: deterministic and fastest for small models on few
    cores. `timeout` is enforced only with `max_workers > 1` (a sequential client cannot be interrupted).
    """

    def __init__(self, handler: Handler, *, max_workers: int = 1, max_message_bytes: int | None = None) -> None:
        self.handler = handler
        self.max_workers = max_workers
        self.max_message_bytes = max_message_bytes or 2 * 1024**3
        self.traffic = Traffic()
        self._pool: ThreadPoolExecutor | None = None

    def start(self, clients: list[str]) -> None:
        if self.max_workers > 1:
            self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="tessera-client")

    def _call(self, client: str, request: Any) -> Reply:
        wire_down = encode_message(request)
        try:
            reply = self.handler.handle(client, decode_message(wire_down, max_bytes=self.max_message_bytes))
            wire_up = encode_message(reply)
            decoded = decode_message(wire_up, max_bytes=self.max_message_bytes)
        except (TesseraError, Exception) as exc:  # a client's failure must not take the round down
            log.warning("client %s failed: %s", client, type(exc).__name__)
            self.traffic.add(client, down=len(wire_down), up=0)
            return failure_from_error(client, type(exc).__name__, _short(exc))
        self.traffic.add(client, down=len(wire_down), up=len(wire_up))
        if isinstance(decoded, ErrorRes):
            return failure_from_error(client, decoded.kind, decoded.reason)
        return decoded

    def exchange(self, requests: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Reply]:
        if self._pool is None:
            return {c: self._call(c, r) for c, r in requests.items()}
        futures = {c: self._pool.submit(self._call, c, r) for c, r in requests.items()}
        deadline = None if timeout is None else time.monotonic() + timeout
        out: dict[str, Reply] = {}
        for c, fut in futures.items():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                out[c] = fut.result(timeout=left)
            except TimeoutError:
                out[c] = ClientFailure(c, f"timed out after {timeout} s", FailureKind.TIMEOUT)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _short(exc: BaseException) -> str:
    """A short, value-free message: the first line of a foreign exception's text (tessera's own are whole), capped."""
    if isinstance(exc, SerdeError | TesseraError):
        return str(exc)[:200]
    return (str(exc).splitlines()[0] if str(exc) else "")[:200]


def _reason(exc: BaseException) -> str:
    """A short, value-free reason: the type and the first line of the message, capped."""
    return f"{type(exc).__name__}: {_short(exc)}"


HandlerFactory = Callable[[], Handler]
