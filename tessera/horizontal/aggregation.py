"""The fit phase of a round, as a pluggable step: what plugins (secure aggregation, DP) implement or wrap.

`Aggregation.run` sends the round's FitIns, gathers replies and produces the new global params. `PlainAggregation`
is the default (clients send params in the clear; the strategy aggregates them). `validate_fit` and
`require_quorum` are the checks every aggregation applies. Kept apart from the round loop (`server.py`) so that
plugins depend on this small protocol, not on the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tessera.core.errors import ConfigError, RoundFailed, ShapeMismatch
from tessera.core.logging import get_logger
from tessera.core.types import Metrics, Params, check_compatible, is_finite
from tessera.horizontal.strategies.base import FitResults, MeanStrategy, Strategy
from tessera.runtime.backend import Backend, ClientFailure, FailureKind
from tessera.runtime.messages import FitIns, FitRes

log = get_logger(__name__)
CentralEval = Callable[[Params], tuple[float, Metrics]]  # server-side evaluation of the global params


@dataclass
class FitOutcome:
    params: Params
    results: FitResults
    failures: list[ClientFailure] = field(default_factory=list)


class Aggregation(Protocol):
    def run(self, rnd: int, plan: list[tuple[str, FitIns]], backend: Backend, strategy: Strategy,
            current: Params, *, timeout: float | None) -> FitOutcome: ...


def validate_fit(replies: dict[str, Any], current: Params) -> tuple[FitResults, list[ClientFailure]]:
    """Split replies into usable results and failures; wrong-shape or non-finite updates never pass."""
    ok: FitResults = []
    failed: list[ClientFailure] = []
    for cid, rep in replies.items():
        if isinstance(rep, ClientFailure):
            failed.append(rep)
        elif not isinstance(rep, FitRes):
            failed.append(ClientFailure(cid, f"rejected: expected FitRes, got {type(rep).__name__}",
                                        FailureKind.MALFORMED))
        elif rep.num_examples < 0:
            failed.append(ClientFailure(cid, "rejected: negative num_examples", FailureKind.REJECTED))
        else:
            try:
                check_compatible(current, rep.params, who=f"update from {cid}")
            except ShapeMismatch as exc:
                failed.append(ClientFailure(cid, f"rejected: {exc}", FailureKind.REJECTED))
                continue
            if not is_finite(rep.params):
                failed.append(ClientFailure(cid, "rejected: update contains NaN or Inf", FailureKind.REJECTED))
                continue
            ok.append((cid, rep))
    for f in failed:
        if f.kind in (FailureKind.REJECTED, FailureKind.MALFORMED):
            log.warning("client %s: update rejected before aggregation", f.client)
    return ok, failed


def require_quorum(rnd: int, ok: int, failed: list[ClientFailure], strategy: Strategy) -> None:
    if ok < strategy.min_available:
        raise RoundFailed(
            f"round {rnd}: only {ok} client(s) succeeded, fewer than strategy.min_available="
            f"{strategy.min_available} ({len(failed)} failed); the last checkpoint is kept — lower min_available "
            "or fix the failing clients, then resume"
        )


def mean_strategy(strategy: Strategy) -> MeanStrategy:
    """`strategy` as a MeanStrategy (an aggregation that produces only the mean calls its `apply`)."""
    if not isinstance(strategy, MeanStrategy):  # compose() refuses such jobs up front; this guards direct use
        raise ConfigError(f"{strategy.name} is not mean-based: it cannot take a server step from a mean alone")
    return strategy


class PlainAggregation:
    """Clients send their params in the clear; the strategy aggregates them."""

    def run(self, rnd: int, plan: list[tuple[str, FitIns]], backend: Backend, strategy: Strategy,
            current: Params, *, timeout: float | None) -> FitOutcome:
        replies = backend.exchange(dict(plan), timeout=timeout)
        ok, failed = validate_fit(replies, current)
        require_quorum(rnd, len(ok), failed, strategy)
        return FitOutcome(strategy.aggregate_fit(rnd, ok, current), ok, failed)
