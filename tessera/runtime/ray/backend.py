"""RayBackend: virtual clients scheduled on a bounded pool of Ray actors; memory bounded by the pool, not the clients.

- The pool has `num_actors` actors (default: cluster CPUs // actor_cpus). Each builds the ClientApp once from the
  factory and then serves whichever client it is handed; a client is not tied to an actor.
- Per-client state (`ClientContext.state`) lives in the driver's store (memory or disk), keyed by client id, as
  serde blobs; it travels to the actor with the request and back with the reply.
- Maps shared by every request of an exchange (the global params) are encoded once and `ray.put` once.
- A client that raises, or whose actor dies or overruns the deadline, is a `ClientFailure`; a dead or stuck actor
  is killed and replaced so the next exchange has a full pool.
- The backend is also the checkpoint extension "clients" (the same name and format as the in-process ClientApp,
  so a checkpoint resumes on either backend).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayError

from tessera.core.config import validate
from tessera.core.errors import ConfigError, ProtocolError, SerdeError
from tessera.core.logging import get_logger
from tessera.core.serde import decode_message
from tessera.runtime.backend import (
    ClientFailure,
    FailureKind,
    Handler,
    OnReply,
    Reply,
    Traffic,
    failure_from_error,
)
from tessera.runtime.handover import hand_over
from tessera.runtime.messages import ErrorRes
from tessera.runtime.ray.options import RayOptions
from tessera.runtime.ray.shared import encode_shared
from tessera.runtime.ray.store import decode_state, encode_state, make_store
from tessera.runtime.ray.worker import FAILED, ClientWorker, peak_rss_kib

log = get_logger(__name__)
_RemoteWorker = ray.remote(ClientWorker)


def connect(options: RayOptions) -> bool:
    """Start or join Ray unless this process already has; returns whether it did (and so must shut it down)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    common: dict[str, Any] = {"include_dashboard": False, "log_to_driver": options.log_to_driver,
                              "configure_logging": False}
    if options.runtime_env is not None:
        common["runtime_env"] = dict(options.runtime_env)
    try:
        if options.ray_address:
            ray.init(address=options.ray_address, **common)
        else:
            _init_local(options, common)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = options.ray_address or "a local Ray"
        raise ConfigError(f"ray: could not start or reach {where} ({type(exc).__name__}: {exc}); check "
                          "ray.ray_address, or unset it to start Ray locally") from None
    return True


def _init_local(options: RayOptions, common: dict[str, Any]) -> None:
    # A local start can fail once for reasons of the moment, not of the options: Ray gives a starting raylet a
    # fixed 30 s to register, which a loaded machine can miss, and a start has also failed at once, before writing
    # any log, right after another process's Ray went down. A second attempt almost always succeeds, so any failure
    # of the first start is retried once (the second one's error is the one reported).
    for attempt in (1, 2):
        try:
            ray.init(address="local", num_cpus=options.local_cpus(),
                     object_store_memory=options.store_bytes(), **common)
            return
        except Exception as exc:
            if attempt == 2:
                raise RuntimeError(str(exc)) from exc
            log.warning("local Ray did not start (%s: %s); retrying once", type(exc).__name__, str(exc)[:200])
            ray.shutdown()


@contextlib.contextmanager
def ray_session(**options: Any) -> Iterator[None]:
    """Start Ray once for several runs (demos, benchmarks, tests); backends inside reuse it and leave it up."""
    owned = connect(validate(RayOptions, options, source="ray"))
    try:
        yield
    finally:
        if owned:
            ray.shutdown()


@dataclass
class _Exchange:
    """The bookkeeping of one exchange: who waits, what each actor has queued, what came back."""

    pending: deque[str]
    queues: dict[int, deque[tuple[Any, str]]]
    down: dict[str, int]
    on_reply: OnReply
    owner: dict[Any, int] = field(default_factory=dict)
    out: dict[str, Reply] = field(default_factory=dict)

    def done(self, client: str, reply: Reply) -> None:
        self.out[client] = self.on_reply(client, reply)


class RayBackend:
    """Runs each client's request on a pooled Ray actor. See the module docstring; options: `RayOptions`."""

    name = "clients"

    def __init__(self, factory: Callable[[], Handler], **options: Any) -> None:
        self.options = validate(RayOptions, options, source="ray")
        self.factory = factory
        self.traffic = Traffic()
        self.store = make_store(self.options.state_dir)
        self.restarts = 0
        self.requeued = 0  # requests moved off a dead actor before they ran
        self._actors: list[Any] = []
        self._peak_kib: list[int] = []
        self._factory_ref: Any = None
        self._owns_ray = False
        self._exchanges = 0

    # ------------------------------------------------------------------------------------------------- pool
    def start(self, clients: list[str]) -> None:
        for actor in self._actors:  # started before (a second run on this backend): begin with a fresh pool
            with contextlib.suppress(RayError, ValueError):
                ray.kill(actor, no_restart=True)
        self._owns_ray = connect(self.options) or self._owns_ray
        try:
            self._factory_ref = ray.put(self.factory)
        except Exception as exc:  # Ray's pickler raises several types for objects it cannot capture
            raise ConfigError(f"ray: the job's client factory cannot be sent to Ray actors ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); define the task, data_fn and mods at module level") from None
        resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
        size = self.options.pool_size(resources, len(clients))  # never more GPU actors than the GPUs hold
        self._actors = [self._spawn() for _ in range(size)]
        self._peak_kib = [0] * size
        try:
            ray.get([a.ready.remote() for a in self._actors], timeout=self.options.start_timeout)
        except RayError as exc:
            self.close()
            raise ConfigError(f"ray: client actors failed to start ({_cause(exc)}); check that model_fn and "
                              "data_fn work, and lower num_actors or actor_cpus/actor_memory if they cannot be "
                              "placed") from None
        log.info("ray backend: %d actors for %d virtual clients", size, len(clients))

    def _spawn(self) -> Any:
        return _RemoteWorker.options(**self.options.actor_options()).remote(
            self._factory_ref, torch_threads=self.options.torch_threads,
            max_message_bytes=self.options.max_message_bytes)

    def _replace(self, slot: int) -> None:
        with contextlib.suppress(RayError, ValueError):
            ray.kill(self._actors[slot], no_restart=True)
        self._actors[slot] = self._spawn()
        self.restarts += 1

    def close(self) -> None:
        for actor in self._actors:
            with contextlib.suppress(RayError, ValueError):
                ray.kill(actor, no_restart=True)
        self._actors = []
        self._factory_ref = None
        self.store.close()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    # --------------------------------------------------------------------------------------------- exchange
    def exchange(self, requests: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Reply]:
        return self.exchange_each(requests, _keep, timeout=timeout)

    def exchange_each(self, requests: Mapping[str, Any], on_reply: OnReply, *,
                      timeout: float | None = None) -> dict[str, Reply]:
        """Run every request on the pool; each actor has up to `max_inflight` requests queued (hides Ray's
        round-trip latency) and runs them one at a time, in order. Each reply goes through `on_reply` as it is
        collected (a streaming aggregation folds it and keeps only its counts)."""
        if not self._actors:
            raise ProtocolError("RayBackend.exchange called before start(); the Server starts its backend")
        self._exchanges += 1
        shared, blobs = encode_shared(requests)
        # Put once per exchange as a numpy array: actors read it in place from the object store (no pickle copy).
        token, refs = (None, []) if shared is None else \
            (f"{id(self)}:{self._exchanges}", [ray.put(np.frombuffer(shared, dtype=np.uint8))])
        down = {c: len(b) + (len(shared) if shared is not None else 0) for c, b in blobs.items()}
        n = len(self._actors)
        order = [(self._exchanges + i) % n for i in range(n)]  # rotate so clients do not stick to actors
        ex = _Exchange(pending=deque(requests), queues={slot: deque() for slot in order}, down=down,
                       on_reply=on_reply)
        deadline = None if timeout is None else time.monotonic() + timeout
        while ex.pending or ex.owner:
            for depth in range(self.options.max_inflight):  # breadth first: spread the work over the pool
                for slot in order:
                    if ex.pending and len(ex.queues[slot]) <= depth:
                        client = ex.pending.popleft()
                        ref = self._actors[slot].run.remote(client, blobs[client], self.store.get(client), token,
                                                            refs)
                        ex.queues[slot].append((ref, client))
                        ex.owner[ref] = slot
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(ex.owner), num_returns=1, timeout=left)
            if not ready:
                self._time_out(ex, timeout)
                break
            self._drain(ready[0], ex)
        return {c: ex.out[c] for c in requests}

    def _drain(self, ready: Any, ex: _Exchange) -> None:
        """Collect finished requests at the head of `ready`'s actor queue, in the order the actor ran them.

        An actor runs its calls in order, so every call queued before `ready` has finished too, or failed with it
        when the actor died (Ray may report the later call's failure first): those are collected up to `ready`,
        then any further heads that are done. A death requeues the calls behind it, `ready` among them."""
        slot = ex.owner[ready]
        queue = ex.queues[slot]
        borrow = ex.on_reply is not _keep
        while queue and (ready in ex.owner or ray.wait([queue[0][0]], timeout=0)[0]):
            ref, client = queue.popleft()
            del ex.owner[ref]
            reply, died = self._collect(ref, slot, client, down=ex.down[client], borrow=borrow)
            ex.done(client, reply)
            if died:  # the requests queued behind it never ran: give them to other actors
                for r, c in reversed(queue):
                    del ex.owner[r]
                    ex.pending.appendleft(c)
                    self.requeued += 1
                queue.clear()

    def _collect(self, ref: Any, slot: int, client: str, *, down: int, borrow: bool) -> tuple[Reply, bool]:
        """The client's reply or failure, and whether its actor died (and was replaced). `borrow`: the reply is
        folded at once, so its tensors may view the object store (pinned only until then); a reply the exchange
        keeps is copied out (one copy), so the store can let it go."""
        try:
            status, payload, state, peak = ray.get(ref)
        except RayError as exc:
            log.warning("a Ray actor died while serving a client (%s); replacing it", _cause(exc))
            self._replace(slot)
            self.traffic.add(client, down=down, up=0)
            return ClientFailure(client, f"actor died: {_cause(exc)}", FailureKind.UNREACHABLE), True
        self._peak_kib[slot] = max(self._peak_kib[slot], int(peak))
        self.store.put(client, state)
        if status == FAILED or not (isinstance(payload, np.ndarray) and payload.dtype == np.uint8
                                    and payload.ndim == 1):
            self.traffic.add(client, down=down, up=0)
            return ClientFailure(client, str(payload)), False
        self.traffic.add(client, down=down, up=payload.nbytes)
        try:
            reply = decode_message(payload.data, max_bytes=self.options.max_message_bytes, borrow=borrow)
            if borrow:  # its tensors view the object store's read-only pages: frozen, so no one writes them
                reply = hand_over(reply, frozen=True)
        except SerdeError as exc:
            return ClientFailure(client, f"SerdeError: {str(exc)[:200]}", FailureKind.MALFORMED), False
        if isinstance(reply, ErrorRes):
            return failure_from_error(client, reply.kind, reply.reason), False
        return reply, False

    def _time_out(self, ex: _Exchange, timeout: float | None) -> None:
        for slot, queue in ex.queues.items():
            if not queue:
                continue
            self._replace(slot)  # the actor is still busy with a late client; a fresh one takes its place
            (_, running), *queued = queue
            self.traffic.add(running, down=ex.down[running], up=0)
            ex.done(running, ClientFailure(running, f"timed out after {timeout} s", FailureKind.TIMEOUT))
            ex.pending.extend(c for _, c in queued)
            queue.clear()
        for client in ex.pending:
            ex.done(client, ClientFailure(client, f"timed out after {timeout} s before an actor was free",
                                          FailureKind.TIMEOUT))
        ex.pending.clear()
        ex.owner.clear()

    # ---------------------------------------------------------------------------- checkpoint extension hooks
    def state_dict(self) -> dict[str, Any]:
        """Every client's `ClientContext.state` (clients without state are left out), as the ClientApp does."""
        return {c: decode_state(self.store.get(c)) for c in self.store.clients()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.store.clear()
        for client, s in state.items():
            self.store.put(client, encode_state(dict(s)))

    def on_round_end(self, rnd: int, record: dict[str, Any]) -> None:
        """Adds `ray`: pool size; actor restarts and requests moved off dead actors, so far; peak RSS of the
        driver and of the actors (MiB)."""
        record["ray"] = {
            "actors": len(self._actors),
            "actor_restarts": self.restarts,
            "requeued": self.requeued,
            "driver_peak_rss_mb": round(peak_rss_kib() / 1024, 1),
            "actor_peak_rss_mb": round(max(self._peak_kib, default=0) / 1024, 1),
            "pool_peak_rss_mb": round(sum(self._peak_kib) / 1024, 1),
        }


def _keep(client: str, reply: Reply) -> Reply:
    return reply


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:160]}"
