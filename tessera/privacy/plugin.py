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

from typing import Any

from tessera.core.errors import ConfigError
from tessera.horizontal.job import Plugin
from tessera.privacy.client_dp import ClientDPConfig, ClientLevelDP
from tessera.privacy.dpsgd import DPSGD
from tessera.privacy.opacus import DPConfig


def plugin(spec: dict[str, Any]) -> Plugin:
    """The plugin for a `[dp]` section; raises ConfigError naming the offending key. The keys are those of the
    plugin's own config model (DPConfig, ClientDPConfig), so job.toml and Python accept the same settings."""
    rest = {k: v for k, v in spec.items() if k != "mode"}
    mode = spec.get("mode", "dpsgd")
    if mode == "dpsgd":
        return DPSGD(DPConfig(**rest))
    if mode == "client":
        return ClientLevelDP(ClientDPConfig(**rest))
    raise ConfigError(f"dp.mode: unknown mode {mode!r}; use 'dpsgd' (sample-level DP-SGD) or 'client' "
                      "(client-level DP of updates)")
