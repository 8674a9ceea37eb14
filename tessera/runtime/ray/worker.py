"""The Ray actor that runs virtual clients: it builds the ClientApp once and serves any client on demand.

An actor holds no client state between calls. Each call brings the client's encoded request, the exchange's
shared blob (fetched from the object store and decoded once per exchange per actor, then handed to each client
read-only) and the client's stored state; it returns
the encoded reply and the client's state afterwards. Everything crossing the actor boundary is serde bytes; the
reply travels as a numpy byte array, which Ray stores out of band, so the driver reads it in place from the object
store instead of unpickling a copy.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch

from tessera.core.errors import SerdeError
from tessera.core.serde import encode_message_parts, parts_size
from tessera.runtime.backend import ClientStateHandler, Handler, LendingHandler, _reason, _short
from tessera.runtime.handover import hand_over
from tessera.runtime.messages import ErrorRes
from tessera.runtime.ray.shared import Table, decode, decode_table
from tessera.runtime.ray.store import decode_state, encode_state

OK, FAILED = "ok", "failed"
# (status, encoded reply or failure reason, the client's state blob afterwards (None: no state), actor peak RSS KiB)
Result = tuple[str, np.ndarray | str, bytes | None, int]


def packed(msg: Any) -> np.ndarray:
    """`encode_message(msg)` as a uint8 array, written once from the message's buffers."""
    parts = encode_message_parts(msg)
    out = np.empty(parts_size(parts), dtype=np.uint8)
    pos = 0
    for part in parts:
        n = memoryview(part).nbytes
        out[pos : pos + n] = np.frombuffer(part, dtype=np.uint8)
        pos += n
    return out


def peak_rss_kib() -> int:
    """This process's peak resident set size so far (KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


class ClientWorker:
    """One pooled actor. `factory()` builds the handler (a ClientApp) once, in the actor."""

    def __init__(self, factory: Callable[[], Handler], *, torch_threads: int, max_message_bytes: int) -> None:
        torch.set_num_threads(torch_threads)
        self.app = factory()
        if isinstance(self.app, LendingHandler):  # `run` packs each reply before it returns: lending is safe
            self.app.lend_replies(True)
        self.max_message_bytes = max_message_bytes
        self._shared_token: str | None = None
        self._shared: Table | None = None

    def ready(self) -> int:
        return os.getpid()

    def _shared_table(self, token: str | None, refs: list[Any]) -> Table | None:
        """The exchange's shared maps, decoded once per exchange (the previous exchange's are dropped first)."""
        if token is None:
            return None
        if token != self._shared_token:
            self._shared, self._shared_token = None, None
            stored = ray.get(refs[0])  # a read-only view of the object store: the tensors view it (no copy);
            # every message built from the table is handed to the client frozen (`run`), so nothing writes it
            self._shared = decode_table(memoryview(stored), max_bytes=self.max_message_bytes, borrow=True)
            self._shared_token = token
        return self._shared

    def run(self, client: str, request: bytes, state: bytes | None, token: str | None, refs: list[Any]) -> Result:
        """Serve one request for `client`; a client's exception becomes a FAILED result, never an actor crash."""
        try:
            # Read-only hand-over: the shared tensors serve every client this actor runs in the exchange.
            msg = hand_over(decode(request, self._shared_table(token, refs), max_bytes=self.max_message_bytes),
                            frozen=True)
            start_state = decode_state(state)
        except SerdeError as exc:
            return FAILED, _reason(exc), state, peak_rss_kib()
        app = self.app
        if isinstance(app, ClientStateHandler):
            app.set_client_state(client, start_state)
        payload: np.ndarray | str
        try:
            status, payload = OK, packed(self.app.handle(client, msg))
        except Exception as exc:  # a client's failure must not take the actor down; its kind travels typed
            status, payload = OK, packed(ErrorRes(kind=type(exc).__name__, reason=_short(exc)))
        new_state = state
        if isinstance(app, ClientStateHandler):
            kept = app.take_client_state(client)
            try:
                new_state = encode_state(kept) if kept else None
            except SerdeError as exc:
                status = FAILED
                payload = f"ClientContext.state cannot be stored ({_reason(exc)}); keep only tensors and plain data"
                new_state = state
        return status, payload, new_state, peak_rss_kib()
