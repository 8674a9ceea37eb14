"""SCAFFOLD (Karimireddy et al. 2020, "Stochastic Controlled Averaging for Federated Learning"), option II.

Client drift on non-IID data comes from each client following its own gradient. SCAFFOLD keeps control variates
(estimates of the gradient): c at the server, c_i at each client, and corrects every local step by c - c_i.

    server -> client   x, c                              (FitIns.params, FitIns.extras["scaffold_c"])
    client             y <- y - lr (g_i(y) + c - c_i)     K steps (SupervisedTask's `grad_correction`)
                       c_i+ = c_i - c + (x - y) / (K lr)  (option II; K from FitRes.metrics["steps"])
    client -> server   y, c_i+ - c_i                      (FitRes.params, FitRes.extras["scaffold_dc"])
    server             x <- x + server_lr * sum_i w_i (y_i - x)
                       c <- c + (|S| / N) * sum_i w_i (c_i+ - c_i)

with w_i = n_i / sum_S n_j (the paper's uniform 1/|S| is the equal-size case; example weights keep SCAFFOLD's
fixed point the same as FedAvg's objective). c lives in `state_dict` (checkpoints), c_i in the client's
`ClientContext.state["scaffold_ci"]` (the simulation checkpoint carries it, so resume is exact).
The client side is `scaffold_mod`; `JobParts.client_app()` installs it from `Scaffold.client_mods()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tessera.core.errors import ConfigError, ProtocolError
from tessera.core.logging import get_logger
from tessera.core.types import Params, is_finite
from tessera.horizontal.client import CallNext, ClientContext, Mod
from tessera.horizontal.strategies.aggregate import weighted_mean
from tessera.horizontal.strategies.base import FitResults, Strategy
from tessera.horizontal.strategies.robust import server_step
from tessera.runtime.messages import FitIns, FitRes

log = get_logger(__name__)
C_KEY, DC_KEY, CI_STATE, LR_KEY = "scaffold_c", "scaffold_dc", "scaffold_ci", "scaffold_lr"


class Scaffold(Strategy):
    """SCAFFOLD server. `local_lr` must equal the clients' SGD learning rate (job.toml: train.lr)."""

    name = "scaffold"

    def __init__(self, *, local_lr: float | None = None, server_lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if local_lr is None or local_lr <= 0:
            raise ConfigError("strategy.local_lr: SCAFFOLD needs the clients' SGD learning rate to turn a model "
                              f"change into a gradient estimate; set local_lr = train.lr (got {local_lr})")
        if server_lr <= 0:
            raise ConfigError(f"strategy.server_lr: must be positive, got {server_lr}")
        self.local_lr = local_lr
        self.server_lr = server_lr
        self.c: Params = {}
        self.num_clients = 0

    def client_mods(self) -> list[Mod]:
        return [scaffold_mod]

    def configure_fit(self, rnd: int, params: Params, clients: Sequence[str],
                      rng: np.random.Generator) -> list[tuple[str, FitIns]]:
        plan = super().configure_fit(rnd, params, clients, rng)
        self.num_clients = len(clients)
        if not self.c:
            self.c = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in params.items() if v.is_floating_point()}
        c = {k: v.to(params[k].dtype) for k, v in self.c.items()}
        return [(cid, FitIns(round=ins.round, params=ins.params, config={**ins.config, LR_KEY: self.local_lr},
                             extras={**ins.extras, C_KEY: c})) for cid, ins in plan]

    def aggregate_fit(self, rnd: int, results: FitResults, current: Params) -> Params:
        sizes = [float(r.num_examples) for _, r in results]
        weights = [n / sum(sizes) for n in sizes] if sum(sizes) > 0 else [1 / len(results)] * len(results)
        target = weighted_mean([r.params for _, r in results], weights)
        dc_sum, dc_weight = self._control_update(results, weights)
        if dc_weight > 0:
            share = len(results) / max(self.num_clients, len(results))
            for k in self.c:
                self.c[k] += share * dc_sum[k] / dc_weight
        return server_step(current, target, self.server_lr)

    def _control_update(self, results: FitResults, weights: list[float]) -> tuple[Params, float]:
        """Weighted sum of the clients' c_i deltas; a missing or malformed delta is left out (and logged)."""
        acc = {k: torch.zeros_like(v) for k, v in self.c.items()}
        got = 0.0
        for w, (cid, r) in zip(weights, results, strict=True):
            dc = r.extras.get(DC_KEY)
            if dc is None or list(dc) != list(acc) or any(dc[k].shape != v.shape for k, v in acc.items()) \
                    or not is_finite(dc):
                log.warning("client %s: no usable SCAFFOLD control delta; is scaffold_mod installed?", cid)
                continue
            for k in acc:
                acc[k] += w * dc[k].double()
            got += w
        return acc, got

    def state_dict(self) -> dict[str, Any]:
        return {"c": self.c, "num_clients": self.num_clients}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.c = {k: v.double() for k, v in state["c"].items()}
        self.num_clients = int(state["num_clients"])


def scaffold_mod(msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
    """Client side of SCAFFOLD: correct local gradients by c - c_i, then update c_i (option II)."""
    if not isinstance(msg, FitIns) or C_KEY not in msg.extras:
        return call_next(msg, ctx)
    c = msg.extras[C_KEY]
    lr = float(msg.config.get(LR_KEY, 0.0))
    if lr <= 0:
        raise ProtocolError(f"SCAFFOLD round without a positive '{LR_KEY}' in the config; use the Scaffold strategy")
    ci: Params | None = ctx.state.get(CI_STATE)
    if ci is None or list(ci) != list(c) or any(ci[k].shape != c[k].shape for k in c):
        ci = {k: torch.zeros_like(v) for k, v in c.items()}
    ctx.train_config["grad_correction"] = {k: c[k] - ci[k] for k in c}
    res = call_next(msg, ctx)
    if not isinstance(res, FitRes):
        return res
    steps = float(res.metrics.get("steps", 0.0))
    if steps <= 0:
        raise ProtocolError("SCAFFOLD needs the number of local steps: Task.train must return metrics['steps']")
    new_ci = {k: (ci[k].double() - c[k].double()
                  + (msg.params[k].double() - res.params[k].double()) / (steps * lr)).to(c[k].dtype) for k in c}
    ctx.state[CI_STATE] = new_ci
    dc = {k: new_ci[k] - ci[k] for k in c}
    return FitRes(params=res.params, num_examples=res.num_examples, metrics=res.metrics,
                  extras={**res.extras, DC_KEY: dc})
