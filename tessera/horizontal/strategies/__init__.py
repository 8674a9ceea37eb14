"""Aggregation strategies. Pure maths in `aggregate`; each strategy is a small class over it."""

from tessera.horizontal.strategies import aggregate
from tessera.horizontal.strategies.base import FitResults, MeanStrategy, Strategy, StrategyWrapper
from tessera.horizontal.strategies.clipping import ClipUpdates, clip_update
from tessera.horizontal.strategies.deadline import DeadlineRounds
from tessera.horizontal.strategies.fedavg import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, mean_delta
from tessera.horizontal.strategies.fedbuff import FedBuff
from tessera.horizontal.strategies.fednova import FedNova
from tessera.horizontal.strategies.robust import Bulyan, FedMedian, Krum, MultiKrum, RobustStrategy, TrimmedMean
from tessera.horizontal.strategies.scaffold import Scaffold, scaffold_mod

# Names accepted by `[strategy] name = ...` in job.toml. Robust and heterogeneity strategies add theirs here.
STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad)
}
STRATEGIES.update({cls.name: cls for cls in (FedMedian, TrimmedMean, Krum, MultiKrum, Bulyan, Scaffold, FedNova,
                                              FedBuff)})

__all__ = [
    "STRATEGIES", "Bulyan", "ClipUpdates", "DeadlineRounds", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM",
    "FedBuff", "FedMedian", "FedNova", "FedProx", "FedYogi", "FitResults", "Krum", "MeanStrategy", "MultiKrum",
    "RobustStrategy", "Scaffold", "Strategy", "StrategyWrapper", "TrimmedMean", "aggregate", "clip_update",
    "mean_delta", "scaffold_mod",
]
