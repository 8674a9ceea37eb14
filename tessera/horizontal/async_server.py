"""Event-driven asynchronous federation on a simulated clock: the driver for FedBuff.

`concurrency` clients train at once. A client that starts at simulated time t from model version v runs its local
steps (for real, through the job's ClientApp and an in-process backend, so mods, serde and validation are the
same as in synchronous rounds) and its update arrives at t + steps / speed. Arrivals are processed in time order;
every `buffer_size` arrivals the strategy takes a server step, and each arriving client is immediately sent the
newest model again. Nothing sleeps: time is a number.

Updates the server rejects (NaN/Inf, wrong shape, a client exception) are counted as failures and never buffered.
This driver keeps no checkpoint (an asynchronous run has no round boundary to resume from exactly); use
synchronous rounds (DeadlineRounds) when resume matters.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.core.errors import ConfigError, RoundFailed
from tessera.core.logging import get_logger
from tessera.core.metrics import History, MetricsWriter
from tessera.core.types import Params, clone
from tessera.horizontal.aggregation import validate_fit
from tessera.horizontal.client import client_seed
from tessera.horizontal.simulation import JobParts, initial_params, make_backend
from tessera.horizontal.strategies.base import FitResults
from tessera.runtime.backend import Backend, ClientFailure
from tessera.runtime.messages import FitIns, FitRes

log = get_logger(__name__)


@dataclass(order=True)
class _Arrival:
    time: float
    seq: int
    client: str = field(compare=False)
    version: int = field(compare=False)
    delta: Params | None = field(compare=False)  # y - x_version, or None for a failure
    reply: FitRes | ClientFailure = field(compare=False)


@dataclass
class AsyncRun:
    """The state of an asynchronous run (what `simulate_async` returns besides the history)."""

    params: Params
    clock: float = 0.0
    version: int = 0
    updates: int = 0
    failures: int = 0
    dispatched: int = 0


class _Driver:
    def __init__(self, parts: JobParts, backend: Backend, *, speeds: Mapping[str, float], params: Params,
                 seed: int, concurrency: int) -> None:
        self.parts, self.backend, self.speeds, self.seed = parts, backend, dict(speeds), seed
        self.run = AsyncRun(params=params)
        self.concurrency = concurrency
        self.queue: list[_Arrival] = []
        self.idle = list(parts.clients)
        self.rng = np.random.default_rng([seed, 0xFEDB])

    def dispatch(self) -> None:
        """Start idle clients until `concurrency` are busy; each trains now and arrives later."""
        while self.idle and len(self.queue) < self.concurrency:
            cid = self.idle.pop(int(self.rng.integers(len(self.idle))))
            run = self.run
            run.dispatched += 1
            seed = client_seed(self.seed, run.dispatched, cid)
            config = {**self.parts.strategy.fit_config(run.version), "seed": seed}
            reply = self.backend.exchange({cid: FitIns(round=run.version, params=run.params, config=config)})[cid]
            ok, failed = validate_fit({cid: reply}, run.params)
            # A rejected update cost its client the training time; a crash costs one step (a retry back-off), so
            # a client that always fails cannot spin at one instant of simulated time.
            steps = float(reply.metrics.get("steps", 1.0)) if isinstance(reply, FitRes) else 1.0
            arrival = run.clock + max(steps, 1.0) / self.speeds[cid]
            if failed:
                heapq.heappush(self.queue, _Arrival(arrival, run.dispatched, cid, run.version, None, failed[0]))
                continue
            res = ok[0][1]
            delta = {k: res.params[k].double() - run.params[k].double() for k in run.params}
            heapq.heappush(self.queue, _Arrival(arrival, run.dispatched, cid, run.version, delta, res))

    def rebased(self, a: _Arrival) -> tuple[str, FitRes]:
        """The update as if it started from the current model, with its staleness in the metrics."""
        assert a.delta is not None and isinstance(a.reply, FitRes)
        cur = self.run.params
        params = {k: _cast(cur[k].double() + a.delta[k], cur[k]) for k in cur}
        metrics = {**a.reply.metrics, "staleness": float(self.run.version - a.version)}
        return a.client, FitRes(params=params, num_examples=a.reply.num_examples, metrics=metrics,
                                extras=a.reply.extras)


def simulate_async(parts: JobParts, *, speeds: Mapping[str, float], updates: int, seed: int = 0,
                   params: Params | None = None, output_dir: str | Path | None = None) -> tuple[History, AsyncRun]:
    """Run until `updates` client updates have been aggregated; one history record per server step.

    `parts.strategy` supplies `buffer_size` and `concurrency` (FedBuff); `speeds` maps every client to local
    steps per simulated second. Records carry `sim_time`, `updates`, staleness and central evaluation.
    """
    strategy = parts.strategy
    buffer_size = int(getattr(strategy, "buffer_size", 0) or getattr(getattr(strategy, "inner", None),
                                                                      "buffer_size", 0))
    if buffer_size < 1:
        raise ConfigError("simulate_async needs a buffered strategy (FedBuff) with buffer_size >= 1")
    missing = [c for c in parts.clients if c not in speeds or speeds[c] <= 0]
    if missing:
        raise ConfigError(f"simulate_async: give every client a positive speed; missing for {len(missing)} client(s)")
    concurrency = int(getattr(strategy, "concurrency", None) or len(parts.clients))
    backend, _ = make_backend(parts, "inprocess")
    driver = _Driver(parts, backend, speeds=speeds, seed=seed, concurrency=min(concurrency, len(parts.clients)),
                     params=clone(params) if params is not None else initial_params(parts.task, seed))
    writer = MetricsWriter(Path(output_dir) / "metrics.jsonl") if output_dir else None
    history = History()
    buffer: FitResults = []
    staleness: list[float] = []
    run = driver.run
    backend.start(list(parts.clients))
    try:
        driver.dispatch()
        while run.updates < updates:
            arrival = heapq.heappop(driver.queue)
            run.clock = arrival.time
            driver.idle.append(arrival.client)
            if arrival.delta is None:
                run.failures += 1
                if run.failures > max(updates, 10):
                    raise RoundFailed(f"{run.failures} client failures before {updates} updates arrived; fix the "
                                      "failing clients (see the warnings) or lower the number of updates")
            else:
                cid, res = driver.rebased(arrival)
                buffer.append((cid, res))
                staleness.append(res.metrics["staleness"])
            if len(buffer) >= buffer_size:
                run.params = strategy.aggregate_fit(run.version + 1, buffer, run.params)
                run.version += 1
                run.updates += len(buffer)
                record = _record(run, staleness, parts, backend)
                history.append(record)
                if writer is not None:
                    writer.write(record)
                buffer, staleness = [], []
            driver.dispatch()
    finally:
        backend.close()
    return history, run


def _record(run: AsyncRun, staleness: list[float], parts: JobParts, backend: Backend) -> dict[str, Any]:
    record: dict[str, Any] = {"round": run.version, "sim_time": run.clock, "updates": run.updates,
                              "clients_failed": run.failures, "staleness_mean": float(np.mean(staleness)),
                              "staleness_max": float(max(staleness)), "bytes_up_total": backend.traffic.up,
                              "bytes_down_total": backend.traffic.down}
    if parts.central_eval is not None:
        loss, metrics = parts.central_eval(run.params)
        record.update(central_loss=loss, central_metrics=metrics)
    return record


def _cast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(like.dtype) if like.is_floating_point() else x.round().to(like.dtype)
