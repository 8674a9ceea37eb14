"""FedAvg and the family built on a (weighted) mean of client deltas.

Every strategy here is "mean delta, then a server update": `aggregate_fit` computes the example-weighted mean of
client deltas and hands it to `apply`. Secure aggregation computes the same mean without seeing single deltas and
calls `apply` directly, so every strategy in this file works under it unchanged.

Server optimisers follow Reddi et al. 2021, "Adaptive Federated Optimization" (Algorithm 2), with the
pseudo-gradient Delta = mean_i(y_i - x) and v initialised to zero (as Flower does), no bias correction:
    FedAdagrad: v += Delta^2
    FedAdam:    v  = b2 v + (1-b2) Delta^2
    FedYogi:    v  = v - (1-b2) Delta^2 sign(v - Delta^2)
    all three:  m  = b1 m + (1-b1) Delta ;  x = x + eta m / (sqrt(v) + tau)
FedAvgM (Hsu et al. 2019): m = beta m + Delta ; x = x + eta m.
"""

from __future__ import annotations

from typing import Any

import torch

from tessera.core.errors import ConfigError
from tessera.core.types import Params, Scalar
from tessera.horizontal.strategies.base import (
    FitAccumulator,
    FitResults,
    MeanStrategy,
    RunningMean,
    accumulate_dtype,
    add_rounded,
    sub_wide,
)
from tessera.runtime.messages import FitRes


class MeanDelta(FitAccumulator):
    """FedAvg's aggregate folded per reply: sum_i n_i y_i / sum_i n_i - x, then the strategy's `apply`.

    (sum_i n_i y_i / N - x equals the mean of the deltas, without materialising one float64 delta per client.)
    The sums are float64 unless the strategy says `accumulate="float32"` (see `RunningMean`)."""

    def __init__(self, strategy: MeanStrategy, rnd: int, current: Params,
                 dtype: torch.dtype = torch.float64) -> None:
        self.strategy, self.rnd, self.current = strategy, rnd, current
        self.running = RunningMean(dtype)

    def fold(self, cid: str, res: FitRes) -> None:
        self.running.add(res.params, res.num_examples)

    def delta(self) -> Params:
        mean = self.running.mean()
        return {k: sub_wide(mean[k], c) for k, c in self.current.items()}  # float64 - float32: exact widening

    def finish(self) -> Params:
        return self.strategy.apply(self.rnd, self.current, self.delta())


def mean_delta(results: FitResults, current: Params) -> Params:
    """Example-weighted mean of (client params - current params), in float64 accuracy (folded in list order, so
    it equals the streamed aggregate of the same replies bit for bit)."""
    fold = MeanDelta(FedAvg(), 0, current)
    for cid, res in results:
        fold.fold(cid, res)
    return fold.delta()


class FedAvg(MeanStrategy):
    """McMahan et al. 2017: x <- x + server_lr * sum_i n_i (y_i - x) / sum_i n_i.

    `accumulate`: the dtype of the running sum of replies. "float64" (default) is exact to the last bit of float32
    params; "float32" holds one model size instead of two on the coordinator (for models whose float64 copy does
    not fit), with a relative error of about clients * 2**-24 and the server step taken in float32."""

    name = "fedavg"

    def __init__(self, *, server_lr: float = 1.0, accumulate: str = "float64", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if server_lr <= 0:
            raise ConfigError(f"strategy.server_lr: must be positive, got {server_lr}")
        self.server_lr = server_lr
        self.accumulate = accumulate
        self._dtype = accumulate_dtype(accumulate)

    def aggregate_fit(self, rnd: int, results: FitResults, current: Params) -> Params:
        fold = MeanDelta(self, rnd, current, self._dtype)
        for cid, res in results:
            fold.fold(cid, res)
        return fold.finish()

    def accumulator(self, rnd: int, current: Params) -> FitAccumulator:
        return MeanDelta(self, rnd, current, self._dtype)

    def apply(self, rnd: int, current: Params, delta: Params) -> Params:
        """The server update from the mean delta (consumed: scaled in place, freed tensor by tensor)."""
        if self.server_lr != 1.0:  # d * 1.0 == d exactly: nothing to scale
            for k, d in delta.items():
                if _fl(current[k]):
                    d.mul_(self.server_lr)
        return _step(current, delta)


class FedProx(FedAvg):
    """Li et al. 2020: FedAvg aggregation; clients add (mu/2)||w - w_global||^2 to their loss."""

    name = "fedprox"

    def __init__(self, *, proximal_mu: float = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if proximal_mu < 0:
            raise ConfigError(f"strategy.proximal_mu: must be >= 0, got {proximal_mu}")
        self.proximal_mu = proximal_mu

    def fit_config(self, rnd: int) -> dict[str, Scalar]:
        return {**super().fit_config(rnd), "proximal_mu": self.proximal_mu}


class FedAvgM(FedAvg):
    name = "fedavgm"

    def __init__(self, *, server_momentum: float = 0.9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 <= server_momentum < 1:
            raise ConfigError(f"strategy.server_momentum: must be in [0, 1), got {server_momentum}")
        self.server_momentum = server_momentum
        self.momentum: Params = {}

    def apply(self, rnd: int, current: Params, delta: Params) -> Params:
        step: Params = {}
        for k, d in delta.items():
            if not _fl(current[k]):
                step[k] = d
                continue
            m = self.momentum.get(k)
            m = d.clone() if m is None else self.server_momentum * m + d
            self.momentum[k] = m
            step[k] = self.server_lr * m
        return _step(current, step)

    def state_dict(self) -> dict[str, Any]:
        return {"momentum": self.momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.momentum = {k: v.to(self._dtype) for k, v in state["momentum"].items()}


class _Adaptive(FedAvg):
    def __init__(self, *, eta: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if eta <= 0 or tau <= 0 or not (0 <= beta_1 < 1 and 0 <= beta_2 < 1):
            raise ConfigError("strategy: need eta > 0, tau > 0 and beta_1, beta_2 in [0, 1)")
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        self.m: Params = {}
        self.v: Params = {}

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, rnd: int, current: Params, delta: Params) -> Params:
        step: Params = {}
        for k, d in delta.items():
            if not _fl(current[k]):
                step[k] = d
                continue
            m = self.m.get(k, torch.zeros_like(d))
            v = self.v.get(k, torch.zeros_like(d))
            self.m[k] = m = self.beta_1 * m + (1 - self.beta_1) * d
            self.v[k] = v = self.second_moment(v, d * d)
            step[k] = self.eta * m / (v.sqrt() + self.tau)
        return _step(current, step)

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m = {k: t.to(self._dtype) for k, t in state["m"].items()}
        self.v = {k: t.to(self._dtype) for k, t in state["v"].items()}


class FedAdagrad(_Adaptive):
    name = "fedadagrad"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v + d2


class FedAdam(_Adaptive):
    name = "fedadam"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return self.beta_2 * v + (1 - self.beta_2) * d2


class FedYogi(_Adaptive):
    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta_2) * d2 * torch.sign(v - d2)


def _fl(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def _step(current: Params, step: Params) -> Params:
    """current + step, rounded into current's dtypes. Consumes `step`: each of its tensors is dropped as soon as
    the new tensor beside it exists (float64 step), or becomes it (a step in the params' dtype), so the coordinator
    never holds the whole step and the whole new model at once."""
    out: Params = {}
    for k, x in current.items():
        s = step.pop(k)
        if x.is_floating_point() and s.dtype == torch.float64:  # rounded once into x's dtype
            out[k] = add_rounded(s, x)
        elif x.is_floating_point() and s.dtype == x.dtype:  # a float32 accumulation: the new params take the
            out[k] = s.add_(x)  # step's memory (s + x is x + s bit for bit), so no third model size exists
        elif x.is_floating_point():
            out[k] = torch.add(x, s).to(x.dtype)
        else:
            out[k] = (x.double() + s.double()).round_().to(x.dtype)
        del s
    return out
