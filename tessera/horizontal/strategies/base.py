"""The Strategy interface, client sampling shared by every strategy, and the two typed extensions of it.

- `Strategy` declares every method the round loop or a plugin calls (no `hasattr` probing anywhere).
- `MeanStrategy` is a strategy whose aggregate is "mean delta, then a server update" (`apply`): the only kind
  secure aggregation and client-level DP can serve, since they reveal or produce just the mean.
- `StrategyWrapper` is the one base for wrappers (update clipping, deadlines, client-level DP): it delegates every
  attribute and method it does not override to the inner strategy by lookup, so a setting written on the wrapper
  (`fraction_evaluate = 0`) reaches the inner strategy and a wrapper can never hold a stale copy.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from tessera.core.errors import ConfigError
from tessera.core.types import Metrics, OwnedParams, Params, Scalar
from tessera.horizontal.client import Mod
from tessera.runtime.messages import EvaluateIns, EvaluateRes, FitIns, FitRes

FitResults = list[tuple[str, FitRes]]


class FitAccumulator(Protocol):
    """This round's aggregate, built one reply at a time: the coordinator folds each validated reply as it arrives
    and drops it, so it never holds all clients' updates."""

    def fold(self, cid: str, res: FitRes) -> None: ...

    def finish(self) -> Params:
        """The next global params (what `aggregate_fit` would return for the folded replies)."""
        ...


ACCUMULATE = {"float64": torch.float64, "float32": torch.float32}


def accumulate_dtype(name: str) -> torch.dtype:
    """The dtype of a streaming mean's sums, from its name in a strategy's settings."""
    if name not in ACCUMULATE:
        raise ConfigError(f"strategy.accumulate: must be one of {sorted(ACCUMULATE)}, got {name!r} (float64 is "
                          "exact to the last bit of float32 params; float32 halves the coordinator's accumulator)")
    return ACCUMULATE[name]


class RunningMean:
    """sum_i w_i x_i / sum_i w_i, folded one term at a time (each term can be dropped after).

    Floating tensors are summed in `dtype`: float64 (default) gives the mean of float32 params to the last bit in
    any folding order; float32 needs half the memory (one model size instead of two) and errs by about
    count * 2**-24 relative. Integer tensors (counters such as BatchNorm's) are always summed in float64.
    Memory: one copy of the params in the accumulation dtype, however many terms are folded."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.sums: Params = {}
        self.total = 0.0
        self.count = 0

    def add(self, values: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one term. When `values` are `OwnedParams` in the accumulation dtype, the first term's tensors become
        the sums (scaled in place: the same bits as 0 + w * x) instead of new zeros plus a copy; the tensors of
        `OwnedParams` folded into existing sums are released after their read (`OwnedParams.release`)."""
        owned = values if isinstance(values, OwnedParams) else None
        for k, v in values.items():
            acc = self.sums.get(k)
            if acc is None:
                dtype = self.dtype if v.is_floating_point() else torch.float64
                if owned is not None and v.dtype == dtype and v.is_contiguous():
                    self.sums[k] = v.mul_(float(weight))
                    continue
                acc = self.sums[k] = torch.zeros(v.shape, dtype=dtype)
            fold_wide(acc, v, float(weight))
            if owned is not None:
                owned.release(k)  # read for the last time: a spooled reply's pages go back at once
        self.total += float(weight)
        self.count += 1

    def mean(self) -> Params:
        """The weighted mean (in the accumulation dtype); consumes the sums."""
        if self.count == 0 or self.total <= 0:
            raise ValueError("cannot average: no update was folded, or the weights sum to zero")
        out, self.sums = self.sums, {}
        return {k: s.div_(self.total) for k, s in out.items()}


WIDE_CHUNK = 1 << 18  # elements widened to float64 at a time: a 2 MiB scratch that stays in cache
WIDE_DIRECT = 1 << 16  # up to this many elements torch's mixed-dtype kernel is faster (one call, not three)


def _chunks(n: int) -> range:
    return range(0, n, WIDE_CHUNK)


def fold_wide(acc: torch.Tensor, v: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """`acc.add_(v, alpha=alpha)` for a float64 `acc`, with `v` widened chunk by chunk into a small scratch first:
    the same bits, several times faster than torch's mixed-dtype kernel (which casts element by element), and no
    float64 copy of `v`. Small tensors take the mixed kernel directly (same bits: both widen exactly, then add in
    float64). Returns `acc`."""
    if v.dtype == acc.dtype or acc.numel() <= WIDE_DIRECT or not acc.is_contiguous() or acc.shape != v.shape:
        return acc.add_(v, alpha=alpha)
    a, b = acc.view(-1), v.reshape(-1)
    scratch = torch.empty(min(WIDE_CHUNK, a.numel()), dtype=acc.dtype)
    for i in _chunks(a.numel()):
        n = min(WIDE_CHUNK, a.numel() - i)
        a[i : i + n].add_(scratch[:n].copy_(b[i : i + n]), alpha=alpha)
    return acc


def sub_wide(acc: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`acc.sub_(v)` for a float64 `acc`, widening `v` chunk by chunk (same bits, see `fold_wide`)."""
    return fold_wide(acc, v, -1.0) if v.dtype != acc.dtype else acc.sub_(v)


def add_rounded(wide: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`torch.add(wide, x, out=torch.empty_like(x))`: wide + x computed in float64 and rounded once into x's
    dtype, the same bits, with x widened chunk by chunk into a small scratch."""
    out = torch.empty_like(x)
    if x.numel() <= WIDE_DIRECT or not (x.is_contiguous() and wide.is_contiguous() and wide.shape == x.shape):
        return torch.add(wide, x, out=out)
    w, b, o = wide.view(-1), x.view(-1), out.view(-1)
    scratch = torch.empty(min(WIDE_CHUNK, w.numel()), dtype=wide.dtype)
    for i in _chunks(w.numel()):
        n = min(WIDE_CHUNK, w.numel() - i)
        o[i : i + n].copy_(scratch[:n].copy_(b[i : i + n]).add_(w[i : i + n]))
    return out


class Strategy(ABC):
    """Decides who trains, with what, and how replies become the next global params.

    Sampling: `fraction_fit` of the available clients, at least `min_fit_clients`. A round needs at least
    `min_available` successful replies, otherwise the server raises RoundFailed.
    """

    name = "strategy"

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        min_fit_clients: int = 1,
        min_available: int = 1,
        fraction_evaluate: float = 1.0,
        min_evaluate_clients: int = 1,
        local_config: dict[str, Scalar] | None = None,
    ) -> None:
        for key, val in (("fraction_fit", fraction_fit), ("fraction_evaluate", fraction_evaluate)):
            if not 0.0 <= val <= 1.0:
                raise ConfigError(f"strategy.{key}: must be between 0 and 1, got {val}")
        for key, ival in (("min_fit_clients", min_fit_clients), ("min_available", min_available),
                          ("min_evaluate_clients", min_evaluate_clients)):
            if ival < 1:
                raise ConfigError(f"strategy.{key}: must be at least 1, got {ival}")
        self.fraction_fit = fraction_fit
        self.min_fit_clients = min_fit_clients
        self.min_available = min_available
        self.fraction_evaluate = fraction_evaluate
        self.min_evaluate_clients = min_evaluate_clients
        self.local_config: dict[str, Scalar] = dict(local_config or {})

    # ------------------------------------------------------------------------------------------------ sampling
    @staticmethod
    def sample(clients: Sequence[str], fraction: float, minimum: int, rng: np.random.Generator) -> list[str]:
        n = len(clients)
        k = min(n, max(minimum, math.ceil(fraction * n)))
        if fraction == 1.0 or k >= n:
            return list(clients)
        idx = sorted(rng.choice(n, size=k, replace=False).tolist())
        return [clients[i] for i in idx]

    def fit_config(self, rnd: int) -> dict[str, Scalar]:
        """The round config every sampled client trains with (subclasses add keys, e.g. proximal_mu)."""
        return dict(self.local_config)

    def configure_fit(
        self, rnd: int, params: Params, clients: Sequence[str], rng: np.random.Generator
    ) -> list[tuple[str, FitIns]]:
        if len(clients) < self.min_available:
            raise ConfigError(
                f"only {len(clients)} clients are available but strategy.min_available={self.min_available}"
            )
        chosen = self.sample(clients, self.fraction_fit, self.min_fit_clients, rng)
        cfg = self.fit_config(rnd)
        return [(c, FitIns(round=rnd, params=params, config=dict(cfg))) for c in chosen]

    def configure_evaluate(
        self, rnd: int, params: Params, clients: Sequence[str], rng: np.random.Generator
    ) -> list[tuple[str, EvaluateIns]]:
        if self.fraction_evaluate == 0.0:
            return []
        chosen = self.sample(clients, self.fraction_evaluate, self.min_evaluate_clients, rng)
        return [(c, EvaluateIns(round=rnd, params=params)) for c in chosen]

    # ------------------------------------------------------------------------------------------------- results
    @abstractmethod
    def aggregate_fit(self, rnd: int, results: FitResults, current: Params) -> Params:
        """The next global params from the successful replies (already validated for shape and finiteness)."""

    def accumulator(self, rnd: int, current: Params) -> FitAccumulator | None:
        """A streaming form of `aggregate_fit` for this round, or None when it needs all replies at once (robust
        aggregators, and wrappers unless they define their own)."""
        return None

    def aggregate_evaluate(self, rnd: int, results: list[tuple[str, EvaluateRes]]) -> tuple[float, Metrics]:
        """Example-weighted mean of the clients' losses and metrics."""
        total = sum(r.num_examples for _, r in results)
        if total == 0:
            return float("nan"), {}
        loss = sum(r.loss * r.num_examples for _, r in results) / total
        keys = set.intersection(*(set(r.metrics) for _, r in results)) if results else set()
        metrics = {k: sum(r.metrics[k] * r.num_examples for _, r in results) / total for k in sorted(keys)}
        return loss, metrics

    def client_mods(self) -> list[Mod]:
        """Client-side work this strategy needs (SCAFFOLD's control variates); they run innermost, next to
        training, so every plugin's mod sees their final reply."""
        return []

    # ---------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless strategies keep none
        pass


class MeanStrategy(Strategy):
    """A strategy whose server step depends on the clients only through the (weighted) mean of their deltas.

    Secure aggregation computes that mean without seeing single updates and calls `apply` with it.
    """

    @abstractmethod
    def apply(self, rnd: int, current: Params, delta: Params) -> Params:
        """The next global params from the mean delta (tensors keyed like `current`, float64 unless the strategy
        accumulates in float32). `delta` is the callee's: it may scale it in place and free it as it goes."""


SAMPLING = ("fraction_fit", "min_fit_clients", "min_available", "fraction_evaluate", "min_evaluate_clients",
            "local_config")


class StrategyWrapper(Strategy):
    """Wraps a strategy and changes part of what it does; everything else is the inner strategy's, by lookup.

    Subclasses call `super().__init__(inner)` and override only what they change. Reads of any attribute the
    wrapper does not define go to `inner` (`__getattr__`); writes of the sampling settings go to `inner` too
    (properties below), so the loop and FLModel can set them on whichever object they hold.
    """

    def __init__(self, inner: Strategy) -> None:  # no Strategy.__init__: the settings live in `inner`
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # during unpickling or before __init__: never recurse
            raise AttributeError(name)
        return getattr(self.inner, name)

    label = "wrap"  # the wrapper's part of its name: clip(fedavg), deadline(fedprox), ...

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.label}({self.inner.name})"

    def fit_config(self, rnd: int) -> dict[str, Scalar]:
        return self.inner.fit_config(rnd)

    def configure_fit(self, rnd: int, params: Params, clients: Sequence[str],
                      rng: np.random.Generator) -> list[tuple[str, FitIns]]:
        return self.inner.configure_fit(rnd, params, clients, rng)

    def configure_evaluate(self, rnd: int, params: Params, clients: Sequence[str],
                           rng: np.random.Generator) -> list[tuple[str, EvaluateIns]]:
        return self.inner.configure_evaluate(rnd, params, clients, rng)

    def aggregate_fit(self, rnd: int, results: FitResults, current: Params) -> Params:
        return self.inner.aggregate_fit(rnd, results, current)

    def aggregate_evaluate(self, rnd: int, results: list[tuple[str, EvaluateRes]]) -> tuple[float, Metrics]:
        return self.inner.aggregate_evaluate(rnd, results)

    def client_mods(self) -> list[Mod]:
        return self.inner.client_mods()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def _delegated(attr: str) -> property:
    def get(self: StrategyWrapper) -> Any:
        return getattr(self.inner, attr)

    def set_(self: StrategyWrapper, value: Any) -> None:
        setattr(self.inner, attr, value)

    return property(get, set_, doc=f"The inner strategy's `{attr}` (read and written through).")


for _attr in SAMPLING:
    setattr(StrategyWrapper, _attr, _delegated(_attr))


def innermost(strategy: Strategy) -> Strategy:
    """The strategy at the bottom of a chain of wrappers."""
    while isinstance(strategy, StrategyWrapper):
        strategy = strategy.inner
    return strategy
