"""Real-clock pacing of local training: injected per-step delays (heterogeneous speeds) and time budgets.

Two round-config keys, honoured by `PacedTask` around any Task that iterates its training loader once per step
(SupervisedTask does):
- `step_delay` (seconds): sleep before every local step. `Pacing` sets it per client from a seeded spread of
  speeds, so tests, demos and benchmarks run with real stragglers instead of a declared simulated clock.
- `time_budget` (seconds, counted from when the client starts training): stop taking steps once the next one
  would not finish in time. The coordinator's deadline policy sends it (see `realtime.Deadline`). At least one
  step is always taken, so a client slower than the whole budget overruns it and its reply comes late.

The Task reports how many steps it took (`metrics["steps"]`); `PacedTask` adds `train_seconds`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import DataLoader

from tessera.core.errors import ConfigError
from tessera.core.types import Metrics
from tessera.horizontal.client import CallNext, ClientContext
from tessera.horizontal.job import Contribution, JobParts, Plugin
from tessera.horizontal.task import Loaders, SelectsParams, Task
from tessera.runtime.messages import FitIns

STEP_DELAY = "step_delay"
TIME_BUDGET = "time_budget"


def speed_spread(clients: Sequence[str], *, spread: float = 10.0, base_delay: float = 0.002,
                 seed: int = 0) -> dict[str, float]:
    """Seconds of injected delay per local step for each client: log-uniform draws between `base_delay` and
    `base_delay * spread`, with the fastest and slowest pinned to the ends (so the spread is exact whatever the
    draw) and the rest drawn from a `numpy` generator seeded by `seed`."""
    if spread < 1 or base_delay < 0:
        raise ConfigError(f"speed_spread: need spread >= 1 and base_delay >= 0, got {spread}, {base_delay}")
    rng = np.random.default_rng([seed, 0x5BEED])
    u = rng.uniform(0.0, 1.0, len(clients))
    if len(clients) >= 2:
        order = rng.permutation(len(clients))
        u[order[0]], u[order[1]] = 0.0, 1.0
    return {c: float(base_delay * spread**x) for c, x in zip(clients, u, strict=True)}


class _PacedLoader:
    """Iterates a loader, sleeping `delay` before each batch and ending once `stop_at` (monotonic) would be
    passed; the first batch of a training call is always given (at least one step)."""

    def __init__(self, loader: DataLoader[Any], *, delay: float, stop_at: float | None) -> None:
        self.loader, self.delay, self.stop_at = loader, delay, stop_at
        self.dataset = loader.dataset
        self.given = 0
        self._per_step = 0.0  # measured seconds of the last step (compute + delay), to predict the next one

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        last = time.monotonic()
        for batch in self.loader:
            now = time.monotonic()
            if self.given:
                self._per_step = now - last
            last = now
            if self.stop_at is not None and self.given and now + self._per_step > self.stop_at:
                return
            if self.delay > 0:
                time.sleep(self.delay)
            self.given += 1
            yield batch


class PacedTask:
    """A Task whose training honours `step_delay` and `time_budget` (see the module docstring); everything else is
    the inner task's. Wrapping twice is harmless: the outer wrapper takes the keys out of the config."""

    def __init__(self, inner: Task) -> None:
        self.inner = inner

    def model_fn(self) -> nn.Module:
        return self.inner.model_fn()

    def data_fn(self, client_id: str, round: int) -> Loaders:
        return self.inner.data_fn(client_id, round)

    def train(self, model: nn.Module, loader: DataLoader[Any], config: Mapping[str, Any]) -> Metrics:
        start = time.monotonic()
        delay = float(config.get(STEP_DELAY, 0.0))
        budget = config.get(TIME_BUDGET)
        stop_at = start + float(budget) if budget is not None else None
        rest = {k: v for k, v in config.items() if k not in (STEP_DELAY, TIME_BUDGET)}
        if delay <= 0 and stop_at is None:
            return self.inner.train(model, loader, rest)
        paced = _PacedLoader(loader, delay=delay, stop_at=stop_at)
        metrics = dict(self.inner.train(model, paced, rest))  # type: ignore[arg-type]
        metrics["train_seconds"] = time.monotonic() - start
        return metrics

    def evaluate(self, model: nn.Module, loader: DataLoader[Any]) -> tuple[float, Metrics]:
        return self.inner.evaluate(model, loader)


class _SelectingPacedTask(PacedTask):
    """PacedTask over a task that chooses which tensors travel (LoRA): keeps that choice."""

    inner: SelectsParams  # type: ignore[assignment]

    def get_params(self, model: nn.Module) -> Any:
        return self.inner.get_params(model)

    def set_params(self, model: nn.Module, params: Any) -> None:
        self.inner.set_params(model, params)


def paced(task: Task) -> Task:
    """`task` wrapped by PacedTask (keeping SelectsParams when the task has it)."""
    if isinstance(task, PacedTask):
        return task
    return _SelectingPacedTask(task) if isinstance(task, SelectsParams) else PacedTask(task)


class Pacing(Plugin):
    """Inject heterogeneous speeds: client c sleeps `delays[c]` seconds before each local step.

    >>> from tessera.horizontal.pacing import Pacing, speed_spread
    >>> plugin = Pacing(speed_spread(["c0", "c1"], spread=10.0, base_delay=0.01))
    """

    name = "pacing"

    def __init__(self, delays: Mapping[str, float]) -> None:
        if any(d < 0 for d in delays.values()):
            raise ConfigError("Pacing: step delays must be >= 0 seconds")
        self.delays = dict(delays)

    def contribute(self, parts: JobParts) -> Contribution:
        missing = [c for c in parts.clients if c not in self.delays]
        if missing:
            raise ConfigError(f"Pacing: no step delay for {len(missing)} client(s), e.g. {missing[0]!r}; give "
                              "every client one (speed_spread builds them)")
        return Contribution(plugin=self.name, roles=frozenset({"pacing"}), wrap_task=paced,
                            mods=(self.mod,))

    def mod(self, msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
        if isinstance(msg, FitIns):
            ctx.train_config[STEP_DELAY] = self.delays[ctx.client]
        return call_next(msg, ctx)
