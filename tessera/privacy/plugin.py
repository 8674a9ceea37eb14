"""`[dp]` in job.toml -> a Plugin. Two modes: sample-level DP-SGD at every client, or client-level DP of updates.

```toml
[dp]                       # DP-SGD (Opacus) at every client, per-client epsilon, budget enforced
mode = "dpsgd"
noise_multiplier = 1.1     # or target_epsilon = 3.0 with planned_rounds = 10
max_grad_norm = 1.0
delta = 1e-5
budget = 3.0

[dp]                       # client-level DP of whole updates (DP-FedAvg)
mode = "client"
clip = 0.5
noise_multiplier = 1.0
kind = "central"           # or "distributed" (clients add noise shares; pair with secure aggregation)
```
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tessera.core.config import validate
from tessera.core.errors import ConfigError
from tessera.horizontal.job import Plugin
from tessera.privacy.client_dp import ClientLevelDP
from tessera.privacy.dpsgd import DPSGD


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    delta: float = Field(1e-5, gt=0, lt=1)
    budget: float | None = Field(None, gt=0)
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"


class DPSGDSpec(_Spec):
    mode: Literal["dpsgd"] = "dpsgd"
    noise_multiplier: float | None = Field(None, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    target_epsilon: float | None = Field(None, gt=0)
    planned_rounds: int | None = Field(None, ge=1)
    clipping: Literal["flat", "per_layer"] = "flat"
    reproducible: bool = False


class ClientSpec(_Spec):
    mode: Literal["client"] = "client"
    clip: float = Field(gt=0)
    noise_multiplier: float = Field(ge=0)
    kind: Literal["central", "distributed"] = "central"
    seed: int | None = None


def plugin(spec: dict[str, Any]) -> Plugin:
    """The plugin for a `[dp]` section; raises ConfigError naming the offending key."""
    mode = spec.get("mode", "dpsgd")
    if mode == "dpsgd":
        s = validate(DPSGDSpec, spec, source="dp")
        return DPSGD(**s.model_dump(exclude={"mode"}))
    if mode == "client":
        c = validate(ClientSpec, spec, source="dp")
        return ClientLevelDP(clip=c.clip, noise_multiplier=c.noise_multiplier, mode=c.kind, delta=c.delta,
                             budget=c.budget, accountant=c.accountant, seed=c.seed)
    raise ConfigError(f"dp.mode: unknown mode {mode!r}; use 'dpsgd' (sample-level DP-SGD) or 'client' "
                      "(client-level DP of updates)")
