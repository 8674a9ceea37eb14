"""Asynchronous FedBuff as a one-call helper: the job's `Server` under the `Buffered` scheduling policy.

There is one round loop (server.py); this module only picks the number of server steps and hands the policy to
it, so an asynchronous run writes the same metrics.jsonl records and the same checkpoints as synchronous rounds
(resume continues from the in-flight updates). See `tessera.horizontal.scheduling.Buffered` for the schedule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tessera.core.errors import ConfigError
from tessera.core.metrics import History
from tessera.core.types import Params
from tessera.horizontal.scheduling import Buffered
from tessera.horizontal.server import Server
from tessera.horizontal.simulation import JobParts, simulate


@dataclass(frozen=True)
class AsyncRun:
    """Where an asynchronous run ended (what `simulate_async` returns besides the history)."""

    params: Params
    clock: float
    version: int
    updates: int
    failures: int
    dispatched: int


def simulate_async(parts: JobParts, *, speeds: Mapping[str, float], updates: int, seed: int = 0,
                   params: Params | None = None, output_dir: str | Path | None = None,
                   resume: bool = False) -> tuple[History, AsyncRun]:
    """Run server steps until at least `updates` client updates have been aggregated (one record per step).

    `parts.strategy` supplies `buffer_size` and `concurrency` (FedBuff); `speeds` maps every client to local steps
    per simulated second. Records carry the synchronous keys plus `sim_time`, `updates` and staleness.
    """
    k = int(getattr(parts.strategy, "buffer_size", 0) or 0)
    if k < 1:
        raise ConfigError("simulate_async needs a buffered strategy (FedBuff) with buffer_size >= 1")
    policy = Buffered(speeds=speeds)

    def use_policy(server: Server) -> None:
        server.scheduling = policy

    history, final = simulate(parts, rounds=-(-updates // k), seed=seed, params=params, output_dir=output_dir,
                              resume=resume, on_server=use_policy)
    return history, AsyncRun(final, policy.clock, policy.version, policy.updates, policy.failures,
                             policy.dispatched)
