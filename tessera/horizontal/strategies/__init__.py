"""Aggregation strategies. Pure maths in `aggregate`; each strategy is a small class over it."""

from tessera.horizontal.strategies import aggregate
from tessera.horizontal.strategies.base import FitResults, Strategy
from tessera.horizontal.strategies.fedavg import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, mean_delta

# Names accepted by `[strategy] name = ...` in job.toml. Robust and heterogeneity strategies add theirs here.
STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad)
}

__all__ = [
    "STRATEGIES", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedProx", "FedYogi", "FitResults", "Strategy",
    "aggregate", "mean_delta",
]
