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
from tessera.runtime.backend import Backend, ClientFailure, FailureKind, exchange_each
from tessera.runtime.messages import FitIns, FitRes

log = get_logger(__name__)
CentralEval = Callable[[Params], tuple[float, Metrics]]  # server-side evaluation of the global params


@dataclass
class FitOutcome:
    params: Params
    results: FitResults  # replies of a streamed aggregation keep their counts and metrics, not their tensors
    failures: list[ClientFailure] = field(default_factory=list)


class Aggregation(Protocol):
    def run(self, rnd: int, plan: list[tuple[str, FitIns]], backend: Backend, strategy: Strategy,
            current: Params, *, timeout: float | None) -> FitOutcome: ...


def check_fit(cid: str, rep: Any, current: Params) -> ClientFailure | None:
    """Why one reply cannot be aggregated (None when it can): wrong-shape or non-finite updates never pass."""
    if isinstance(rep, ClientFailure):
        return rep
    failure = None
    if not isinstance(rep, FitRes):
        failure = ClientFailure(cid, f"rejected: expected FitRes, got {type(rep).__name__}", FailureKind.MALFORMED)
    elif rep.num_examples < 0:
        failure = ClientFailure(cid, "rejected: negative num_examples", FailureKind.REJECTED)
    else:
        try:
            check_compatible(current, rep.params, who=f"update from {cid}")
        except ShapeMismatch as exc:
            failure = ClientFailure(cid, f"rejected: {exc}", FailureKind.REJECTED)
        else:
            if not is_finite(rep.params):
                failure = ClientFailure(cid, "rejected: update contains NaN or Inf", FailureKind.REJECTED)
    if failure is not None:
        log.warning("client %s: update rejected before aggregation", cid)
    return failure


def validate_fit(replies: dict[str, Any], current: Params) -> tuple[FitResults, list[ClientFailure]]:
    """Split replies into usable results and failures; wrong-shape or non-finite updates never pass."""
    checked = {cid: check_fit(cid, rep, current) or rep for cid, rep in replies.items()}
    return _split(checked)


def _split(replies: dict[str, Any]) -> tuple[FitResults, list[ClientFailure]]:
    ok = [(c, r) for c, r in replies.items() if not isinstance(r, ClientFailure)]
    return ok, [r for r in replies.values() if isinstance(r, ClientFailure)]


def require_quorum(rnd: int, ok: int, failed: list[ClientFailure], strategy: Strategy) -> None:
    if ok < strategy.min_available:
        if failed and all(f.kind is FailureKind.MISCONFIGURED for f in failed):
            # Every failure is the job not fitting a client's data: lowering min_available would not help.
            raise RoundFailed(f"round {rnd}: {len(failed)} client(s) could not run the job; client "
                              f"{failed[0].client}: {failed[0].reason}")
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
    """Clients send their params in the clear; the strategy aggregates them.

    A strategy with an `accumulator` (the FedAvg family, client-level DP) folds each reply into its running sum as
    it arrives and the reply's tensors are dropped at once: the coordinator holds the global params, one float64
    accumulator and the replies in flight, never all updates. Other strategies (robust aggregators, SCAFFOLD,
    FedNova) get every validated reply at the end, as `aggregate_fit` needs them.
    """

    def run(self, rnd: int, plan: list[tuple[str, FitIns]], backend: Backend, strategy: Strategy,
            current: Params, *, timeout: float | None) -> FitOutcome:
        acc = strategy.accumulator(rnd, current)
        if acc is None:
            replies = backend.exchange(dict(plan), timeout=timeout)
            ok, failed = validate_fit(replies, current)
            require_quorum(rnd, len(ok), failed, strategy)
            return FitOutcome(strategy.aggregate_fit(rnd, ok, current), ok, failed)

        def fold(cid: str, rep: Any) -> Any:
            failure = check_fit(cid, rep, current)
            if failure is not None:
                return failure
            acc.fold(cid, rep)
            return FitRes(params={}, num_examples=rep.num_examples, metrics=rep.metrics)  # tensors dropped

        ok, failed = _split(exchange_each(backend, dict(plan), fold, timeout=timeout))
        require_quorum(rnd, len(ok), failed, strategy)
        return FitOutcome(acc.finish(), ok, failed)
