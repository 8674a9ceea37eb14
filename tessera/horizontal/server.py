"""The coordinator's round loop: sample, fit, validate, aggregate, evaluate, record, checkpoint.

Two extension points keep cross-cutting features out of this loop:
- `Aggregation` (aggregation.py) runs the fit phase of a round (send FitIns, gather replies, produce new params).
  `PlainAggregation` is the default; secure aggregation supplies one that never sees single updates.
- `Extension`s (job.py) carry state into checkpoints and add keys to each round's record (a privacy ledger,
  client state).
A `Scheduling` policy (scheduling.py) decides what each server step dispatches: `Synchronous` rounds by default,
or `Buffered` (asynchronous FedBuff on a simulated clock); either way one record and one checkpoint per step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.core.errors import ConfigError, PrivacyBudgetExceeded, ShapeMismatch
from tessera.core.logging import get_logger
from tessera.core.metrics import History, MetricsWriter
from tessera.core.tracking import RecordLogger
from tessera.core.types import Params, check_compatible, clone
from tessera.horizontal.aggregation import Aggregation, CentralEval, PlainAggregation
from tessera.horizontal.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from tessera.horizontal.job import Extension
from tessera.horizontal.scheduling import Scheduling, Synchronous
from tessera.horizontal.strategies.base import FitResults, Strategy
from tessera.runtime.backend import Backend
from tessera.runtime.messages import EvaluateRes

log = get_logger(__name__)


@dataclass
class ServerConfig:
    rounds: int
    seed: int = 0
    output_dir: str | Path | None = None
    checkpoint_every: int = 1
    fit_timeout: float | None = None
    progress: bool = False
    loggers: tuple[str | RecordLogger, ...] = ()  # also write each record to TensorBoard/MLflow
    shard_bytes: int | None = None  # params above this are checkpointed as safetensors shards of this size
    #                                 (None: checkpoint.SHARD_BYTES, 1 GiB)


class Server:
    def __init__(
        self,
        *,
        strategy: Strategy,
        backend: Backend,
        clients: Sequence[str],
        initial_params: Params,
        config: ServerConfig,
        aggregation: Aggregation | None = None,
        central_eval: CentralEval | None = None,
        extensions: Sequence[Extension] = (),
        scheduling: Scheduling | None = None,
    ) -> None:
        if not clients:
            raise ConfigError("a federation needs at least one client")
        self.strategy = strategy
        self.backend = backend
        self.clients = list(clients)
        self.params = clone(initial_params)
        self.config = config
        self.aggregation = aggregation or PlainAggregation()
        self.central_eval = central_eval
        self.extensions = list(extensions)
        self.scheduling = scheduling or Synchronous()
        self.history = History()
        self.round = 0
        self.stopped: str | None = None  # why the run ended early (a spent privacy budget), if it did
        out = Path(config.output_dir) if config.output_dir else None
        self.out = out
        self.writer = MetricsWriter(out / "metrics.jsonl", loggers=config.loggers) if out else None

    # ------------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        ext = {e.name: e.state_dict() for e in self.extensions}
        return {"format": 1, "round": self.round, "seed": self.config.seed, "params": self.params,
                "strategy": self.strategy.state_dict(), "history": self.history.records, "extensions": ext,
                "scheduling": self.scheduling.state_dict()}

    def load_state_dict(self, state: dict[str, Any], *, source: str = "checkpoint") -> None:
        """Continue from `state`; anything malformed or foreign is a ConfigError naming `source` (never a
        KeyError/TypeError from half-way through)."""
        state = checked_structure(state, source)
        if state["format"] != 1 or state["seed"] != self.config.seed:
            raise ConfigError(f"{source} was written by a different job (format or seed differs); "
                              "resume with the same job.toml or start a fresh output_dir")
        try:
            check_compatible(self.params, state["params"], who=f"{source} params")
        except ShapeMismatch as exc:
            raise ConfigError(f"{exc}; it was written for another model: resume with the same job.toml or start "
                              "a fresh output_dir") from None
        self.round = state["round"]
        self.params = state["params"]
        with _malformed(source, "strategy"):
            self.strategy.load_state_dict(state["strategy"])
        with _malformed(source, "history"):
            self.history = History(state["history"])
        with _malformed(source, "scheduling"):
            self.scheduling.load_state_dict(state.get("scheduling", {}))
        for e in self.extensions:
            if e.name in state["extensions"]:
                with _malformed(source, f"extensions.{e.name}"):
                    e.load_state_dict(state["extensions"][e.name])

    def save_checkpoint(self) -> None:
        """Write the state atomically, tensor by tensor from their own memory (the model is never copied into one
        blob first: a checkpoint costs the envelope, not another model size); params above
        `config.shard_bytes` go to safetensors shards beside checkpoint.tsr (horizontal/checkpoint.py)."""
        if self.out is not None:
            save_checkpoint(self.out, self.state_dict(), shard_bytes=self.config.shard_bytes)

    def resume(self) -> bool:
        """Load the checkpoint in output_dir if there is one; returns whether it did."""
        if self.out is None or not (self.out / CHECKPOINT).exists():
            return False
        self.load_state_dict(load_checkpoint(self.out), source=str(self.out / CHECKPOINT))
        if self.writer is not None:
            self.writer.reset(self.history.records)
        log.info("resumed from round %d", self.round)
        return True

    # ------------------------------------------------------------------------------------------------- rounds
    def rng(self, rnd: int, phase: int) -> np.random.Generator:
        """Per-round RNG derived from (seed, round, phase): resume needs no RNG state to continue identically."""
        return np.random.default_rng([self.config.seed, rnd, phase])

    def run_round(self, rnd: int) -> dict[str, Any]:
        start = time.perf_counter()
        traffic0 = (self.backend.traffic.up, self.backend.traffic.down)
        step = self.scheduling.step(self, rnd)
        outcome = step.outcome
        self.params = outcome.params
        record: dict[str, Any] = {
            "round": rnd,
            "clients_sampled": step.sampled,
            "clients_succeeded": len(outcome.results),
            "clients_failed": len(outcome.failures),
            "failures": [{"client": f.client, "kind": f.kind.value, "reason": f.reason} for f in outcome.failures],
        }
        record.update(step.record)
        record.update(_weighted_train_metrics(outcome.results))
        record.update(self._evaluate(rnd))
        record["bytes_up"] = self.backend.traffic.up - traffic0[0]
        record["bytes_down"] = self.backend.traffic.down - traffic0[1]
        record["seconds"] = round(time.perf_counter() - start, 4)
        for e in self.extensions:
            e.on_round_end(rnd, record)
        return record

    def _evaluate(self, rnd: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        plan = self.strategy.configure_evaluate(rnd, self.params, self.clients, self.rng(rnd, 1))
        if plan:
            replies = self.backend.exchange(dict(plan))
            ok = [(c, r) for c, r in replies.items() if isinstance(r, EvaluateRes)]
            if ok:
                loss, metrics = self.strategy.aggregate_evaluate(rnd, ok)
                out.update(eval_loss=loss, eval_metrics=metrics, eval_clients=len(ok))
        if self.central_eval is not None:
            loss, metrics = self.central_eval(self.params)
            out.update(central_loss=loss, central_metrics=metrics)
        return out

    def run(self, *, resume: bool = False) -> History:
        if resume:
            self.resume()
        self.backend.start(self.clients)
        try:
            with _progress(self.config.progress, self.config.rounds, self.round) as advance:
                while self.round < self.config.rounds:
                    rnd = self.round + 1
                    try:
                        record = self.run_round(rnd)
                    except PrivacyBudgetExceeded as exc:
                        # A spent privacy budget ends the run, it does not fail it: the rounds so far stand.
                        log.warning("run stopped before round %d: %s", rnd, exc)
                        self.stopped = str(exc)
                        self.save_checkpoint()
                        break
                    self.round = rnd
                    self.history.append(record)
                    if self.writer is not None:
                        self.writer.write(record)
                    if rnd % self.config.checkpoint_every == 0 or rnd == self.config.rounds:
                        self.save_checkpoint()
                    advance(record)
        finally:
            self.backend.close()
            if self.writer is not None:
                self.writer.close()
        return self.history


_FIX = "move it away and start a fresh output_dir, or resume from an untouched copy"
_TOP: dict[str, type] = {"format": int, "round": int, "seed": int, "params": dict, "strategy": dict,
                         "history": list, "extensions": dict}


def checked_structure(state: Any, source: str) -> dict[str, Any]:
    """`state` if it has a checkpoint's shape (keys, types, a name -> tensor params map), else ConfigError."""
    if not isinstance(state, dict):
        raise ConfigError(f"{source} is not a checkpoint (it holds a {type(state).__name__}, not a map); {_FIX}")
    missing = [k for k in _TOP if k not in state]
    if missing:
        raise ConfigError(f"{source} is not a complete checkpoint (missing {missing}); {_FIX}")
    wrong = [f"{k} is a {type(state[k]).__name__}, not a {t.__name__}" for k, t in _TOP.items()
             if not isinstance(state[k], t) or isinstance(state[k], bool)]
    if "scheduling" in state and not isinstance(state["scheduling"], dict):
        wrong.append(f"scheduling is a {type(state['scheduling']).__name__}, not a dict")
    if not wrong and not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["params"].items()):
        wrong.append("params is not a map of names to tensors")
    if not wrong and not all(isinstance(r, dict) for r in state["history"]):
        wrong.append("history is not a list of round records")
    if not wrong and state["round"] < 0:
        wrong.append(f"round is {state['round']}")
    if wrong:
        raise ConfigError(f"{source} has the wrong structure ({'; '.join(wrong)}); {_FIX}")
    return state


@contextlib.contextmanager
def _malformed(source: str, part: str) -> Iterator[None]:
    """A component's loader meeting a malformed section raises ConfigError naming the file and the section."""
    try:
        yield
    except ConfigError as exc:  # the component's own check: say which file it was about
        if source in str(exc):
            raise
        raise ConfigError(f"{source}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ConfigError(f"{source}: the {part} section is malformed ({type(exc).__name__}: {exc}); {_FIX}") from None


def _weighted_train_metrics(results: FitResults) -> dict[str, Any]:
    total = sum(r.num_examples for _, r in results)
    if not results or total == 0:
        return {}
    keys = set.intersection(*(set(r.metrics) for _, r in results))
    mean = {k: sum(r.metrics[k] * r.num_examples for _, r in results) / total for k in sorted(keys)}
    out: dict[str, Any] = {"train_metrics": {k: v for k, v in mean.items() if k != "loss"}}
    if "loss" in mean:
        out["train_loss"] = mean["loss"]
    return out


class _progress:
    """A rich progress bar over rounds (a no-op when disabled), showing the latest loss and accuracy."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self) -> Callable[[dict[str, Any]], None]:
        if not self.enabled:
            return lambda record: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]round"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.description}"), transient=False)
        self.bar.__enter__()
        self.task = self.bar.add_task("", total=self.total, completed=self.done)

        def advance(record: dict[str, Any]) -> None:
            acc = record.get("eval_metrics", {}).get("accuracy")
            desc = f"loss {record.get('train_loss', float('nan')):.4f}" + (f"  acc {acc:.3f}" if acc else "")
            self.bar.update(self.task, advance=1, description=desc)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(None, None, None)
