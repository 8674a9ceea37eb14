"""FLModel: the array API for the simplest migration, a thin layer over Task/Strategy/simulate."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tessera.core.errors import ConfigError
from tessera.core.metrics import History
from tessera.core.types import as_tensor, get_params, set_params
from tessera.horizontal.server import Server
from tessera.horizontal.simulation import JobParts, Plugin, simulate
from tessera.horizontal.strategies import FedAvg, Strategy
from tessera.horizontal.task import LossFn, MetricFn, OptimizerFn, SupervisedTask


class FLModel:
    """Federated training of one PyTorch model over parties' arrays (horizontal: same columns, different rows).

    >>> fl = FLModel(parties=["alice", "bob"], model=net, loss_fn=nn.CrossEntropyLoss(),
    ...              optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1))
    >>> history = fl.fit(x=[x_alice, x_bob], y=[y_alice, y_bob], rounds=10, batch_size=32)
    """

    def __init__(
        self,
        *,
        parties: Sequence[str],
        model: nn.Module,
        loss_fn: LossFn,
        optimizer_fn: OptimizerFn,
        strategy: Strategy | None = None,
        secure_aggregation: str | Mapping[str, Any] | Plugin | None = None,
        dp: Plugin | None = None,
        seed: int = 0,
        metrics: Mapping[str, MetricFn] | None = None,
        output_dir: str | Path | None = None,
        backend: str = "inprocess",
    ) -> None:
        if len(set(parties)) != len(parties) or not parties:
            raise ConfigError(f"parties must be a non-empty list of unique names, got {list(parties)}")
        self.parties = list(parties)
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer_fn = optimizer_fn
        self.strategy = strategy if strategy is not None else FedAvg()
        self._fraction_evaluate = self.strategy.fraction_evaluate
        self.plugins: list[Plugin] = []
        if secure_aggregation is not None:
            from tessera.secagg import plugin as secagg_plugin

            self.plugins.append(secagg_plugin(secure_aggregation))
        if dp is not None:
            self.plugins.append(dp)
        self.seed = seed
        self.metrics = metrics
        self.output_dir = output_dir
        self.backend = backend
        self.rounds_done = 0
        self.stopped: str | None = None  # why the last fit ended before its rounds (a spent privacy budget)

    def _split(self, x: Sequence[Any], y: Sequence[Any] | None, what: str) -> list[tuple[torch.Tensor, ...]]:
        if len(x) != len(self.parties) or (y is not None and len(y) != len(self.parties)):
            raise ConfigError(f"{what}: give one array per party ({len(self.parties)}: {self.parties}), "
                              f"got x={len(x)}" + ("" if y is None else f", y={len(y)}"))
        out: list[tuple[torch.Tensor, ...]] = []
        for i, name in enumerate(self.parties):
            xs = as_tensor(x[i], what=f"x[{name}]")
            if y is None:
                out.append((xs,))
                continue
            ys = as_tensor(y[i], what=f"y[{name}]")
            if len(xs) != len(ys):
                raise ConfigError(f"{what}: party {name} has {len(xs)} rows of x but {len(ys)} labels")
            out.append((xs, ys))
        return out

    def _task(self, train: dict[str, TensorDataset], test: dict[str, TensorDataset] | None, batch_size: int,
              shuffle: bool) -> SupervisedTask:
        template = copy.deepcopy(self.model)

        def data_fn(cid: str) -> tuple[DataLoader[Any], DataLoader[Any] | None]:
            tl = DataLoader(train[cid], batch_size=batch_size, shuffle=shuffle)
            return tl, (DataLoader(test[cid], batch_size=256) if test else None)

        return SupervisedTask(model_fn=lambda: copy.deepcopy(template), loss_fn=self.loss_fn,
                              optimizer_fn=self.optimizer_fn, data_fn=data_fn, metrics=self.metrics)

    def fit(self, *, x: Sequence[Any], y: Sequence[Any], rounds: int, local_epochs: int = 1, batch_size: int = 32,
            shuffle: bool = True, validation_data: tuple[Sequence[Any], Sequence[Any]] | None = None,
            progress: bool = False) -> History:
        """Train for `rounds` more rounds, continuing from the current global model."""
        if rounds < 1 or local_epochs < 1 or batch_size < 1:
            raise ConfigError("rounds, local_epochs and batch_size must be at least 1")
        train = {p: TensorDataset(*t) for p, t in zip(self.parties, self._split(x, y, "fit"), strict=True)}
        test = None
        if validation_data is not None:
            vx, vy = validation_data
            test = {p: TensorDataset(*t) for p, t in zip(self.parties, self._split(vx, vy, "validation_data"),
                                                         strict=True)}
        self.strategy.fraction_evaluate = self._fraction_evaluate if test else 0.0
        self.strategy.local_config["local_epochs"] = local_epochs
        parts = JobParts(task=self._task(train, test, batch_size, shuffle), strategy=self.strategy,
                         clients=list(self.parties))
        start = self.rounds_done
        servers: list[Server] = []

        def continue_from(server: Server) -> None:
            server.round = start
            servers.append(server)

        history, params = simulate(parts, rounds=start + rounds, seed=self.seed, output_dir=self.output_dir,
                                   backend=self.backend, params=get_params(self.model), plugins=self.plugins,
                                   progress=progress, on_server=continue_from)
        set_params(self.model, params)
        # A spent privacy budget ends a run early: count the rounds that ran, and say why it stopped.
        self.rounds_done = servers[0].round
        self.stopped = servers[0].stopped
        return history

    @torch.no_grad()
    def predict(self, x: Any, *, batch_size: int = 1024) -> torch.Tensor:
        """The global model's outputs on `x` (one array, not per party)."""
        xs = as_tensor(x, what="x")
        self.model.eval()
        return torch.cat([self.model(xs[i : i + batch_size]) for i in range(0, len(xs), batch_size)])

    def evaluate(self, *, x: Sequence[Any], y: Sequence[Any], batch_size: int = 256) -> dict[str, Any]:
        """Loss and metrics of the global model on each party's data and example-weighted overall."""
        task = self._task({}, None, batch_size, False)
        per: dict[str, Any] = {}
        total, n = {"loss": 0.0}, 0
        for name, (xs, ys) in zip(self.parties, self._split(x, y, "evaluate"), strict=True):
            loss, metrics = task.evaluate(self.model, DataLoader(TensorDataset(xs, ys), batch_size=batch_size))
            per[name] = {"loss": loss, **metrics, "num_examples": len(ys)}
            total["loss"] += loss * len(ys)
            for k, v in metrics.items():
                total[k] = total.get(k, 0.0) + v * len(ys)
            n += len(ys)
        return {**{k: v / max(n, 1) for k, v in total.items()}, "parties": per}
