"""Ready-made federations the tests run: digits split over clients, an MLP, SGD, a held-out set scored centrally.

Independent of the demos (tests never import them): a demo is tested through the CLI (`run_demo`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tessera.core.datasets import digits
from tessera.core.metrics import History
from tessera.core.models import MLP
from tessera.core.types import set_params
from tessera.horizontal.attacks import AttackKind, UpdateAttack
from tessera.horizontal.client import CallNext, ClientContext, Mod
from tessera.horizontal.job import JobParts
from tessera.horizontal.partition import partition as split
from tessera.horizontal.simulation import simulate
from tessera.horizontal.strategies import FedAvg
from tessera.horizontal.strategies.base import Strategy
from tessera.horizontal.task import SupervisedTask
from tessera.runtime.messages import FitIns


def _digits_federation(strategy: Strategy, rows: dict[str, np.ndarray], eval_rows: np.ndarray, *,
                       hidden: Sequence[int], lr: float, batch_size: int, mods: Sequence[Mod]) -> JobParts:
    """Clients holding the given digits rows (no test split of their own); `central_eval` scores `eval_rows`."""
    x, y = digits()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def data_fn(cid: str) -> tuple[DataLoader[Any], None]:
        r = torch.from_numpy(rows[cid])
        return DataLoader(TensorDataset(xt[r], yt[r]), batch_size=batch_size, shuffle=True), None

    task = SupervisedTask(model_fn=lambda: MLP(64, 10, hidden), loss_fn=nn.CrossEntropyLoss(),
                          optimizer_fn=lambda p: torch.optim.SGD(p, lr=lr), data_fn=data_fn)
    ev = torch.from_numpy(eval_rows)
    loader = DataLoader(TensorDataset(xt[ev], yt[ev]), batch_size=1024)
    model = MLP(64, 10, hidden)

    def central_eval(params: Any) -> Any:
        set_params(model, params)
        return task.evaluate(model, loader)

    return JobParts(task=task, strategy=strategy, clients=list(rows), mods=list(mods), central_eval=central_eval)


def _ids(n: int) -> list[str]:
    width = len(str(n - 1))
    return [f"c{i:0{width}d}" for i in range(n)]


def digits_parts(strategy: Strategy, *, num_clients: int = 10, seed: int = 0, partition: str = "iid",
                 alpha: float = 0.5, hidden: Sequence[int] = (32,), lr: float = 0.1, batch_size: int = 32,
                 mods: Sequence[Mod] = (), eval_on: str = "test", test_fraction: float = 0.2) -> JobParts:
    """Digits split across `num_clients` clients (IID or Dirichlet(alpha) label skew) with an MLP and SGD.

    `central_eval` scores the global model on a held-out 20% of digits (`eval_on="test"`) or on the union of the
    clients' training rows (`eval_on="train"`: the global training loss FedAvg and SCAFFOLD minimise).
    """
    _, y = digits()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    cut = int(len(y) * test_fraction)
    test_rows, train_rows = perm[:cut], perm[cut:]
    parts = split(y[train_rows], num_clients, scheme=partition, rng=rng, alpha=alpha)
    rows = {cid: train_rows[p] for cid, p in zip(_ids(num_clients), parts, strict=True)}
    return _digits_federation(strategy, rows, test_rows if eval_on == "test" else train_rows, hidden=hidden, lr=lr,
                              batch_size=batch_size, mods=mods)


def byzantine_run(strategy: Strategy, *, rounds: int, byzantine: int = 3, scale: float = 10.0, seed: int = 0,
                  **kwargs: Any) -> History:
    """Digits, 10 IID clients of which the first `byzantine` send sign-flipped updates scaled by `scale`."""
    parts = digits_parts(strategy, seed=seed, **kwargs)
    attack = UpdateAttack(AttackKind.SIGN_FLIP, clients=frozenset(parts.clients[:byzantine]), scale=scale)
    parts.mods = [attack] if byzantine else []
    history, _ = simulate(parts, rounds=rounds, seed=seed)
    return history


def accuracy_curve(history: History) -> list[float]:
    return [float(a) for a in history["central_metrics.accuracy"]]


class DropOut:
    """A mod that makes a seeded `fraction` of `clients` vanish each round while training, i.e. mid-round: under
    SecAgg+ after key and share exchange (their pairwise masks must be rebuilt), under CKKS after key delivery."""

    def __init__(self, clients: Sequence[str], *, fraction: float, seed: int = 0) -> None:
        self.clients, self.fraction, self.seed = list(clients), fraction, seed

    def dropped(self, rnd: int) -> set[str]:
        k = round(self.fraction * len(self.clients))
        rng = np.random.default_rng([self.seed, rnd])
        return {self.clients[i] for i in rng.choice(len(self.clients), size=k, replace=False)}

    def __call__(self, msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
        if isinstance(msg, FitIns) and ctx.client in self.dropped(msg.round):
            raise ConnectionError("client went offline mid-round")
        return call_next(msg, ctx)


def digits_job(strategy: Strategy, *, num_clients: int = 10, seed: int = 0, hidden: Sequence[int] = (32,),
               lr: float = 0.1, batch_size: int = 32, dropout: float = 0.0) -> JobParts:
    """Digits split IID (contiguous slices of one permutation) over `num_clients` clients, an MLP with SGD, a
    held-out 20% scored by central_eval; `dropout` makes that fraction of clients vanish mid-round (DropOut)."""
    _, y = digits()
    perm = np.random.default_rng(seed).permutation(len(y))
    cut = len(y) // 5
    test, train = perm[:cut], perm[cut:]
    rows = dict(zip(_ids(num_clients), np.array_split(train, num_clients), strict=True))
    mods: list[Mod] = [DropOut(list(rows), fraction=dropout, seed=seed)] if dropout else []
    return _digits_federation(strategy, rows, test, hidden=hidden, lr=lr, batch_size=batch_size, mods=mods)


def run_demo(name: str, out: Path) -> tuple[Path, str]:
    """`tessera demo NAME --quick --out OUT` through the CLI (in this process); returns the folder the demo wrote,
    `OUT/NAME`, and what it printed."""
    from typer.testing import CliRunner

    from tessera.cli.main import app

    result = CliRunner().invoke(app, ["demo", name, "--quick", "--out", str(out)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return out / name, result.output


class Window(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One client's data window (12 features, 4 classes); `advance(rnd)` replaces it with round rnd's, of a
    different size every round (between 0.5 and 1.5 times `base_rows`), so a DP client's sampling rate changes."""

    def __init__(self, index: int, *, seed: int, base_rows: int) -> None:
        self.index, self.seed, self.base_rows = index, seed, base_rows
        self.rnd = -1
        self.advance(0)

    def advance(self, rnd: int) -> None:
        if rnd == self.rnd:
            return
        rng = np.random.default_rng([self.seed, self.index, rnd])
        n = int(self.base_rows * rng.uniform(0.5, 1.5))
        self.x = torch.from_numpy(rng.normal(size=(n, 12)).astype(np.float32))
        self.y = torch.from_numpy(rng.integers(0, 4, size=n))
        self.rnd = rnd

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def window_parts(*, clients: int = 5, base_rows: int = 64, batch_size: int = 32, seed: int = 0,
                 lr: float = 0.1) -> tuple[JobParts, dict[str, Window]]:
    """Clients whose data window is replaced by a new one, of a new size, at every round's FitIns."""
    windows = {f"c{i}": Window(i, seed=seed, base_rows=base_rows) for i in range(clients)}

    def new_window(msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
        if isinstance(msg, FitIns):
            windows[ctx.client].advance(msg.round)
        return call_next(msg, ctx)

    def data_fn(cid: str) -> tuple[DataLoader[Any], None]:
        return DataLoader(windows[cid], batch_size=batch_size, shuffle=True), None

    task = SupervisedTask(model_fn=lambda: MLP(12, 4, [32]), loss_fn=nn.CrossEntropyLoss(),
                          optimizer_fn=lambda p: torch.optim.SGD(p, lr=lr), data_fn=data_fn)
    parts = JobParts(task=task, strategy=FedAvg(fraction_evaluate=0.0), clients=list(windows), mods=[new_window])
    return parts, windows
