"""Wire a horizontal job's parts to a backend and run it: the one path FLModel, the CLI and examples share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tessera.core.errors import ConfigError
from tessera.core.metrics import History
from tessera.core.tracking import RecordLogger
from tessera.core.types import Params
from tessera.horizontal.job import ClientStates, Extension, JobParts, Plugin, compose
from tessera.horizontal.server import Server, ServerConfig
from tessera.horizontal.task import Task, task_get_params
from tessera.runtime.backend import Backend, InProcessBackend

__all__ = ["JobParts", "Plugin", "initial_params", "make_backend", "simulate"]  # JobParts, Plugin: from job.py


class _StoredStates(Extension):
    """A backend that keeps client state itself (Ray's driver or disk store) carries it into checkpoints, and
    adds what it did this round to the record (Ray: pool size, restarts, peak memory)."""

    name = "clients"

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def state_dict(self) -> dict[str, Any]:
        return dict(self.backend.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.backend.load_state_dict(state)

    def on_round_end(self, rnd: int, record: dict[str, Any]) -> None:
        self.backend.on_round_end(rnd, record)


def initial_params(task: Task, seed: int) -> Params:
    """The global model's starting params: `model_fn()` with torch's CPU generator seeded by `seed`.

    (`torch.manual_seed` would also queue lazy CUDA seeding, which formats a stack trace: 0.4 ms per call. Models
    are built on the CPU, so the CPU generator is the one that matters.)"""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return task_get_params(task, task.model_fn())


def make_backend(parts: JobParts, backend: str,
                 options: dict[str, Any] | None = None) -> tuple[Backend, list[Extension]]:
    """Build the backend; returns it and the extra extensions it brings (client state for checkpoints)."""
    options = dict(options or {})
    if backend == "inprocess":
        app = parts.client_app()
        return InProcessBackend(app, **options), [ClientStates(app)]
    if backend == "ray":
        from tessera.runtime.ray import RayBackend

        rb = RayBackend(parts.client_app, **options)
        return rb, [_StoredStates(rb)]
    raise ConfigError(f"job.backend: unknown backend {backend!r}; use 'inprocess' or 'ray'")


def simulate(
    parts: JobParts,
    *,
    rounds: int,
    seed: int = 0,
    output_dir: str | Path | None = None,
    backend: str = "inprocess",
    backend_options: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = False,
    params: Params | None = None,
    plugins: Sequence[Plugin] = (),
    checkpoint_every: int = 1,
    on_server: Callable[[Server], None] | None = None,
    loggers: Sequence[str | RecordLogger] = (),
) -> tuple[History, Params]:
    """Run `rounds` rounds of the job; returns the history and the final global params.

    `plugins` are composed into the job first (`job.compose`: validated together, independent of their order).
    """
    parts = compose(parts, plugins)
    be, extra = make_backend(parts, backend, backend_options)
    server = Server(
        strategy=parts.strategy,
        backend=be,
        clients=parts.clients,
        initial_params=params if params is not None else initial_params(parts.task, seed),
        config=ServerConfig(rounds=rounds, seed=seed, output_dir=output_dir, progress=progress,
                            checkpoint_every=checkpoint_every, loggers=tuple(loggers)),
        aggregation=parts.aggregation,
        central_eval=parts.central_eval,
        extensions=[*parts.extensions, *extra],
    )
    if on_server is not None:
        on_server(server)
    history = server.run(resume=resume)
    return history, server.params
