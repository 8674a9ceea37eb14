"""`tessera demo dp`: DP-SGD across rounds on IoT intrusion detection, with a privacy budget that ends the run.

The data is SYNTHETIC network traffic (generated here, no download): 12 flow features, 4 classes (normal, port
scan, DoS flood, brute force), 5 IoT devices with their own traffic mix. Every round each device sees a new
window of traffic of a different size, so each client's Poisson sampling rate changes between rounds.
`intrusion_parts` builds that federation. `plot_dp` also draws `tessera dp-plot`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

DEVICES = ("camera", "thermostat", "doorbell", "hub", "plug")
CLASSES = ("normal", "port scan", "DoS flood", "brute force")
FEATURES = 12


class TrafficWindow:
    """A torch Dataset over one device's current traffic window; `advance(rnd)` replaces it with round rnd's."""

    def __init__(self, device: int, *, seed: int, base_rows: int, centres: np.ndarray, mix: np.ndarray) -> None:
        self.device, self.seed, self.base_rows = device, seed, base_rows
        self.centres, self.mix = centres, mix
        self.rnd = -1
        self.advance(0)

    def advance(self, rnd: int) -> None:
        if rnd == self.rnd:
            return
        rng = np.random.default_rng([self.seed, self.device, rnd])
        n = int(self.base_rows * rng.uniform(0.5, 1.5))  # new traffic: a different amount every round
        self.x, self.y = sample_traffic(rng, n, self.centres, self.mix, shift=0.3 * self.device)
        self.rnd = rnd

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        import torch

        return torch.from_numpy(self.x[i]), torch.tensor(self.y[i])


def sample_traffic(rng: np.random.Generator, n: int, centres: np.ndarray, mix: np.ndarray, *,
                   shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """n synthetic flows: class by `mix`, features = class centre + device shift + heavy-ish noise."""
    y = rng.choice(len(CLASSES), size=n, p=mix)
    x = centres[y] + shift + rng.normal(0.0, 1.0, size=(n, FEATURES)) * 1.3
    return x.astype(np.float32), y.astype(np.int64)


def intrusion_parts(*, seed: int = 0, base_rows: int = 320, batch_size: int = 32, lr: float = 0.1,
                    test_rows: int = 2000) -> Any:
    """JobParts for the synthetic IoT federation (5 clients, windows that change each round, central test set)."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from tessera.core.models import MLP
    from tessera.core.types import set_params
    from tessera.horizontal.client import CallNext, ClientContext
    from tessera.horizontal.simulation import JobParts
    from tessera.horizontal.strategies import FedAvg
    from tessera.horizontal.task import SupervisedTask
    from tessera.runtime.messages import FitIns

    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, size=(len(CLASSES), FEATURES))
    mixes = rng.dirichlet([2.0] * len(CLASSES), size=len(DEVICES)) * 0.6 + 0.1  # every attack seen everywhere
    windows = {name: TrafficWindow(i, seed=seed, base_rows=base_rows, centres=centres, mix=mixes[i])
               for i, name in enumerate(DEVICES)}

    def new_traffic(msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
        if isinstance(msg, FitIns):
            windows[ctx.client].advance(msg.round)
        return call_next(msg, ctx)

    def data_fn(cid: str) -> tuple[DataLoader[Any], None]:
        return DataLoader(windows[cid], batch_size=batch_size, shuffle=True), None  # type: ignore[arg-type]

    task = SupervisedTask(model_fn=lambda: MLP(FEATURES, len(CLASSES), [32]), loss_fn=nn.CrossEntropyLoss(),
                          optimizer_fn=lambda p: torch.optim.SGD(p, lr=lr), data_fn=data_fn)
    xt, yt = sample_traffic(np.random.default_rng([seed, 99]), test_rows, centres, mixes.mean(0), shift=0.6)
    test = DataLoader(TensorDataset(torch.from_numpy(xt), torch.from_numpy(yt)), batch_size=1024)
    model = task.model_fn()

    def central_eval(params: Any) -> Any:
        set_params(model, params)
        return task.evaluate(model, test)

    parts = JobParts(task=task, strategy=FedAvg(fraction_evaluate=0.0), clients=list(DEVICES),
                     mods=[new_traffic], central_eval=central_eval)
    parts.windows = windows  # type: ignore[attr-defined]  # for tests: the per-device traffic windows
    return parts


def _acc(record: dict[str, Any]) -> float:
    """Central test accuracy if the run had one, else the clients' federated evaluation."""
    for key in ("central_metrics", "eval_metrics"):
        if "accuracy" in record.get(key, {}):
            return float(record[key]["accuracy"])
    return float("nan")


def demo_dp(out: Path, quick: bool = False) -> None:
    """Non-private FedAvg vs DP-SGD (budget eps=3) on synthetic IoT traffic: table, dp.png, summary.json."""
    from rich.console import Console
    from rich.table import Table

    from tessera.horizontal.server import Server
    from tessera.horizontal.simulation import simulate
    from tessera.privacy import DPSGD

    console = Console()
    # quick: smaller traffic windows (a higher sampling rate) so the budget still ends the run early
    rounds, base_rows, sigma, budget = (3, 96, 1.5, 3.0) if quick else (12, 320, 1.5, 3.0)
    test_rows = 400 if quick else 2000
    t0 = time.perf_counter()
    console.print(f"[bold]SYNTHETIC[/bold] IoT intrusion traffic: {len(DEVICES)} devices, new traffic window of a "
                  f"different size every round; {rounds} rounds planned, DP-SGD sigma={sigma}, budget eps={budget}")
    plain, _ = simulate(intrusion_parts(base_rows=base_rows, test_rows=test_rows), rounds=rounds, seed=0,
                        output_dir=out / "non_private")
    servers: list[Server] = []
    dp = DPSGD(noise_multiplier=sigma, max_grad_norm=1.0, delta=1e-5, budget=budget)
    private, _ = simulate(intrusion_parts(base_rows=base_rows, test_rows=test_rows), rounds=rounds, seed=0,
                          output_dir=out / "dp_sgd", plugins=[dp], on_server=servers.append)
    stopped = servers[0].stopped

    table = Table(title=f"accuracy and cumulative epsilon per round (delta=1e-5, budget {budget})")
    for col in ("round", "non-private acc", "DP-SGD acc", "epsilon (min-max over devices)", "DP clients"):
        table.add_column(col, justify="right")
    for i in range(rounds):
        row = [str(i + 1), f"{_acc(plain.records[i]):.3f}"]
        if i < len(private):
            r = private.records[i]
            eps = list(r["epsilon"].values())
            row += [f"{_acc(r):.3f}", f"{min(eps):.2f}-{max(eps):.2f}", str(r["clients_succeeded"])]
        elif i == len(private):
            row += ["[red]budget stop[/red]", "next round would exceed", "0"]
        else:
            row += ["-", "-", "-"]
        table.add_row(*row)
    console.print(table)
    if stopped:
        console.print(f"[yellow]DP-SGD run stopped after round {len(private)}:[/yellow] {stopped[:160]}...")
    summary = {
        "data": "synthetic IoT network-intrusion traffic (generated, not real)",
        "rounds_planned": rounds, "noise_multiplier": sigma, "budget_epsilon": budget, "delta": 1e-5,
        "non_private": {"rounds": len(plain), "final_accuracy": _acc(plain.last)},
        "dp_sgd": {"rounds": len(private), "final_accuracy": _acc(private.last), "stopped": stopped,
                   "final_epsilon": private.last.get("epsilon", {})},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    png = plot_dp(plain, private, out / "dp.png", budget=budget, rounds=rounds,
                  title="DP-SGD across rounds on SYNTHETIC IoT intrusion traffic (5 devices, changing data)")
    console.print(f"done in {time.perf_counter() - t0:.0f} s; plot: {png}; summary: {out / 'summary.json'}")


def plot_dp(plain: Any, private: Any, path: Path, *, budget: float | None, rounds: int,
            title: str = "differential privacy across rounds") -> Path:
    """Two panels: accuracy vs round (both runs) and each device's cumulative epsilon vs round with the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    if len(plain):
        ax1.plot(range(1, len(plain) + 1), [_acc(r) for r in plain], "--", marker="o", markersize=3, color="C7",
                 label="non-private")
    ax1.plot(range(1, len(private) + 1), [_acc(r) for r in private], "-", marker="o", markersize=3, color="C0",
             label="with DP")
    ax1.set_ylabel("accuracy")
    ax1.set_title("accuracy per round")
    # parties with equal budgets often spend identically: distinct line styles and markers, drawn wider first, keep
    # every overlapping line visible (each narrower line sits on top of the previous, wider one)
    names = list(private.last.get("epsilon", {}))
    for i, name in enumerate(names):
        ax2.plot(range(1, len(private) + 1), [r["epsilon"].get(name, 0.0) for r in private],
                 linestyle=("-", "--", ":", "-.")[i % 4], marker="osD^v<>"[i % 7],
                 markersize=min(11.0, 4 + 1.5 * (len(names) - 1 - i)), linewidth=min(6.0, 1 + (len(names) - 1 - i)),
                 alpha=0.85, fillstyle="none" if i % 2 else "full", label=name)
    top = max((max(r["epsilon"].values(), default=0.0) for r in private), default=1.0)
    if budget is not None:
        ax2.axhline(budget, color="red", linestyle=":", label=f"budget eps={budget:g}")
        top = max(top, budget)
    ax2.set_ylim(0, top * 1.15)
    ax2.set_ylabel("cumulative epsilon (delta=1e-5)")
    ax2.set_title("privacy spent per party")
    if len(private) < rounds:
        for ax in (ax1, ax2):
            ax.axvline(len(private) + 0.5, color="red", alpha=0.5, linestyle="--")
        ax2.annotate("stopped", (len(private) + 0.55, top * 0.5), color="red", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xlabel("round")
        ax.set_xlim(0.5, rounds + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

