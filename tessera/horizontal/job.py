"""What a horizontal job is made of (`JobParts`), how features plug into it (`Plugin`), and `Extension`.

A plugin never edits a job. It declares what it contributes (`Contribution`): an aggregation that replaces the
plain one, wrappers of the strategy, the task or the aggregation, client mods (outermost or inner) and server
extensions, plus the exclusive roles it occupies and what it requires. `compose` validates every contribution
against the others before anything runs (two plugins claiming one role, a plugin that needs single updates next
to one that hides them, a strategy that cannot serve a mean-only aggregation) and then applies them in a fixed
order that does not depend on the order of the plugin list.

Plugins (secure aggregation, DP) depend on this module and on `aggregation.py`, never on the round loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tessera.core.errors import ConfigError
from tessera.horizontal.aggregation import Aggregation, CentralEval, PlainAggregation
from tessera.horizontal.client import ClientApp, Mod, TaskClient
from tessera.horizontal.strategies.base import MeanStrategy, Strategy
from tessera.horizontal.task import Task


class Extension:
    """Server-side hooks around the round loop. Every hook is a no-op here; subclasses override what they need.

    `name` keys the extension's state in checkpoints, so it must be unique within a job.
    """

    name = "extension"

    def state_dict(self) -> dict[str, Any]:
        """State to carry in checkpoints (serde-encodable values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def on_round_end(self, rnd: int, record: dict[str, Any]) -> None:
        """Add keys to the round's record (epsilon, protocol facts) after aggregation and evaluation."""


class ClientStates(Extension):
    """In simulation, every client's persistent state (`ClientContext.state`) rides in the server's checkpoint."""

    name = "clients"

    def __init__(self, app: ClientApp) -> None:
        self.app = app

    def state_dict(self) -> dict[str, Any]:
        return self.app.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.app.load_state_dict(state)


@dataclass
class JobParts:
    """Everything a horizontal run is made of, as the user assembles it (a task, a strategy, the clients, and
    optionally mods such as attacks for an experiment). Plugins contribute through `compose`, which returns new
    parts and never edits these."""

    task: Task
    strategy: Strategy
    clients: list[str]
    aggregation: Aggregation = field(default_factory=PlainAggregation)
    mods: list[Mod] = field(default_factory=list)
    extensions: list[Extension] = field(default_factory=list)
    central_eval: CentralEval | None = None

    def client_app(self) -> ClientApp:
        # A strategy's own client mods (SCAFFOLD's control variates) run innermost, next to training, so plugin
        # mods (DP, masking, attacks) see its final reply.
        return ClientApp(TaskClient(self.task), [*self.mods, *self.strategy.client_mods()])


@dataclass(frozen=True)
class Contribution:
    """What one plugin adds to or replaces in a job.

    - `roles`: exclusive roles ("secure_aggregation", "privacy"); two plugins may not share one.
    - `aggregation`: replaces the plain aggregation (the fit phase); at most one plugin may.
    - `wrap_strategy`, `wrap_task`, `wrap_aggregation`: wrappers applied after every replacement.
    - `outer_mods`: client mods that run before every other mod and see the final reply (masking, encryption);
      `mods`: client mods inside the user's mods.
    - `needs_single_updates`: the plugin's server side reads each client's update (central client-level DP), so it
      cannot run with an aggregation that reveals only a sum.
    - `needs_mean_strategy`: the plugin reveals or produces only a mean, so the final strategy must be a
      `MeanStrategy`.
    """

    plugin: str
    roles: frozenset[str] = frozenset()
    aggregation: Aggregation | None = None
    wrap_strategy: Callable[[Strategy], Strategy] | None = None
    wrap_task: Callable[[Task], Task] | None = None
    wrap_aggregation: Callable[[Aggregation], Aggregation] | None = None
    outer_mods: tuple[Mod, ...] = ()
    mods: tuple[Mod, ...] = ()
    extensions: tuple[Extension, ...] = ()
    needs_single_updates: bool = False
    needs_mean_strategy: bool = False


class Plugin(ABC):
    """A feature that changes how a job runs (secure aggregation, DP): it says what it contributes."""

    name = "plugin"

    @abstractmethod
    def contribute(self, parts: JobParts) -> Contribution:
        """What this plugin adds to `parts` (the job as the user gave it). Raise ConfigError for a job it cannot
        serve; do not edit `parts`."""


def compose(parts: JobParts, plugins: Sequence[Plugin]) -> JobParts:
    """The job with every plugin's contribution applied, after checking that they fit together.

    The result does not depend on the order of `plugins`: contributions are applied stage by stage (aggregation
    replacement, strategy wrappers, task wrappers, aggregation wrappers, mods, extensions), and within a stage in
    the order of the plugins' names.
    """
    contribs = sorted((p.contribute(parts) for p in plugins), key=lambda c: c.plugin)
    _check(contribs)
    strategy = parts.strategy
    for c in contribs:
        if c.wrap_strategy is not None:
            strategy = c.wrap_strategy(strategy)
    for c in contribs:
        if c.needs_mean_strategy and not isinstance(strategy, MeanStrategy):
            raise ConfigError(
                f"{c.plugin} reveals only the sum of the updates, so it needs a mean-based strategy with a server "
                f"update (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad); {strategy.name} needs single "
                "updates")
    task = parts.task
    for c in contribs:
        if c.wrap_task is not None:
            task = c.wrap_task(task)
    replacing = [c for c in contribs if c.aggregation is not None]
    aggregation = replacing[0].aggregation if replacing else parts.aggregation
    assert aggregation is not None
    for c in contribs:
        if c.wrap_aggregation is not None:
            aggregation = c.wrap_aggregation(aggregation)
    mods = [*(m for c in contribs for m in c.outer_mods), *parts.mods, *(m for c in contribs for m in c.mods)]
    extensions = [*parts.extensions, *(e for c in contribs for e in c.extensions)]
    names = [e.name for e in extensions]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"two extensions share the checkpoint name(s) {dup}; give each plugin once")
    return replace(parts, task=task, strategy=strategy, aggregation=aggregation, mods=mods, extensions=extensions,
                   clients=list(parts.clients))


def _check(contribs: Sequence[Contribution]) -> None:
    """Refuse contributions that cannot run together, naming both plugins."""
    seen: dict[str, str] = {}
    for c in contribs:
        for role in sorted(c.roles):
            if role in seen:
                raise ConfigError(f"{seen[role]} and {c.plugin} both take the job's {role} role; give only one of "
                                  "them")
            seen[role] = c.plugin
    replacing = [c.plugin for c in contribs if c.aggregation is not None]
    if len(replacing) > 1:
        raise ConfigError(f"{replacing[0]} and {replacing[1]} both replace the job's aggregation; give only one")
    single = [c.plugin for c in contribs if c.needs_single_updates]
    if single and replacing:
        raise ConfigError(f"{single[0]} reads each client's update at the server, which {replacing[0]} hides; use "
                          "the distributed variant with secure aggregation, or drop one of them")

