"""Run a federated LoRA job and report what matters: per-client held-out metrics before and after, bytes per
round (adapters, measured on the wire) against what the full model would cost, time and peak RSS.

The demo, the benchmark and the tests all go through `run_lora`, so the figures they show come from one path.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tessera.core.metrics import History
from tessera.core.types import Params, clone
from tessera.horizontal.simulation import JobParts, Plugin, initial_params, simulate
from tessera.horizontal.strategies import FedAvg, Strategy
from tessera.llm.lora import full_model_bytes
from tessera.llm.task import LoRATask, evaluate_clients


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak) / (1024 * 1024 if sys.platform == "darwin" else 1024)


def tensor_bytes(params: Params) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())


def full_model_round_bytes(record: dict[str, Any], *, adapter_bytes: int, full_bytes: int) -> int:
    """Bytes the same round would move if every params-carrying message held the full model instead of the
    adapter: the measured bytes plus (full - adapter) for each FitIns, FitRes and EvaluateIns."""
    messages = 2 * int(record.get("clients_succeeded", 0)) + int(record.get("eval_clients", 0))
    measured = int(record.get("bytes_up", 0)) + int(record.get("bytes_down", 0))
    return measured + messages * (full_bytes - adapter_bytes)


@dataclass
class LoRARun:
    """What a federated LoRA run produced; `before`/`after` map client -> {"loss", "perplexity"|"accuracy"}."""

    history: History
    params_before: Params
    params_after: Params
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    adapter_bytes: int
    full_bytes: int
    seconds_per_round: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0

    def bytes_per_round(self) -> list[int]:
        return [int(r["bytes_up"]) + int(r["bytes_down"]) for r in self.history.records]

    def full_model_bytes_per_round(self) -> list[int]:
        return [full_model_round_bytes(r, adapter_bytes=self.adapter_bytes, full_bytes=self.full_bytes)
                for r in self.history.records]

    def summary(self) -> dict[str, Any]:
        b, f = self.bytes_per_round(), self.full_model_bytes_per_round()
        return {"clients": {c: {"before": self.before[c], "after": self.after[c]} for c in self.after},
                "adapter_tensor_bytes": self.adapter_bytes, "full_model_tensor_bytes": self.full_bytes,
                "bytes_per_round": b, "full_model_bytes_per_round": f,
                "bytes_ratio": (sum(f) / sum(b)) if sum(b) else None,
                "seconds_per_round": self.seconds_per_round, "peak_rss_mb": self.peak_rss_mb}


def run_lora(task: LoRATask, clients: Sequence[str], *, rounds: int, seed: int = 0, local_epochs: int = 1,
             strategy: Strategy | None = None, plugins: Sequence[Plugin] = (), backend: str = "inprocess",
             backend_options: dict[str, Any] | None = None, evaluate: bool = True) -> LoRARun:
    """Federated LoRA over `clients` for `rounds` rounds; evaluates every client before and after."""
    strategy = strategy or FedAvg(local_config={"local_epochs": local_epochs})
    start = initial_params(task, seed)
    before = evaluate_clients(task, start, clients) if evaluate else {}
    parts = JobParts(task=task, strategy=strategy, clients=list(clients))
    t0 = time.perf_counter()
    history, final = simulate(parts, rounds=rounds, seed=seed, params=clone(start), plugins=plugins,
                              backend=backend, backend_options=backend_options)
    elapsed = time.perf_counter() - t0
    after = evaluate_clients(task, final, clients) if evaluate else {}
    seconds = [float(r.get("seconds", elapsed / max(rounds, 1))) for r in history.records]
    return LoRARun(history=history, params_before=start, params_after=final, before=before, after=after,
                   adapter_bytes=tensor_bytes(start), full_bytes=full_model_bytes(task.spec),
                   seconds_per_round=seconds, peak_rss_mb=peak_rss_mb())
