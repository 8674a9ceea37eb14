"""What a horizontal job is made of (`JobParts`) and how features plug into it (`Plugin`).

Plugins (secure aggregation, DP) depend on this module and on `aggregation.py`, never on the round loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from tessera.horizontal.aggregation import Aggregation, CentralEval, PlainAggregation
from tessera.horizontal.client import ClientApp, Mod, TaskClient
from tessera.horizontal.strategies.base import Strategy
from tessera.horizontal.task import Task


@dataclass
class JobParts:
    """Everything a horizontal run is made of. Plugins (secure aggregation, DP) edit these before the run."""

    task: Task
    strategy: Strategy
    clients: list[str]
    aggregation: Aggregation = field(default_factory=PlainAggregation)
    mods: list[Mod] = field(default_factory=list)
    extensions: list[Any] = field(default_factory=list)
    central_eval: CentralEval | None = None

    def client_app(self) -> ClientApp:
        # A strategy that needs client-side work (SCAFFOLD's control variates) brings its own mods; they run
        # innermost, next to training, so other mods (DP, masking, attacks) see its final reply.
        strategy_mods: list[Mod] = list(getattr(self.strategy, "client_mods", list)())
        return ClientApp(TaskClient(self.task), [*self.mods, *strategy_mods])


class Plugin(Protocol):
    """A feature that changes how a job runs (e.g. secure aggregation): it edits the parts in place."""

    def configure(self, parts: JobParts) -> None: ...
