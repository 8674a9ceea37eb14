"""Byzantine-robust strategies: the new global params are a robust statistic of the clients' params.

Each strategy here runs one rule of `aggregate.py` on the validated client params (the server already refused
NaN/Inf and wrong shapes). The rules are translation-equivariant, so aggregating params equals current + the
rule applied to deltas; `server_lr` scales that step and `max_update_norm` clips every update first.

These rules need every single update, so they cannot run under secure aggregation (which reveals only a sum).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

from tessera.core.errors import ConfigError
from tessera.core.types import Params
from tessera.horizontal.strategies import aggregate
from tessera.horizontal.strategies.base import FitResults, Strategy
from tessera.horizontal.strategies.clipping import clip_results


def server_step(current: Params, target: Params, server_lr: float) -> Params:
    """current + server_lr * (target - current), in float64; server_lr = 1 returns `target` exactly."""
    if server_lr == 1.0:
        return target
    out: Params = {}
    for k, x in current.items():
        new = x.double() + server_lr * (target[k].double() - x.double())
        out[k] = new.to(x.dtype) if x.is_floating_point() else new.round().to(x.dtype)
    return out


class RobustStrategy(Strategy):
    """Template: clip (optional), aggregate with a robust rule, take a server step."""

    def __init__(self, *, server_lr: float = 1.0, max_update_norm: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if server_lr <= 0:
            raise ConfigError(f"strategy.server_lr: must be positive, got {server_lr}")
        if max_update_norm is not None and max_update_norm <= 0:
            raise ConfigError(f"strategy.max_update_norm: must be positive, got {max_update_norm}")
        self.server_lr = server_lr
        self.max_update_norm = max_update_norm
        self.selected: list[str] = []  # clients whose update the last round kept whole (Krum family)

    def aggregate_fit(self, rnd: int, results: FitResults, current: Params) -> Params:
        if self.max_update_norm is not None:
            results = clip_results(results, current, max_norm=self.max_update_norm)
        updates = [r.params for _, r in results]
        target, kept = self.robust_aggregate(updates)
        self.selected = [results[i][0] for i in kept]
        return server_step(current, target, self.server_lr)

    @abstractmethod
    def robust_aggregate(self, updates: Sequence[Params]) -> tuple[Params, list[int]]:
        """The aggregate and the indices of updates it kept whole (all of them for coordinate-wise rules)."""


class FedMedian(RobustStrategy):
    """Coordinate-wise median (Yin et al. 2018). Tolerates fewer than half of the clients being Byzantine."""

    name = "fedmedian"

    def robust_aggregate(self, updates: Sequence[Params]) -> tuple[Params, list[int]]:
        return aggregate.median(updates), list(range(len(updates)))


class TrimmedMean(RobustStrategy):
    """Coordinate-wise mean without the floor(beta * n) largest and smallest values (Yin et al. 2018).

    Set beta at least to the fraction of Byzantine clients you expect.
    """

    name = "trimmedmean"

    def __init__(self, *, beta: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 <= beta < 0.5:
            raise ConfigError(f"strategy.beta: must be in [0, 0.5), got {beta}")
        self.beta = beta

    def robust_aggregate(self, updates: Sequence[Params]) -> tuple[Params, list[int]]:
        return aggregate.trimmed_mean(updates, beta=self.beta), list(range(len(updates)))


class Krum(RobustStrategy):
    """Krum (Blanchard et al. 2017): the update closest to its n - f - 2 nearest neighbours. Needs n >= f + 3
    (the paper's guarantee needs n >= 2f + 3). `f` is the number of Byzantine clients to tolerate."""

    name = "krum"

    def __init__(self, *, f: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if f < 0:
            raise ConfigError(f"strategy.f: the number of Byzantine clients must be >= 0, got {f}")
        self.f = f

    def robust_aggregate(self, updates: Sequence[Params]) -> tuple[Params, list[int]]:
        chosen = aggregate.krum_select(updates, f=self.f, m=1)
        return aggregate.weighted_mean([updates[i] for i in chosen], [1.0] * len(chosen)), chosen


class MultiKrum(Krum):
    """Multi-Krum: the mean of the m best Krum-scored updates; m defaults to n - f."""

    name = "multikrum"

    def __init__(self, *, f: int = 1, m: int | None = None, **kwargs: Any) -> None:
        super().__init__(f=f, **kwargs)
        if m is not None and m < 1:
            raise ConfigError(f"strategy.m: must be at least 1, got {m}")
        self.m = m

    def robust_aggregate(self, updates: Sequence[Params]) -> tuple[Params, list[int]]:
        m = self.m if self.m is not None else max(1, len(updates) - self.f)
        chosen = aggregate.krum_select(updates, f=self.f, m=min(m, len(updates)))
        return aggregate.weighted_mean([updates[i] for i in chosen], [1.0] * len(chosen)), chosen


class Bulyan(RobustStrategy):
    """Bulyan (El Mhamdi et al. 2018): recursive Krum picks n - 2f updates, then a coordinate-wise trimmed mean
    around the median. Needs n >= 4f + 3."""

    name = "bulyan"

    def __init__(self, *, f: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if f < 0:
            raise ConfigError(f"strategy.f: the number of Byzantine clients must be >= 0, got {f}")
        self.f = f

    def robust_aggregate(self, updates: Sequence[Params]) -> tuple[Params, list[int]]:
        chosen = sorted(aggregate.bulyan_select(updates, f=self.f))
        kept = [updates[i] for i in chosen]
        return aggregate.closest_to_median_mean(kept, beta=len(kept) - 2 * self.f), chosen
