"""`tessera demo robust`: Byzantine clients vs FedAvg and the robust aggregators, on digits.

The robustness tests assert the same runs through their own fixture (tests/fixtures.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tessera.core.metrics import History, plot_curves
from tessera.horizontal.client import Mod
from tessera.horizontal.simulation import JobParts
from tessera.horizontal.strategies.base import Strategy


def digits_parts(strategy: Strategy, *, num_clients: int = 10, seed: int = 0, partition: str = "iid",
                 alpha: float = 0.5, hidden: Sequence[int] = (32,), lr: float = 0.1, batch_size: int = 32,
                 mods: Sequence[Mod] = (), eval_on: str = "test", test_fraction: float = 0.2) -> JobParts:
    """Digits split across `num_clients` clients (IID or Dirichlet(alpha) label skew) with an MLP and SGD.

    `central_eval` scores the global model on a held-out 20% of digits (`eval_on="test"`) or on the union of the
    clients' training rows (`eval_on="train"`: the global training loss FedAvg and SCAFFOLD minimise).
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from tessera.core.datasets import digits
    from tessera.core.models import MLP
    from tessera.core.types import set_params
    from tessera.horizontal.partition import partition as split
    from tessera.horizontal.task import SupervisedTask

    x, y = digits()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    cut = int(len(y) * test_fraction)
    test_rows, train_rows = perm[:cut], perm[cut:]
    parts = split(y[train_rows], num_clients, scheme=partition, rng=rng, alpha=alpha)
    width = len(str(num_clients - 1))
    data = {f"c{i:0{width}d}": train_rows[p] for i, p in enumerate(parts)}
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def data_fn(cid: str) -> tuple[DataLoader[Any], None]:
        rows = torch.from_numpy(data[cid])
        return DataLoader(TensorDataset(xt[rows], yt[rows]), batch_size=batch_size, shuffle=True), None

    def model_fn() -> nn.Module:
        return MLP(64, 10, hidden)

    task = SupervisedTask(model_fn=model_fn, loss_fn=nn.CrossEntropyLoss(),
                          optimizer_fn=lambda p: torch.optim.SGD(p, lr=lr), data_fn=data_fn)
    rows = torch.from_numpy(test_rows if eval_on == "test" else train_rows)
    loader = DataLoader(TensorDataset(xt[rows], yt[rows]), batch_size=1024)
    model = model_fn()

    def central_eval(params: Any) -> Any:
        set_params(model, params)
        return task.evaluate(model, loader)

    return JobParts(task=task, strategy=strategy, clients=list(data), mods=list(mods), central_eval=central_eval)


def byzantine_run(strategy: Strategy, *, rounds: int, byzantine: int = 3, scale: float = 10.0, seed: int = 0,
                  **kwargs: Any) -> History:
    """Digits, 10 IID clients of which the first `byzantine` send sign-flipped updates scaled by `scale`."""
    from tessera.horizontal.attacks import AttackKind, UpdateAttack
    from tessera.horizontal.simulation import simulate

    probe = digits_parts(strategy, seed=seed, **kwargs)
    attack = UpdateAttack(AttackKind.SIGN_FLIP, clients=frozenset(probe.clients[:byzantine]), scale=scale)
    probe.mods = [attack] if byzantine else []
    # fraction_evaluate=0: the clients hold no test split; the central test set scores the global model
    history, _ = simulate(probe, rounds=rounds, seed=seed)
    return history


def accuracy_curve(history: History) -> list[float]:
    return [float(a) for a in history["central_metrics.accuracy"]]


def demo_robust(out: Path, quick: bool = False) -> None:
    """10 digits clients, 3 of them sign-flip x10; FedAvg vs Median vs Krum vs TrimmedMean, plus clean FedAvg."""
    from rich.console import Console
    from rich.table import Table

    from tessera.horizontal.strategies import FedAvg, FedMedian, Krum, TrimmedMean

    console = Console()
    rounds = 6 if quick else 20
    out.mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = {"fraction_evaluate": 0.0, "local_config": {"local_epochs": 2}}
    runs: dict[str, Callable[[], Strategy]] = {
        "fedavg (no attack)": lambda: FedAvg(**kw),
        "fedavg": lambda: FedAvg(**kw),
        "median": lambda: FedMedian(**kw),
        "krum (f=3)": lambda: Krum(f=3, **kw),
        "trimmedmean (beta=0.3)": lambda: TrimmedMean(beta=0.3, **kw),
    }
    curves: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for name, make in runs.items():
        t0 = time.perf_counter()
        history = byzantine_run(make(), rounds=rounds, byzantine=0 if "no attack" in name else 3, batch_size=16,
                                lr=0.2)
        seconds[name] = time.perf_counter() - t0
        curves[name] = accuracy_curve(history)
        console.print(f"{name}: final accuracy {curves[name][-1]:.3f}")
    table = Table(title=f"digits, 10 clients, 3 Byzantine (sign flip x10), {rounds} rounds")
    for col in ("aggregator", "final acc", "best acc", "vs clean fedavg", "seconds"):
        table.add_column(col, justify="right")
    clean = curves["fedavg (no attack)"][-1]
    for name, curve in curves.items():
        table.add_row(name, f"{curve[-1]:.3f}", f"{max(curve):.3f}", f"{curve[-1] - clean:+.3f}",
                      f"{seconds[name]:.1f}")
    console.print(table)
    summary = {name: {"accuracy_per_round": c, "final_accuracy": c[-1], "seconds": seconds[name]}
               for name, c in curves.items()}
    (out / "summary.json").write_text(json.dumps({"rounds": rounds, "byzantine": 3, "attack": "sign_flip x10",
                                                  "runs": summary}, indent=2))
    png = plot_curves(curves, out / "robust_accuracy.png", ylabel="accuracy (held-out digits)", ylim=(0, 1),
                      title="digits: 3 of 10 clients sign-flip x10 (central test accuracy)",
                      dashed=lambda name: "no attack" in name)
    console.print(f"wrote {out / 'summary.json'} and {png}")
    console.print("Krum keeps one client's update per round; median and trimmed mean drop the outliers per "
                  "coordinate. FedAvg follows the sign-flipped x10 updates and collapses to a constant prediction.")

