"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization"): normalised averaging for clients that ran different numbers of local steps.

FedAvg weights a client that ran 10x more steps 10x more in the direction it moved, which biases the model
towards fast clients' objectives. FedNova divides each update by its client's step count first:

    a_i = ||a_i||_1 = tau_i                                       (plain local SGD)
        = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)    (local SGD with momentum rho)
    x <- x + server_lr * tau_eff * sum_i p_i (y_i - x) / a_i,   tau_eff = sum_i p_i a_i,   p_i = n_i / sum n_j

tau_i comes from FitRes.metrics["steps"] (SupervisedTask reports it). With equal tau_i this is exactly FedAvg.
"""

from __future__ import annotations

from typing import Any

import torch

from tessera.core.errors import ConfigError
from tessera.core.logging import get_logger
from tessera.core.types import Params
from tessera.horizontal.strategies.base import FitResults, Strategy
from tessera.horizontal.strategies.robust import server_step

log = get_logger(__name__)


def step_norm(steps: float, momentum: float) -> float:
    """||a_i||_1: how many 'plain SGD steps' worth of movement tau local steps with momentum rho make."""
    if momentum == 0.0:
        return steps
    rho = momentum
    return float((steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho))


class FedNova(Strategy):
    """FedNova. `local_momentum` must match the clients' SGD momentum (job.toml: train.momentum)."""

    name = "fednova"

    def __init__(self, *, server_lr: float = 1.0, local_momentum: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if server_lr <= 0:
            raise ConfigError(f"strategy.server_lr: must be positive, got {server_lr}")
        if not 0 <= local_momentum < 1:
            raise ConfigError(f"strategy.local_momentum: must be in [0, 1), got {local_momentum}")
        self.server_lr = server_lr
        self.local_momentum = local_momentum

    def aggregate_fit(self, rnd: int, results: FitResults, current: Params) -> Params:
        total = sum(r.num_examples for _, r in results)
        if total <= 0:
            raise ConfigError("fednova: clients reported 0 examples in total; check the clients' data")
        norms = []
        for cid, r in results:
            steps = float(r.metrics.get("steps", 0.0))
            if steps <= 0:
                raise ConfigError(f"fednova: client {cid} did not report metrics['steps'] > 0; "
                                  "return the number of local optimizer steps from Task.train")
            norms.append(step_norm(steps, self.local_momentum))

        p = [r.num_examples / total for _, r in results]
        tau_eff = sum(pi * a for pi, a in zip(p, norms, strict=True))
        target: Params = {}
        for k, x in current.items():
            acc = torch.zeros(x.shape, dtype=torch.float64)
            for pi, a, (_, r) in zip(p, norms, results, strict=True):
                # integer buffers (counters) are not moved by steps: plain example-weighted mean for them
                w = pi * tau_eff / a if x.is_floating_point() else pi
                acc += w * (r.params[k].double() - x.double())
            target[k] = x.double() + acc
        stepped = server_step({k: x.double() for k, x in current.items()}, target, self.server_lr)
        return {k: stepped[k].to(x.dtype) if x.is_floating_point() else stepped[k].round().to(x.dtype)
                for k, x in current.items()}
