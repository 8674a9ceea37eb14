"""Scheduling policies: what the round loop dispatches and when a server step happens.

`Server.run_round` asks its policy for one server step. `Synchronous` (the default) is a classic round: the
strategy samples clients, the job's `Aggregation` gathers their replies, the strategy aggregates. `Buffered` is
FedBuff on a simulated clock: `concurrency` clients train at once; a client that starts at simulated time t from
model version v runs its local steps (for real, through the backend, so mods, serde and validation are the same)
and its update arrives at t + steps / speed. Arrivals are taken in time order and every `buffer_size` successful
ones make a server step; each arriving client is sent the newest model at the start of the next step. Nothing
sleeps: time is a number. Rejected updates (NaN/Inf, wrong shape, a crash) are failures and never buffered.

A policy's state (for `Buffered`: clock, version, the in-flight arrivals with their deltas, idle clients) goes into
the server's checkpoint, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from tessera.core.errors import ConfigError, RoundFailed
from tessera.core.types import Params
from tessera.horizontal.aggregation import FitOutcome, PlainAggregation, validate_fit
from tessera.horizontal.client import client_seed
from tessera.horizontal.strategies.base import FitResults, Strategy
from tessera.runtime.backend import ClientFailure, FailureKind
from tessera.runtime.messages import FitIns, FitRes

if TYPE_CHECKING:
    from tessera.horizontal.server import Server


@dataclass(frozen=True)
class Step:
    """One server step: the fit outcome, how many client replies it took, and the policy's own record keys."""

    outcome: FitOutcome
    sampled: int
    record: dict[str, Any] = field(default_factory=dict)


class Scheduling(Protocol):
    def step(self, server: Server, rnd: int) -> Step: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Synchronous:
    """A synchronous round: sample, send FitIns to all, aggregate when the replies are in."""

    def step(self, server: Server, rnd: int) -> Step:
        plan = server.strategy.configure_fit(rnd, server.params, server.clients, server.rng(rnd, 0))
        plan = [(c, with_seed(ins, client_seed(server.config.seed, rnd, c))) for c, ins in plan]
        outcome = server.aggregation.run(rnd, plan, server.backend, server.strategy, server.params,
                                         timeout=server.config.fit_timeout)
        return Step(outcome, len(plan))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass(order=True)
class _Arrival:
    time: float
    seq: int
    client: str = field(compare=False)
    version: int = field(compare=False)
    reply: FitRes | ClientFailure = field(compare=False)  # a FitRes holds the delta y - x_version, in float64


class Buffered:
    """FedBuff's asynchronous schedule on a simulated clock (see the module docstring).

    `speeds` maps every client to local steps per simulated second; `buffer_size` (K) and `concurrency` default
    to the strategy's (FedBuff's) own. `max_failures` failed arrivals within one step end the run (RoundFailed).
    """

    def __init__(self, *, speeds: Mapping[str, float], buffer_size: int | None = None,
                 concurrency: int | None = None, max_failures: int | None = None) -> None:
        self.speeds = dict(speeds)
        self.buffer_size, self.concurrency, self.max_failures = buffer_size, concurrency, max_failures
        self.clock, self.version, self.updates, self.failures, self.dispatched = 0.0, 0, 0, 0, 0
        self.queue: list[_Arrival] = []
        self.idle: list[str] | None = None  # None: nobody dispatched yet (all clients idle)

    def _check(self, server: Server) -> tuple[int, int]:
        k = self.buffer_size or int(getattr(server.strategy, "buffer_size", 0) or 0)
        if k < 1:
            raise ConfigError("Buffered scheduling needs buffer_size >= 1: pass Buffered(buffer_size=K) or use "
                              "a buffered strategy (FedBuff)")
        missing = [c for c in server.clients if self.speeds.get(c, 0) <= 0]
        if missing:
            raise ConfigError(f"Buffered scheduling: give every client a positive speed; missing for "
                              f"{len(missing)} client(s), e.g. {missing[0]!r}")
        if not isinstance(server.aggregation, PlainAggregation):
            raise ConfigError("Buffered scheduling aggregates plain updates one by one; it cannot run with "
                              f"{type(server.aggregation).__name__} (use synchronous rounds)")
        conc = self.concurrency or getattr(server.strategy, "concurrency", None) or len(server.clients)
        return k, min(int(conc), len(server.clients))

    def _dispatch(self, server: Server, concurrency: int) -> None:
        """Start idle clients until `concurrency` are busy; each trains now and arrives later."""
        assert self.idle is not None
        while self.idle and len(self.queue) < concurrency:
            self.dispatched += 1
            rng = np.random.default_rng([server.config.seed, 0xFEDB, self.dispatched])
            cid = self.idle.pop(int(rng.integers(len(self.idle))))
            config = {**server.strategy.fit_config(self.version), "seed": client_seed(server.config.seed,
                                                                                     self.dispatched, cid)}
            ins = FitIns(round=self.version, params=server.params, config=config)
            reply = server.backend.exchange({cid: ins})[cid]
            ok, failed = validate_fit({cid: reply}, server.params)
            # A rejected update cost its client the training time; a crash costs one step (a retry back-off), so
            # a client that always fails cannot spin at one instant of simulated time.
            steps = float(reply.metrics.get("steps", 1.0)) if isinstance(reply, FitRes) else 1.0
            arrival = self.clock + max(steps, 1.0) / self.speeds[cid]
            item: FitRes | ClientFailure = failed[0] if failed else _delta(ok[0][1], server.params)
            heapq.heappush(self.queue, _Arrival(arrival, self.dispatched, cid, self.version, item))

    def step(self, server: Server, rnd: int) -> Step:
        k, concurrency = self._check(server)
        if self.idle is None:
            self.idle = list(server.clients)
        buffer: FitResults = []
        failures: list[ClientFailure] = []
        limit = self.max_failures or max(10, 2 * k)
        while len(buffer) < k:
            self._dispatch(server, concurrency)
            a = heapq.heappop(self.queue)
            self.clock = a.time
            self.idle.append(a.client)
            if isinstance(a.reply, ClientFailure):
                failures.append(a.reply)
                if len(failures) > limit:
                    raise RoundFailed(f"step {rnd}: {len(failures)} client failures before {k} updates arrived; "
                                      "fix the failing clients (see the warnings) or raise max_failures")
                continue
            buffer.append((a.client, _rebased(a, server.params, self.version)))
        params, kept, staleness = buffer_step(server.strategy, rnd, buffer, server.params)
        self.version += 1
        self.updates += len(buffer)
        self.failures += len(failures)
        record = {"sim_time": self.clock, "updates": self.updates, **staleness}
        return Step(FitOutcome(params, kept, failures), len(buffer) + len(failures), record)

    # ------------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        queue = [{"time": a.time, "seq": a.seq, "client": a.client, "version": a.version, **_reply_state(a.reply)}
                 for a in self.queue]
        return {"clock": self.clock, "version": self.version, "updates": self.updates, "failures": self.failures,
                "dispatched": self.dispatched, "idle": self.idle, "queue": queue}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clock, self.version = float(state["clock"]), int(state["version"])
        self.updates, self.failures = int(state["updates"]), int(state["failures"])
        self.dispatched, self.idle = int(state["dispatched"]), state["idle"]
        self.queue = [_Arrival(float(q["time"]), int(q["seq"]), q["client"], int(q["version"]), _reply_load(q))
                      for q in state["queue"]]
        heapq.heapify(self.queue)


def with_seed(ins: FitIns, seed: int) -> FitIns:
    return FitIns(round=ins.round, params=ins.params, config={**ins.config, "seed": seed}, extras=ins.extras)


def _delta(res: FitRes, current: Params) -> FitRes:
    delta = {k: res.params[k].double() - current[k].double() for k in current}
    return FitRes(params=delta, num_examples=res.num_examples, metrics=res.metrics, extras=res.extras)


def _rebased(a: _Arrival, current: Params, version: int) -> FitRes:
    """The update as if it started from the current model, with its staleness in the metrics."""
    assert isinstance(a.reply, FitRes)
    params = {k: _cast(current[k].double() + a.reply.params[k], current[k]) for k in current}
    metrics = {**a.reply.metrics, "staleness": float(version - a.version)}
    return FitRes(params=params, num_examples=a.reply.num_examples, metrics=metrics, extras=a.reply.extras)


def _reply_state(reply: FitRes | ClientFailure) -> dict[str, Any]:
    if isinstance(reply, ClientFailure):
        return {"failure": {"reason": reply.reason, "kind": reply.kind.value}}
    return {"delta": reply.params, "num_examples": reply.num_examples, "metrics": reply.metrics,
            "extras": reply.extras}


def _reply_load(q: dict[str, Any]) -> FitRes | ClientFailure:
    if "failure" in q:
        return ClientFailure(q["client"], q["failure"]["reason"], FailureKind(q["failure"]["kind"]))
    return FitRes(params=q["delta"], num_examples=int(q["num_examples"]), metrics=q["metrics"], extras=q["extras"])


def _cast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(like.dtype) if like.is_floating_point() else x.round().to(like.dtype)


def buffer_step(strategy: Strategy, rnd: int, buffer: FitResults,
                current: Params) -> tuple[Params, FitResults, dict[str, float]]:
    """The server step of a buffered (FedBuff) policy: the new params, the replies as the round records them
    (counts and metrics, staleness taken out) and the staleness facts for the record."""
    params = strategy.aggregate_fit(rnd, buffer, current)
    stale = [r.metrics["staleness"] for _, r in buffer]
    kept = [(c, FitRes(params={}, num_examples=r.num_examples,
                       metrics={m: v for m, v in r.metrics.items() if m != "staleness"})) for c, r in buffer]
    return params, kept, {"staleness_mean": float(np.mean(stale)), "staleness_max": float(max(stale))}
