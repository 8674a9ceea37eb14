"""Update-norm bounding: clip each client's update (params - current) to a server-set L2 bound.

`clip_update` is the pure maths; `ClipUpdates(inner, max_norm=...)` wraps any strategy so it aggregates clipped
updates. A bounded update limits how far one client can move the model in a round: a scaled-up attack loses its
scale, while honest updates under the bound pass bit for bit unchanged.
"""

from __future__ import annotations

from tessera.core.errors import ConfigError
from tessera.core.logging import get_logger
from tessera.core.types import Params
from tessera.horizontal.strategies.base import FitResults, Strategy, StrategyWrapper
from tessera.runtime.messages import FitRes

log = get_logger(__name__)


def update_norm(params: Params, current: Params) -> float:
    """L2 norm of (params - current) over the floating tensors, in float64."""
    total = 0.0
    for k, c in current.items():
        if c.is_floating_point():
            total += float((params[k].double() - c.double()).pow(2).sum())
    return float(total**0.5)


def clip_update(params: Params, current: Params, *, max_norm: float) -> Params:
    """current + (params - current) * min(1, max_norm / ||params - current||); integer tensors pass unchanged.

    An update already within the bound is returned as is (same tensors), so clipping never perturbs it.
    """
    if max_norm <= 0:
        raise ConfigError(f"max_update_norm must be positive, got {max_norm}")
    norm = update_norm(params, current)
    if norm <= max_norm:
        return params
    factor = max_norm / norm
    out: Params = {}
    for k, c in current.items():
        if c.is_floating_point():
            out[k] = (c.double() + (params[k].double() - c.double()) * factor).to(c.dtype)
        else:
            out[k] = params[k]
    return out


def clip_results(results: FitResults, current: Params, *, max_norm: float) -> FitResults:
    """The same replies with their params clipped (metrics, counts and extras kept)."""
    out: FitResults = []
    clipped = 0
    for cid, r in results:
        p = clip_update(r.params, current, max_norm=max_norm)
        clipped += p is not r.params
        out.append((cid, r if p is r.params else FitRes(params=p, num_examples=r.num_examples,
                                                          metrics=r.metrics, extras=r.extras)))
    if clipped:
        log.info("clipped %d of %d updates to the norm bound", clipped, len(results))
    return out


class ClipUpdates(StrategyWrapper):
    """Wraps a strategy: every client update is clipped to L2 <= max_norm before `inner.aggregate_fit` sees it.

    >>> from tessera.horizontal.strategies import ClipUpdates, FedAvg
    >>> strategy = ClipUpdates(FedAvg(), max_norm=1.0)
    """

    label = "clip"

    def __init__(self, inner: Strategy, *, max_norm: float) -> None:
        if max_norm <= 0:
            raise ConfigError(f"ClipUpdates: max_norm must be positive, got {max_norm}")
        super().__init__(inner)
        self.max_norm = max_norm

    def aggregate_fit(self, rnd: int, results: FitResults, current: Params) -> Params:
        return self.inner.aggregate_fit(rnd, clip_results(results, current, max_norm=self.max_norm), current)
