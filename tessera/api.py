"""FLModel and SLModel: the array API, the shortest migration path from a single-machine PyTorch script.

This is the only place where `secure_aggregation=` / `dp=` become plugins (DESIGN.md: Layers); `FLModel` is a
thin layer over Task/Strategy/simulate, `SLModel` over DataOwner/SplitTrainer/a Backend.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tessera.core.device import DeviceSpec, Placement
from tessera.core.errors import ConfigError
from tessera.core.metrics import History
from tessera.core.tracking import RecordLogger, check_specs
from tessera.core.types import ModuleFactory, as_tensor, get_params, set_params
from tessera.horizontal.checks import dry_run, refuse_unknown
from tessera.horizontal.server import Server
from tessera.horizontal.simulation import JobParts, Plugin, simulate
from tessera.horizontal.strategies import FedAvg, Strategy
from tessera.horizontal.task import LossFn, MetricFn, OptimizerFn, SupervisedTask
from tessera.runtime.backend import Backend, Handler, InProcessBackend
from tessera.vertical.label import LabelParty
from tessera.vertical.metrics import plot_split
from tessera.vertical.model import SplitModel
from tessera.vertical.owner import DataOwner, OwnerGroup
from tessera.vertical.owner import OptimizerFn as SplitOptimizerFn
from tessera.vertical.protections import Protections
from tessera.vertical.trainer import EarlyStopping, SplitTrainer
from tessera.vertical.trainer import LossFn as SplitLossFn

Arrays = Mapping[str, Any]


class FLModel:
    """Federated training of one PyTorch model over parties' arrays (horizontal: same columns, different rows).

    >>> fl = FLModel(parties=["alice", "bob"], model=net, loss_fn=nn.CrossEntropyLoss(),
    ...              optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1))
    >>> history = fl.fit(x=[x_alice, x_bob], y=[y_alice, y_bob], rounds=10, batch_size=32)

    Metrics follow the loss (accuracy for classification, mse/mae/r2 for regression; `metrics=` overrides), `fit`
    dry-runs one batch per party first, and `loggers=["tensorboard", "mlflow"]` also writes every round's record
    under `output_dir` (docs/migration.md).

    `device` ("auto", "cpu", "cuda", "cuda:N", "mps") is where every client trains (each client model is placed
    once; batches move per step); the global model and aggregation stay on the CPU. `precision` "bf16"/"fp16"
    trains under autocast (docs/gpu.md).
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
        loggers: Sequence[str | RecordLogger] = (),
        device: DeviceSpec = None,
        precision: str = "32",
        **unknown: Any,
    ) -> None:
        refuse_unknown("FLModel(...)", unknown, _params_of(FLModel.__init__))
        self.placement = Placement.of(device, precision)
        self.device, self.precision = device, precision
        check_specs(loggers)
        if loggers and output_dir is None:
            raise ConfigError("loggers= write next to metrics.jsonl: give FLModel(output_dir=...) as well")
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
        self.loggers = list(loggers)
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
        # In-process clients copy the global model itself (it does not change during fit); other backends ship only
        # its structure (ModuleFactory, no weights): every client loads the global params before using its model.
        model_fn: Callable[[], nn.Module] = (
            (lambda: copy.deepcopy(self.model)) if self.backend == "inprocess" else ModuleFactory(self.model))

        def data_fn(cid: str, rnd: int) -> tuple[DataLoader[Any], DataLoader[Any] | None]:
            pin = self.placement.pin_memory
            tl = DataLoader(train[cid], batch_size=batch_size, shuffle=shuffle, pin_memory=pin)
            return tl, (DataLoader(test[cid], batch_size=256, pin_memory=pin) if test else None)

        return SupervisedTask(model_fn=model_fn, loss_fn=self.loss_fn, optimizer_fn=self.optimizer_fn,
                              data_fn=data_fn, metrics=self.metrics, device=self.device, precision=self.precision)

    def fit(self, *, x: Sequence[Any], y: Sequence[Any], rounds: int | None = None, local_epochs: int = 1,
            batch_size: int = 32, shuffle: bool = True,
            validation_data: tuple[Sequence[Any], Sequence[Any]] | None = None, progress: bool = False,
            **unknown: Any) -> History:
        """Train for `rounds` more rounds, continuing from the current global model.

        Before round 1 one batch of every party's data goes through the model and the loss (`dry_run`): shape
        and dtype mistakes stop here with an error naming the party and both shapes."""
        refuse_unknown("FLModel.fit(...)", unknown, _params_of(FLModel.fit))
        if rounds is None:
            raise ConfigError("fit needs rounds= (federated rounds); local_epochs= sets the passes over local data "
                              "per round")
        if rounds < 1 or local_epochs < 1 or batch_size < 1:
            raise ConfigError("rounds, local_epochs and batch_size must be at least 1")
        train = {p: TensorDataset(*t) for p, t in zip(self.parties, self._split(x, y, "fit"), strict=True)}
        test = None
        if validation_data is not None:
            vx, vy = validation_data
            test = {p: TensorDataset(*t) for p, t in zip(self.parties, self._split(vx, vy, "validation_data"),
                                                         strict=True)}
        self._dry_run(train, batch_size)
        if test:
            self._dry_run(test, batch_size, " (validation_data)")
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
                                   backend=self.backend, params=get_params(self.model, copy=False),
                                   plugins=self.plugins, backend_options=self._backend_options(),
                                   progress=progress, on_server=continue_from,
                                   loggers=self.loggers)
        set_params(self.model, params)
        # A spent privacy budget ends a run early: count the rounds that ran, and say why it stopped.
        self.rounds_done = servers[0].round
        self.stopped = servers[0].stopped
        return history

    def _backend_options(self) -> dict[str, Any] | None:
        """Ray sizes its object store for the model (one exchange must never spill)."""
        if self.backend != "ray":
            return None
        return {"model_bytes": sum(t.numel() * t.element_size() for t in self.model.state_dict().values())}

    def _dry_run(self, data: dict[str, TensorDataset], batch_size: int, what: str = "") -> None:
        for name, ds in data.items():
            xs, ys = ds.tensors
            dry_run(self.model, [(xs[:batch_size], ys[:batch_size])], party=f"{name}{what}", loss_fn=self.loss_fn,
                    labels=ys)

    @torch.no_grad()
    def predict(self, x: Any, *, batch_size: int = 1024) -> torch.Tensor:
        """The global model's outputs on `x` (one array, not per party)."""
        xs = as_tensor(x, what="x")
        self.model.eval()
        return torch.cat([self.model(xs[i : i + batch_size]) for i in range(0, len(xs), batch_size)])

    def evaluate(self, *, x: Sequence[Any], y: Sequence[Any], batch_size: int = 256) -> dict[str, Any]:
        """Loss and metrics of the global model on each party's data and example-weighted overall."""
        task = self._task({}, None, batch_size, False)
        model = task.placement.place(copy.deepcopy(self.model)) if self.placement.explicit else self.model
        per: dict[str, Any] = {}
        total, n = {"loss": 0.0}, 0
        for name, (xs, ys) in zip(self.parties, self._split(x, y, "evaluate"), strict=True):
            loss, metrics = task.evaluate(model, DataLoader(TensorDataset(xs, ys), batch_size=batch_size))
            per[name] = {"loss": loss, **metrics, "num_examples": len(ys)}
            total["loss"] += loss * len(ys)
            for k, v in metrics.items():
                total[k] = total.get(k, 0.0) + v * len(ys)
            n += len(ys)
        return {**{k: v / max(n, 1) for k, v in total.items()}, "parties": per}


def _party_devices(device: DeviceSpec | Mapping[str, DeviceSpec], parties: Sequence[str]) -> dict[str, DeviceSpec]:
    """SLModel's `device=`: one setting for every party, or a dict naming some of them."""
    if not isinstance(device, Mapping):
        return dict.fromkeys(parties, device)
    unknown = [p for p in device if p not in parties]
    if unknown:
        raise ConfigError(f"device names {unknown}, which are not parties of this SLModel "
                          f"({list(dict.fromkeys(parties))}); key the dict by party name")
    return dict(device)


def _params_of(fn: Callable[..., Any]) -> list[str]:
    """Keyword names a function takes (its `**unknown` catch-all left out)."""
    return [n for n, p in inspect.signature(fn).parameters.items() if n != "self" and p.kind is p.KEYWORD_ONLY]


class SLModel:
    """Split learning over parties that hold different columns of the same (aligned) rows.

    Each party in `base_models` runs its base on its own columns; `label_party` holds the labels and `fuse_model`,
    whose forward receives the list of embeddings in the order of `base_models`. With no protections, training is
    numerically the same as training `SplitModel(base_models, fuse_model)` on the joined data.

    All parties live in this process (simulation): the owners' handlers are reached through `backend(handler)`,
    by default `InProcessBackend(handler)` (e.g. `backend=lambda h: InProcessBackend(h, max_workers=2)`). For
    parties in separate processes use `DataOwner` at each owner and `SplitTrainer` at the label party.

    With `compute_party`, the fuse model runs at that party (no labels, no base) and `label_party` holds only the
    labels and the loss (`tessera.vertical.label.LabelParty`): it receives fused outputs and returns the loss
    gradient. Three roles, still numerically the same as centralised training.

    `device` places every party's models ("cuda", "auto", ...) or each party's on its own device
    (`{"alice": "cuda:0", "bob": "cpu"}`, parties left out stay where their model is); embeddings and gradients
    cross between parties as CPU tensors.

    >>> sl = SLModel(base_models={"alice": nn.Linear(10, 4), "bob": nn.Linear(20, 4)},
    ...              fuse_model=ConcatFuse(nn.Linear(8, 1)), label_party="alice",
    ...              loss_fn=nn.BCEWithLogitsLoss(), optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1))
    >>> history = sl.fit(x={"alice": xa, "bob": xb}, y=y, epochs=5, batch_size=32)
    """

    def __init__(self, *, base_models: Mapping[str, nn.Module], fuse_model: nn.Module, label_party: str,
                 loss_fn: SplitLossFn, optimizer_fn: SplitOptimizerFn, seed: int = 0,
                 protections: Protections | None = None,
                 output_dir: str | Path | None = None, backend: Callable[[Handler], Backend] | None = None,
                 ledger: Any = None, compute_party: str | None = None,
                 device: DeviceSpec | Mapping[str, DeviceSpec] = None) -> None:
        where = _party_devices(device, [*base_models, label_party, *([compute_party] if compute_party else [])])
        if compute_party is not None and (label_party in base_models or compute_party in base_models
                                          or compute_party == label_party):
            raise ConfigError(f"with a compute party, {compute_party!r} (fuse) and the label party {label_party!r} "
                              "(labels and loss) hold no base model and have distinct names")
        self.model = SplitModel(base_models, fuse_model, label_party=label_party)
        self.protections = protections or Protections()
        self.seed = seed
        self.output_dir = Path(output_dir) if output_dir is not None else None
        dp = self.protections.embedding_dp
        self.owners = {p: DataOwner(p, self.model.bases[p], optimizer_fn, embedding_dp=dp, seed=seed, ledger=ledger,
                                    state_dir=self.output_dir / "parties" / p if self.output_dir else None,
                                    decorrelation=self.protections.decorrelation, device=where.get(p))
                       for p in self.model.owners}
        self.label = LabelParty(label_party, loss_fn, label_dp=self.protections.label_dp, seed=seed) \
            if compute_party is not None else None
        handler = OwnerGroup([*self.owners.values(), *([self.label] if self.label is not None else [])])
        self.backend = backend(handler) if backend is not None else InProcessBackend(handler)
        local = dict(self.model.bases.items()).get(label_party)
        self.trainer = SplitTrainer(fuse=self.model.fuse, loss_fn=None if self.label else loss_fn,
                                    optimizer_fn=optimizer_fn, label_party=compute_party or label_party,
                                    order=list(self.model.bases), backend=self.backend, local_base=local,
                                    protections=self.protections, seed=seed, output_dir=self.output_dir,
                                    ledger=ledger, loss_party=label_party if self.label is not None else None,
                                    device=where.get(compute_party or label_party))

    @property
    def base_models(self) -> dict[str, nn.Module]:
        return dict(self.model.bases.items())

    @property
    def fuse_model(self) -> nn.Module:
        return self.model.fuse

    @property
    def label_party(self) -> str:
        return self.model.label_party

    def _give(self, split: str, x: Arrays, y: Any | None) -> None:
        """Hand each party its columns of `split` (in simulation the arrays never leave their owner object)."""
        missing = [p for p in self.model.bases if p not in x]
        extra = [p for p in x if p not in self.model.bases]
        if missing or extra:
            raise ConfigError(f"x must hold one array per base owner {list(self.model.bases)}: missing party "
                              f"{missing}, unknown {extra}")
        for p in self.model.bases:
            xs = as_tensor(x[p], what=f"x[{p}]")
            if p in self.owners:
                self.owners[p].add_split(split, xs)
            else:
                self.trainer.add_split(split, x=xs)
        if y is not None:
            ys = as_tensor(y, what="y")
            if self.label is not None:
                self.label.add_split(split, ys)
            else:
                self.trainer.add_split(split, y=ys)

    def fit(self, *, x: Arrays, y: Any, epochs: int, batch_size: int = 32, shuffle: bool = True,
            validation_data: tuple[Arrays, Any] | None = None, early_stopping: EarlyStopping | None = None,
            resume: bool = False, progress: Callable[[dict[str, Any]], None] | None = None) -> History:
        """Train `epochs` more epochs; with `resume=True` continue the checkpoint in output_dir up to `epochs` in
        total. Shapes are checked on one dry-run batch before any training."""
        if epochs < 1:
            raise ConfigError("epochs must be at least 1")
        self._give("train", x, y)
        if validation_data is not None:
            self._give("valid", *validation_data)
        target = epochs
        if resume:
            if self.output_dir is None:
                raise ConfigError("resume=True needs output_dir, where the checkpoint lives")
            self.trainer.resume()
        else:
            target = self.trainer.epoch + epochs
        history = self.trainer.fit(epochs=target, batch_size=batch_size, shuffle=shuffle,
                                   validation="valid" if validation_data is not None else None,
                                   early_stopping=early_stopping, progress=progress)
        if self.output_dir is not None:
            plot_split(history, self.output_dir)
        return history

    def evaluate(self, *, x: Arrays, y: Any, batch_size: int = 256) -> dict[str, float]:
        """Loss, accuracy (and AUC for binary tasks) on new aligned rows: owners embed, the label party fuses."""
        self._give("test", x, y)
        return self.trainer.evaluate("test", batch_size=batch_size)

    def predict(self, *, x: Arrays, batch_size: int = 256) -> torch.Tensor:
        """The composed model's outputs on new aligned rows (one array per base owner)."""
        self._give("predict", x, None)
        return self.trainer.outputs("predict", batch_size=batch_size)

    def close(self) -> None:
        """Release the backend (nothing to release in-process)."""
        self.trainer.close()
