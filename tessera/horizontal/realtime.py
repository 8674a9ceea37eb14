"""Scheduling policies on the real clock: deadline rounds and asynchronous FedBuff, for any backend.

Both dispatch each client's FitIns as its own `backend.exchange({client: ins})` from a coordinator-side thread
pool, so clients train concurrently on the in-process backend (whatever its max_workers), on Ray and over gRPC
(one request per party, each awaited by its own thread), and the coordinator reacts to each reply as it lands.

`Deadline(seconds=T)`: every sampled client gets `time_budget = T` (PacedTask stops stepping when it would run
past it) and reports the steps it took; FedNova normalises by them. The coordinator waits `T + grace` (longer only
while fewer than `min_available` updates have arrived: then until they have, recorded as `deadline_extended`); a
reply after that is late and handled by `late`: `Late.DROP` makes it a TIMEOUT failure, `Late.FOLD` keeps the client
busy and folds its update into the first step in which it has arrived, rebased onto the current model and scaled
by `(1 + s) ** -staleness_exponent` (s = steps since it was sent). `Deadline(steps=N)` sends a step budget
instead: the schedule is then deterministic and equals the in-process run with the same injected delays.

`Asynchronous(buffer_size=K)`: FedBuff on the real clock. `concurrency` clients always train, each on the newest
model when it was sent; every reply is rebased onto the current model with its staleness in `metrics`, and every
K successful replies make a server step (`strategy.aggregate_fit`, FedBuff's staleness weights).

Checkpoints: the server checkpoints after each step, so every update applied in a step is in the checkpointed
params. Work in flight (clients training, replies that arrived after the last step) is not: after a kill and
resume those clients are sent the checkpointed model and redo their work. "Identical" for a resumed real-clock run
therefore means: the same params, strategy state, version and counters as at the checkpoint, and no applied
update lost or applied twice -- not the same future, which depends on real timing.
"""

from __future__ import annotations

import enum
import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tessera.core.errors import ConfigError, RoundFailed
from tessera.core.types import Params
from tessera.horizontal.aggregation import FitOutcome, PlainAggregation, require_quorum, validate_fit
from tessera.horizontal.client import client_seed
from tessera.horizontal.pacing import TIME_BUDGET
from tessera.horizontal.scheduling import Step, buffer_step, with_seed
from tessera.horizontal.strategies.base import FitResults
from tessera.runtime.backend import ClientFailure, FailureKind
from tessera.runtime.messages import FitIns, FitRes

if TYPE_CHECKING:
    from tessera.horizontal.server import Server


class Late(enum.Enum):
    DROP = "drop"
    FOLD = "fold"


@dataclass
class _Job:
    client: str
    version: int
    params: Params  # the model the client was sent (its update is taken against it)
    sent: float
    future: Future[Any]


class _Dispatcher:
    """Sends one client's FitIns per call from a thread pool; finished jobs land in `done` in arrival order."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="tessera-dispatch")
        self.done: queue.Queue[_Job] = queue.Queue()
        self.busy: dict[str, _Job] = {}

    def send(self, server: Server, cid: str, ins: FitIns, version: int) -> None:
        def call() -> Any:
            return server.backend.exchange({cid: ins})[cid]

        job = _Job(cid, version, ins.params, time.monotonic(), self.pool.submit(call))
        self.busy[cid] = job
        job.future.add_done_callback(lambda _: self.done.put(job))

    def reply(self, job: _Job) -> Any:
        self.busy.pop(job.client, None)
        try:
            return job.future.result()
        except Exception as exc:  # the backend itself failed (closed under us): that client's failure only
            return ClientFailure(job.client, f"dispatch failed: {type(exc).__name__}", FailureKind.UNREACHABLE)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _check_plain(server: Server, policy: str) -> None:
    if not isinstance(server.aggregation, PlainAggregation):
        raise ConfigError(f"{policy} scheduling takes each client's reply as it lands; it cannot run with "
                          f"{type(server.aggregation).__name__} (secure aggregation needs synchronous rounds)")


def rebase(res: FitRes, sent: Params, current: Params, *, scale: float = 1.0,
           metrics: dict[str, float] | None = None) -> FitRes:
    """`res` as if it had started from `current`: current + scale * (y - x_sent), with `metrics` added."""
    params = {}
    for k, x in current.items():
        new = x.double() + scale * (res.params[k].double() - sent[k].double())
        params[k] = new.to(x.dtype) if x.is_floating_point() else new.round().to(x.dtype)
    return FitRes(params=params, num_examples=res.num_examples, metrics={**res.metrics, **(metrics or {})},
                  extras=res.extras)


class Deadline:
    """Deadline rounds on the real clock (see the module docstring). Give `seconds` or `steps`."""

    def __init__(self, *, seconds: float | None = None, steps: int | None = None, grace: float | None = None,
                 late: Late = Late.DROP, staleness_exponent: float = 0.5) -> None:
        if (seconds is None) == (steps is None):
            raise ConfigError("Deadline: give exactly one of seconds= (a wall-clock budget) or steps= (a step "
                              "budget)")
        if (seconds is not None and seconds <= 0) or (steps is not None and steps < 1):
            raise ConfigError("Deadline: seconds must be > 0 and steps >= 1")
        self.seconds, self.steps, self.late = seconds, steps, late
        self.grace = grace if grace is not None else (0.25 * seconds + 0.05 if seconds is not None else None)
        self.staleness_exponent = staleness_exponent
        self._dispatch: _Dispatcher | None = None

    def _budget(self, ins: FitIns) -> FitIns:
        extra: dict[str, float | int] = ({TIME_BUDGET: self.seconds} if self.seconds is not None
                                         else {"max_steps": int(self.steps or 1)})
        return FitIns(round=ins.round, params=ins.params, config={**ins.config, **extra}, extras=ins.extras)

    def step(self, server: Server, rnd: int) -> Step:
        _check_plain(server, "Deadline")
        if self._dispatch is None:
            self._dispatch = _Dispatcher(len(server.clients))
        d = self._dispatch
        free = [c for c in server.clients if c not in d.busy]
        plan = server.strategy.configure_fit(rnd, server.params, free, server.rng(rnd, 0))
        for cid, ins in plan:
            d.send(server, cid, self._budget(with_seed(ins, client_seed(server.config.seed, rnd, cid))), rnd)
        wait_until = None if self.seconds is None else time.monotonic() + self.seconds + (self.grace or 0.0)
        ok, failed, folded, extended = self._gather(server, rnd, {c for c, _ in plan}, wait_until)
        require_quorum(rnd, len(ok), failed, server.strategy)
        params = server.strategy.aggregate_fit(rnd, ok, server.params)
        steps = {c: float(r.metrics.get("steps", 0.0)) for c, r in ok}
        kept = [(c, FitRes(params={}, num_examples=r.num_examples, metrics=r.metrics)) for c, r in ok]
        record = {"steps": steps, "late_folded": folded, "late_pending": sorted(d.busy), "deadline_extended": extended}
        if rnd >= server.config.rounds:
            self.close()
        return Step(FitOutcome(params, kept, failed), len(plan), record)

    def _gather(self, server: Server, rnd: int, asked: set[str],
                wait_until: float | None) -> tuple[FitResults, list[ClientFailure], list[str], bool]:
        assert self._dispatch is not None
        d = self._dispatch
        ok: FitResults = []
        failed: list[ClientFailure] = []
        folded: list[str] = []
        waiting = set(asked)
        extended = False
        while waiting or (not d.done.empty()):
            left = None if wait_until is None else wait_until - time.monotonic()
            if waiting and left is not None and left <= 0:
                if len(ok) >= server.strategy.min_available:
                    break
                # Past the deadline without a quorum: the clock alone never fails a round; wait for the next reply
                left, extended = None, True
            try:
                job = d.done.get(timeout=left if waiting else 0)
            except queue.Empty:
                continue  # the deadline passed: the check above ends the round or extends it
            reply = d.reply(job)
            good, bad = validate_fit({job.client: reply}, job.params)
            if job.client in waiting:
                waiting.discard(job.client)
                ok.extend(good)
                failed.extend(bad)
            elif good and self.late is Late.FOLD:  # a late reply from an earlier step
                s = float(rnd - job.version)
                w = (1.0 + s) ** -self.staleness_exponent
                ok.append((job.client, rebase(good[0][1], job.params, server.params, scale=w,
                                              metrics={"late_by": s})))
                folded.append(job.client)
            # Late.DROP: a late reply is discarded when it lands; its client was busy until then
        for cid in sorted(waiting):
            failed.append(ClientFailure(cid, f"no reply within the deadline of {self.seconds} s (+ grace); "
                                             f"late policy: {self.late.value}", FailureKind.TIMEOUT))
        return ok, failed, folded, extended

    def close(self) -> None:
        if self._dispatch is not None:
            self._dispatch.close()
            self._dispatch = None

    def state_dict(self) -> dict[str, Any]:
        return {}  # late work in flight is not checkpointed: after a resume those clients train again

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Asynchronous:
    """FedBuff on the real clock (see the module docstring). `buffer_size` and `concurrency` default to the
    strategy's (FedBuff's); `max_failures` failed replies within one step end the run (RoundFailed)."""

    def __init__(self, *, buffer_size: int | None = None, concurrency: int | None = None,
                 max_failures: int | None = None) -> None:
        self.buffer_size, self.concurrency, self.max_failures = buffer_size, concurrency, max_failures
        self.version, self.updates, self.failures, self.dispatched = 0, 0, 0, 0
        self._dispatch: _Dispatcher | None = None
        self.started: float | None = None

    def _check(self, server: Server) -> tuple[int, int]:
        _check_plain(server, "Asynchronous")
        k = self.buffer_size or int(getattr(server.strategy, "buffer_size", 0) or 0)
        if k < 1:
            raise ConfigError("Asynchronous scheduling needs buffer_size >= 1: pass Asynchronous(buffer_size=K) "
                              "or use a buffered strategy (FedBuff)")
        conc = self.concurrency or getattr(server.strategy, "concurrency", None) or len(server.clients)
        return k, min(int(conc), len(server.clients))

    def _fill(self, server: Server, concurrency: int) -> None:
        d = self._dispatch
        assert d is not None
        idle = [c for c in server.clients if c not in d.busy]
        while idle and len(d.busy) < concurrency:
            self.dispatched += 1
            cid = idle.pop(self.dispatched % len(idle))
            config = {**server.strategy.fit_config(self.version),
                      "seed": client_seed(server.config.seed, self.dispatched, cid)}
            d.send(server, cid, FitIns(round=self.version, params=server.params, config=config), self.version)

    def step(self, server: Server, rnd: int) -> Step:
        k, concurrency = self._check(server)
        if self._dispatch is None:
            self._dispatch = _Dispatcher(concurrency)
        if self.started is None:
            self.started = time.monotonic()
        d = self._dispatch
        buffer: FitResults = []
        failures: list[ClientFailure] = []
        limit = self.max_failures or max(10, 2 * k)
        while len(buffer) < k:
            self._fill(server, concurrency)
            job = d.done.get()
            reply = d.reply(job)
            good, bad = validate_fit({job.client: reply}, job.params)
            if bad:
                failures.extend(bad)
                if len(failures) > limit:
                    self.close()
                    raise RoundFailed(f"step {rnd}: {len(failures)} client failures before {k} updates arrived; "
                                      "fix the failing clients (see the warnings) or raise max_failures")
                continue
            buffer.append((job.client, rebase(good[0][1], job.params, server.params,
                                              metrics={"staleness": float(self.version - job.version)})))
        params, kept, staleness = buffer_step(server.strategy, rnd, buffer, server.params)
        self.version += 1
        self.updates += len(buffer)
        self.failures += len(failures)
        record = {"wall_time": time.monotonic() - self.started, "updates": self.updates, **staleness}
        if rnd >= server.config.rounds:
            self.close()
        return Step(FitOutcome(params, kept, failures), len(buffer) + len(failures), record)

    def close(self) -> None:
        if self._dispatch is not None:
            self._dispatch.close()
            self._dispatch = None

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version, "updates": self.updates, "failures": self.failures,
                "dispatched": self.dispatched}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.version, self.updates = int(state["version"]), int(state["updates"])
            self.failures, self.dispatched = int(state["failures"]), int(state["dispatched"])
