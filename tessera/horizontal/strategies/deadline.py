"""Deadline rounds on a simulated clock: each client does as many local steps as fit in the round's time budget.

Parties have different hardware. A synchronous round lasts as long as its slowest client; a deadline round
lasts at most `deadline` seconds: client i gets `max_steps = floor(deadline * speed_i)` (SupervisedTask stops
there) and reports the steps it ran, which FedNova then normalises. Time is simulated — client i needs
steps / speed_i seconds — so tests and demos measure wall time without sleeping.

`DeadlineRounds(inner, speeds=..., deadline=None)` is the synchronous baseline on the same clock: no step cap,
each round lasts max_i steps_i / speed_i.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tessera.core.errors import ConfigError
from tessera.core.types import Params
from tessera.horizontal.strategies.base import FitResults, Strategy, StrategyWrapper
from tessera.runtime.messages import FitIns


class DeadlineRounds(StrategyWrapper):
    """Wraps a strategy with per-client step budgets and a simulated clock.

    `speeds`: client -> local optimizer steps per simulated second. `deadline`: seconds per round (None: wait for
    the slowest client). After a run, `clock` is the simulated time spent, `round_times` the time of each round,
    `updates` the number of client updates aggregated; all three are kept in checkpoints.
    """

    label = "deadline"

    def __init__(self, inner: Strategy, *, speeds: Mapping[str, float], deadline: float | None = None,
                 min_steps: int = 1) -> None:
        if any(s <= 0 for s in speeds.values()):
            raise ConfigError("DeadlineRounds: every client speed (steps per second) must be positive")
        if deadline is not None and deadline <= 0:
            raise ConfigError(f"DeadlineRounds: deadline must be positive seconds, got {deadline}")
        if min_steps < 1:
            raise ConfigError(f"DeadlineRounds: min_steps must be at least 1, got {min_steps}")
        super().__init__(inner)
        self.speeds = dict(speeds)
        self.deadline = deadline
        self.min_steps = min_steps
        self.clock = 0.0
        self.round_times: list[float] = []
        self.updates = 0

    def budget(self, client: str) -> int | None:
        """The client's step budget in a round (None: unlimited)."""
        if client not in self.speeds:
            raise ConfigError(f"DeadlineRounds: no speed for client {client!r}; give every client a speed")
        if self.deadline is None:
            return None
        return max(self.min_steps, math.floor(self.deadline * self.speeds[client]))

    def configure_fit(self, rnd: int, params: Params, clients: Sequence[str],
                      rng: np.random.Generator) -> list[tuple[str, FitIns]]:
        plan = self.inner.configure_fit(rnd, params, clients, rng)
        out = []
        for cid, ins in plan:
            cap = self.budget(cid)
            config = ins.config if cap is None else {**ins.config, "max_steps": cap}
            out.append((cid, FitIns(round=ins.round, params=ins.params, config=config, extras=ins.extras)))
        return out

    def aggregate_fit(self, rnd: int, results: FitResults, current: Params) -> Params:
        took = [float(r.metrics.get("steps", 0.0)) / self.speeds[cid] for cid, r in results]
        seconds = max(took, default=0.0)  # the last reply closes the round (min_steps may overrun a deadline)
        self.clock += seconds
        self.round_times.append(seconds)
        self.updates += len(results)
        return self.inner.aggregate_fit(rnd, results, current)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "clock": self.clock, "round_times": list(self.round_times),
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.clock = float(state["clock"])
        self.round_times = [float(t) for t in state["round_times"]]
        self.updates = int(state["updates"])
