"""FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation").

Clients train asynchronously from whatever model version was current when they started; the server buffers
their deltas and takes a step after every `buffer_size` (K) arrivals:

    x <- x + server_lr * (1 / K) * sum_{i in buffer} w(s_i) (y_i - x_{t_i}),   w(s) = 1 / (1 + s)^staleness_exponent

where s_i is how many server steps happened since client i downloaded x_{t_i} (0.5 gives the paper's
1 / sqrt(1 + s)). A slow party never stalls the federation: its late update just counts less.

This class is the aggregation rule; `tessera.horizontal.async_server.simulate_async` is the event-driven driver
(simulated clock) that feeds it. The driver rebases each update onto the current model (it passes
x + (y_i - x_{t_i}) as the client's params) and puts s_i in FitRes.metrics["staleness"], so the rule is a plain
`aggregate_fit` and wrappers such as ClipUpdates compose with it. In a synchronous round every s_i is 0 and
FedBuff is the unweighted mean of the updates.
"""

from __future__ import annotations

from typing import Any

import torch

from tessera.core.errors import ConfigError
from tessera.core.types import Params
from tessera.horizontal.strategies.base import FitResults, Strategy


class FedBuff(Strategy):
    """Buffered asynchronous aggregation. `concurrency`: clients training at once (default: all)."""

    name = "fedbuff"

    def __init__(self, *, buffer_size: int = 10, concurrency: int | None = None, server_lr: float = 1.0,
                 staleness_exponent: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if buffer_size < 1:
            raise ConfigError(f"strategy.buffer_size: must be at least 1, got {buffer_size}")
        if concurrency is not None and concurrency < 1:
            raise ConfigError(f"strategy.concurrency: must be at least 1, got {concurrency}")
        if server_lr <= 0 or staleness_exponent < 0:
            raise ConfigError("strategy: need server_lr > 0 and staleness_exponent >= 0")
        self.buffer_size = buffer_size
        self.concurrency = concurrency
        self.server_lr = server_lr
        self.staleness_exponent = staleness_exponent

    def staleness_weight(self, staleness: float) -> float:
        if staleness < 0:
            raise ConfigError(f"fedbuff: staleness must be >= 0, got {staleness}")
        return float((1.0 + staleness) ** -self.staleness_exponent)

    def aggregate_fit(self, rnd: int, results: FitResults, current: Params) -> Params:
        weights = [self.staleness_weight(r.metrics.get("staleness", 0.0)) for _, r in results]
        out: Params = {}
        for k, x in current.items():
            acc = torch.zeros(x.shape, dtype=torch.float64)
            for w, (_, r) in zip(weights, results, strict=True):
                acc += w * (r.params[k].double() - x.double())
            new = x.double() + self.server_lr * acc / len(results)
            out[k] = new.to(x.dtype) if x.is_floating_point() else new.round().to(x.dtype)
        return out
