"""Turn a validated job.toml into the parts of a horizontal run (data, model, task, strategy, plugins)."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tessera.core import datasets
from tessera.core.config import JobConfig, load_job
from tessera.core.errors import ConfigError
from tessera.core.models import MLP
from tessera.core.types import set_params
from tessera.horizontal.job import JobParts, Plugin, compose
from tessera.horizontal.partition import partition
from tessera.horizontal.scheduling import Scheduling
from tessera.horizontal.strategies import STRATEGIES, Strategy
from tessera.horizontal.task import SupervisedTask


def load_job_file(path: Path, *, warn_missing: bool = True) -> JobConfig:
    """`load_job`, with the job's own folder importable: `dataset = "mypkg.data:load"` (or a `module:Class` model)
    next to job.toml works without PYTHONPATH, wherever the command is run from."""
    cfg = load_job(path, warn_missing=warn_missing)
    folder = str(Path(path).resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return cfg


def preflight(parts: JobParts, client: str | None = None) -> None:
    """One batch of `client`'s training data (default: the job's first client) through the model and the loss
    before anything is written or dialled: a model that does not fit the data, or too few classes for its labels,
    is one ShapeMismatch/ConfigError naming both shapes, not a failed round."""
    from tessera.horizontal.checks import dry_run

    cid = client if client is not None else parts.clients[0]
    train, _ = parts.task.data_fn(cid, 1)
    tensors = getattr(getattr(train, "dataset", None), "tensors", None)
    labels = tensors[1] if isinstance(tensors, tuple) and len(tensors) == 2 else None
    dry_run(parts.task, train, party=cid, labels=labels)


def build_model_fn(cfg: JobConfig, in_features: int, num_classes: int) -> Callable[[], nn.Module]:
    m = cfg.model
    if m.name in ("mlp", "logreg"):
        hidden = list(m.hidden) if m.name == "mlp" else []
        return lambda: MLP(in_features, num_classes, hidden)
    cls = datasets.resolve(m.name, what="model.name", choices=["mlp", "logreg"])
    if not callable(cls):
        raise ConfigError(f"model.name: {m.name!r} is not callable")
    return lambda: cls(**m.kwargs)


def build_strategy(cfg: JobConfig) -> Strategy:
    name = cfg.strategy.name.lower()
    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name: unknown strategy {cfg.strategy.name!r}; choose one of {sorted(STRATEGIES)}")
    cls = STRATEGIES[name]
    kwargs = cfg.strategy.kwargs()
    allowed = {p for c in cls.__mro__ for p in inspect.signature(c.__init__).parameters}  # type: ignore[misc]
    allowed -= {"self", "kwargs"}
    for key in kwargs:
        if key not in allowed:
            raise ConfigError(f"strategy.{key}: not an option of {name}; options are {sorted(allowed)}")
    local = {"local_epochs": cfg.train.local_epochs}
    return cls(**kwargs, local_config={**local, **kwargs.pop("local_config", {})})


ClientData = dict[str, tuple[np.ndarray, ...]]


def split_data(cfg: JobConfig) -> tuple[ClientData, tuple[np.ndarray, np.ndarray] | None, int, int]:
    """Per-client (x_train, y_train, x_test, y_test), the optional central test set, in_features, num_classes."""
    x, y = datasets.load(cfg.data.dataset)
    rng = np.random.default_rng(cfg.job.seed)
    central = None
    if cfg.data.central_test_fraction > 0:
        perm = rng.permutation(len(y))
        cut = int(len(y) * cfg.data.central_test_fraction)
        central = (x[perm[:cut]], y[perm[:cut]])
        x, y = x[perm[cut:]], y[perm[cut:]]
    parts = partition(y, cfg.data.num_clients, scheme=cfg.data.partition, rng=rng, alpha=cfg.data.alpha,
                      shards_per_client=cfg.data.shards_per_client)
    out: ClientData = {}
    for i, rows in enumerate(parts):
        idx = rng.permutation(rows)
        cut = max(1, round(len(idx) * cfg.data.test_fraction))
        te, tr = idx[:cut], idx[cut:]
        out[f"client{i:0{len(str(len(parts) - 1))}d}"] = (x[tr], y[tr], x[te], y[te])
    return out, central, int(x.shape[1]), int(y.max()) + 1


def optimizer_fn(cfg: JobConfig) -> Callable[[Any], torch.optim.Optimizer]:
    t = cfg.train
    if t.optimizer == "adam":
        return lambda p: torch.optim.Adam(p, lr=t.lr)
    return lambda p: torch.optim.SGD(p, lr=t.lr, momentum=t.momentum)


def build_parts(cfg: JobConfig, *, device: str | None = None) -> JobParts:
    """The job's parts; `device` (a party's --device or federation.toml device) overrides [train] device."""
    data, central, in_features, num_classes = split_data(cfg)
    model_fn = build_model_fn(cfg, in_features, num_classes)
    bs = cfg.train.batch_size

    def data_fn(cid: str) -> tuple[DataLoader[Any], DataLoader[Any] | None]:
        xtr, ytr, xte, yte = data[cid]
        train = DataLoader(TensorDataset(torch.from_numpy(xtr), torch.from_numpy(ytr)), batch_size=bs, shuffle=True)
        return train, DataLoader(TensorDataset(torch.from_numpy(xte), torch.from_numpy(yte)), batch_size=512)

    task = SupervisedTask(model_fn=model_fn, loss_fn=nn.CrossEntropyLoss(), optimizer_fn=optimizer_fn(cfg),
                          data_fn=data_fn, device=device or cfg.train.device, precision=cfg.train.precision)
    parts = JobParts(task=task, strategy=build_strategy(cfg), clients=list(data))
    if central is not None:
        loader = DataLoader(TensorDataset(torch.from_numpy(central[0]), torch.from_numpy(central[1])), batch_size=512)
        model = task.model_fn()  # on the task's device, where its evaluate moves the batches

        def central_eval(params: Any) -> Any:
            set_params(model, params)
            return task.evaluate(model, loader)

        parts.central_eval = central_eval
    return parts


def build_scheduling(cfg: JobConfig) -> Scheduling | None:
    """The coordinator's scheduling policy from [schedule] (None: synchronous rounds). One object per server: a
    real-clock policy holds its dispatcher threads and counters."""
    from tessera.horizontal.realtime import Asynchronous, Deadline, Late

    s = cfg.schedule
    if s is None or s.policy == "sync":
        return None
    if s.policy == "deadline":
        return Deadline(seconds=s.seconds, steps=s.steps, grace=s.grace, late=Late(s.late),
                        staleness_exponent=s.staleness_exponent)
    return Asynchronous(buffer_size=s.buffer_size, concurrency=s.concurrency, max_failures=s.max_failures)


def build_plugins(cfg: JobConfig, *, secagg_pki: Any = None) -> list[Plugin]:
    plugins: list[Plugin] = []
    if cfg.secagg is not None:
        from tessera.secagg import plugin as secagg_plugin

        plugins.append(secagg_plugin(cfg.secagg, pki=secagg_pki))
    if cfg.dp is not None:
        from tessera.privacy import plugin as dp_plugin

        plugins.append(dp_plugin(cfg.dp))
    return plugins


def job_parts(cfg: JobConfig) -> JobParts:
    """`build_parts` with the job's plugins ([secagg], [dp]) configured into it: what each deployed party runs."""
    return compose(build_parts(cfg), build_plugins(cfg))
