"""The `[ray]` section of job.toml (and `RayBackend(**options)`): where Ray runs, how big the pool is, memory caps.

Every key is optional; the defaults start a small local Ray (at most 2 CPUs, a 256 MiB object store) with one
single-threaded actor per CPU.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tessera.core.errors import ConfigError

MIB = 1024**2
_MIN_OBJECT_STORE = 75 * MIB  # Ray refuses smaller object stores
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": MIB, "mb": 1000**2, "mib": MIB,
          "g": 1024**3, "gb": 1000**3, "gib": 1024**3}


def parse_bytes(value: Any, *, key: str) -> int:
    """An int of bytes, or a string such as "256MiB", "1.5GiB", "300MB" -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a size such as 268435456 or '256MiB', got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(f"{key} must be a size such as 268435456 or '256MiB', got {value!r}")


class RayOptions(BaseModel):
    """Validated options of the Ray backend (job.toml `[ray]`).

    - `ray_address`: connect to an existing cluster ("auto", "ray://head:10001", "10.0.0.1:6379"); unset starts
      a local Ray owned by this run, shut down at the end. If Ray is already initialised in this process the
      backend reuses it and leaves it running.
    - `runtime_env`: Ray's runtime environment for the actors (e.g. `{"py_modules": [...]}` or `{"working_dir":
      "."}` so cluster nodes can import your task's module); passed to `ray.init`.
    - `num_cpus`, `object_store_memory`: the local Ray's CPU count and object-store cap (local start only).
    - `model_bytes`: the size of the params an exchange carries; a local object store is then made large enough
      to hold one exchange without spilling (`store_bytes`). FLModel sets it from its model.
    - `num_actors`: pool size; default = cluster CPUs // `actor_cpus` (at most the number of clients), and never
      more actors than the cluster's GPUs hold when each reserves `actor_gpus` (`pool_size`).
    - `actor_cpus`, `actor_gpus`, `actor_memory`, `actor_resources`: what each actor reserves from the scheduler.
      `actor_gpus` may be a fraction (0.25: four actors share a GPU); each actor then sees only the GPU Ray
      assigned it (as cuda:0), where a task with device "cuda" or "auto" places its models.
    - `state_dir`: keep per-client state on disk under this folder instead of in the driver's memory.
    - `max_inflight`: requests queued per actor at once (2 hides Ray's round trip; a dead actor's queued
      requests, which never ran, go to other actors).
    - `torch_threads`: torch intra-op threads per actor. (Which clients' DataLoaders an actor keeps is the Task's
      choice: `SupervisedTask(max_cached_clients=...)` bounds it for round-independent data.)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ray_address: str | None = None
    runtime_env: dict[str, Any] | None = None
    num_cpus: int | None = Field(None, ge=1)
    object_store_memory: int = 256 * MIB
    model_bytes: int | None = Field(None, ge=0)
    num_actors: int | None = Field(None, ge=1)
    actor_cpus: float = Field(1.0, gt=0)
    actor_gpus: float = Field(0.0, ge=0)
    actor_memory: int | None = None
    actor_resources: dict[str, float] = {}
    state_dir: str | None = None
    torch_threads: int = Field(1, ge=1)
    max_inflight: int = Field(2, ge=1)
    max_message_bytes: int = Field(2 * 1024**3, ge=1024)
    log_to_driver: bool = False
    start_timeout: float = Field(300.0, gt=0)

    @field_validator("object_store_memory", mode="before")
    @classmethod
    def _store_size(cls, v: Any) -> int:
        size = parse_bytes(v, key="object_store_memory")
        if size < _MIN_OBJECT_STORE:
            raise ValueError(f"object_store_memory must be at least 75MiB (Ray's minimum), got {size} bytes")
        return size

    @field_validator("actor_memory", mode="before")
    @classmethod
    def _actor_memory(cls, v: Any) -> int | None:
        return None if v is None else parse_bytes(v, key="actor_memory")

    def local_cpus(self) -> int:
        """CPUs a locally started Ray gets: `num_cpus`, else min(2, this machine's CPUs)."""
        return self.num_cpus or max(1, min(2, os.cpu_count() or 1))

    def store_bytes(self) -> int:
        """A local object store's size: `object_store_memory`, or more when `model_bytes` needs it: the shared
        params once, plus a reply (about a model) for every request in flight on every actor, plus 64 MiB for
        Ray's own objects."""
        if self.model_bytes is None:
            return self.object_store_memory
        actors = self.num_actors or max(1, int(self.local_cpus() // self.actor_cpus))
        need = (1 + actors * self.max_inflight) * self.model_bytes + 64 * MIB
        return max(self.object_store_memory, need)

    def pool_size(self, resources: Mapping[str, float], clients: int) -> int:
        """Actors to start on a cluster with `resources` (Ray's cluster_resources): CPUs // actor_cpus or
        `num_actors`, capped by GPUs // actor_gpus when actors reserve GPUs, and by the number of clients."""
        size = self.num_actors or max(1, int(float(resources.get("CPU", 1.0)) // self.actor_cpus))
        if self.actor_gpus:
            gpus = float(resources.get("GPU", 0.0))
            fit = math.floor(gpus / self.actor_gpus + 1e-9)
            if fit < 1:
                raise ConfigError(f"ray: actor_gpus={self.actor_gpus:g} but the Ray cluster has {gpus:g} GPUs; start "
                                  "Ray on a GPU machine (ray start --num-gpus=N) or set actor_gpus = 0")
            size = min(size, fit)
        return max(1, min(size, clients))

    def actor_options(self) -> dict[str, Any]:
        """Keyword arguments for `ActorClass.options(...)`."""
        opts: dict[str, Any] = {"num_cpus": self.actor_cpus, "max_restarts": 0, "max_concurrency": 1}
        if self.actor_gpus:
            opts["num_gpus"] = self.actor_gpus
        if self.actor_memory is not None:
            opts["memory"] = self.actor_memory
        if self.actor_resources:
            opts["resources"] = dict(self.actor_resources)
        return opts
