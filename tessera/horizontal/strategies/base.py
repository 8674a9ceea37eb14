"""The Strategy interface and client sampling shared by every strategy."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from tessera.core.errors import ConfigError
from tessera.core.types import Metrics, Params, Scalar
from tessera.runtime.messages import EvaluateIns, EvaluateRes, FitIns, FitRes

FitResults = list[tuple[str, FitRes]]


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

    def aggregate_evaluate(self, rnd: int, results: list[tuple[str, EvaluateRes]]) -> tuple[float, Metrics]:
        """Example-weighted mean of the clients' losses and metrics."""
        total = sum(r.num_examples for _, r in results)
        if total == 0:
            return float("nan"), {}
        loss = sum(r.loss * r.num_examples for _, r in results) / total
        keys = set.intersection(*(set(r.metrics) for _, r in results)) if results else set()
        metrics = {k: sum(r.metrics[k] * r.num_examples for _, r in results) / total for k in sorted(keys)}
        return loss, metrics

    # ---------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless strategies keep none
        pass
