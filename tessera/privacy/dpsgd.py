"""The DPSGD plugin: every client trains with sample-level DP-SGD (DPTrainer), the run enforces the budget.

Pieces and where they run:
- `DPTask` wraps the job's Task at the clients: one `DPTrainer` per client id (cached), so each client's model is
  wrapped by Opacus once for the whole federation. The params the server sees are the plain module's.
- `DPSGDMod` (a client Mod) hands the task a typed `DPClient` (the client id and its persistent state, where the
  client's own ledger lives: `ctx.state["dp"]`, plain numbers, checkpointed with the other client state). The
  client is the authority on its budget: a round that would exceed it fails at that client with
  PrivacyBudgetExceeded, which reaches the server as `FailureKind.BUDGET_EXHAUSTED`.
- The client's accounting for the round travels as a `PrivacyReport` (privacy/report.py) in the reply.
- `DPRecorder` (server side) wraps the aggregation and is an Extension: it mirrors each client's reported
  (noise, rate, steps) in a ledger that rides in the checkpoint, writes `record["epsilon"]`, and enforces the
  budget on its own books (privacy/guard.py): a client whose next round would exceed it is not asked, a reply
  that would exceed it is refused, whatever the client's ledger says (it may have been lost in a restart); the
  run stops cleanly (PrivacyBudgetExceeded) when too few clients remain.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from tessera.core.errors import ConfigError, PrivacyBudgetExceeded, ProtocolError, RoundFailed
from tessera.core.logging import get_logger
from tessera.core.types import Metrics, Params
from tessera.horizontal.aggregation import Aggregation, FitOutcome
from tessera.horizontal.client import CallNext, ClientContext
from tessera.horizontal.job import Contribution, Extension, JobParts, Plugin
from tessera.horizontal.strategies.base import Strategy
from tessera.horizontal.task import Loaders, Placed, SelectsParams, Task
from tessera.privacy.guard import BudgetGuard, GuardedBackend
from tessera.privacy.ledger import BUDGET_EXHAUSTED, PrivacyLedger
from tessera.privacy.opacus import DP_PRECISION, DPConfig, DPTrainer
from tessera.privacy.report import PrivacyReport, strip_report
from tessera.runtime.backend import Backend, ClientFailure, FailureKind
from tessera.runtime.messages import FitIns, FitRes

log = get_logger(__name__)
DP_KEY = "dp"  # ClientContext.train_config key of the DPClient (in-process only, never on the wire)
_TRAINER_KEYS = ("dp_noise_multiplier", "dp_sample_rate", "dp_steps", "epsilon")  # DPTrainer.train's accounting


@dataclass
class DPClient:
    """What DPSGDMod hands DPTask for one fit: who trains, and that client's persistent DP state."""

    client: str
    state: dict[str, Any]
    report: PrivacyReport | None = None  # filled by DPTask.train


class DPTask:
    """A Task whose `train` runs DP-SGD through a per-client DPTrainer; everything else is the inner task's.

    The inner task must say how to train: `loss_fn` and `optimizer_fn` attributes (SupervisedTask has both).
    """

    def __init__(self, inner: Task, config: DPConfig, *, max_cached_clients: int = 256) -> None:
        loss_fn, optimizer_fn = getattr(inner, "loss_fn", None), getattr(inner, "optimizer_fn", None)
        if loss_fn is None or optimizer_fn is None:
            raise ConfigError("DPSGD needs a task with `loss_fn` and `optimizer_fn` (use SupervisedTask, or add "
                              f"both attributes to {type(inner).__name__})")
        if isinstance(inner, Placed) and inner.placement.precision != "32":
            raise ConfigError(f"precision={inner.placement.precision!r}: {DP_PRECISION}")
        self.inner, self.config = inner, config
        self.loss_fn, self.optimizer_fn = loss_fn, optimizer_fn
        self.trainers: OrderedDict[str, DPTrainer] = OrderedDict()
        self.max_cached_clients = max_cached_clients
        self._lock = threading.Lock()  # clients may train in parallel threads (InProcessBackend max_workers > 1)

    def __getstate__(self) -> dict[str, Any]:
        # Sent to Ray actors with the client app: without the lock, and without trainers (each actor wraps its own)
        state = dict(self.__dict__)
        state["trainers"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def model_fn(self) -> nn.Module:
        return self.inner.model_fn()

    def data_fn(self, client_id: str, round: int) -> Loaders:
        return self.inner.data_fn(client_id, round)

    def evaluate(self, model: nn.Module, loader: DataLoader[Any]) -> tuple[float, Metrics]:
        return self.inner.evaluate(model, loader)

    def trainer(self, client: str) -> DPTrainer:
        """This client's DPTrainer: built (and its model wrapped) on first use only."""
        with self._lock:
            if client in self.trainers:
                self.trainers.move_to_end(client)
                return self.trainers[client]
            trainer = DPTrainer(self.inner.model_fn(), self.optimizer_fn, config=self.config, party=client)
            self.trainers[client] = trainer
            while len(self.trainers) > self.max_cached_clients:
                self.trainers.popitem(last=False)
            return trainer

    def train(self, model: nn.Module, loader: DataLoader[Any], config: Mapping[str, Any]) -> Metrics:
        run = config.get(DP_KEY)
        if not isinstance(run, DPClient):
            raise ProtocolError("DPTask runs only behind DPSGDMod; add the DPSGD plugin instead of the task alone")
        client, state = run.client, run.state
        unsupported = [k for k in ("proximal_mu", "grad_correction") if config.get(k)]
        if unsupported:
            raise ConfigError(f"DPSGD trains with Opacus' DP optimizer, which does not apply {unsupported}; use "
                              "FedAvg, FedAvgM or a server optimiser (FedAdam, ...) with DP-SGD")
        trainer = self.trainer(client)
        # The client's persistent state is the truth (it rides in checkpoints), not the cached trainer.
        trainer.ledger = self.config.new_ledger()
        if "ledger" in state:
            trainer.ledger.load_state_dict(state["ledger"])
        trainer.noise_multiplier = float(state["noise_multiplier"]) if "noise_multiplier" in state \
            else self.config.noise_multiplier  # a target epsilon's noise is fixed at the client's first round
        trainer.load_params(model.state_dict())
        try:
            metrics = trainer.train(loader, loss_fn=self.loss_fn, epochs=int(config.get("local_epochs", 1)),
                                    max_steps=int(config.get("max_steps", 0)) or None, seed=_seed(config))
        finally:  # steps that ran before a failure were released: they stay on the books
            state["ledger"] = trainer.ledger.state_dict()
            if trainer.noise_multiplier is not None:
                state["noise_multiplier"] = trainer.noise_multiplier
        with torch.no_grad():
            model.load_state_dict(trainer.module.state_dict())
        run.report = PrivacyReport(noise_multiplier=float(metrics["dp_noise_multiplier"]),
                                   sample_rate=float(metrics["dp_sample_rate"]), steps=int(metrics["dp_steps"]))
        return {k: v for k, v in metrics.items() if k not in _TRAINER_KEYS}


class _SelectingDPTask(DPTask):
    """A DPTask over a task that chooses which tensors travel keeps that choice."""

    inner: Any

    def get_params(self, model: nn.Module) -> Params:
        return self.inner.get_params(model)  # type: ignore[no-any-return]

    def set_params(self, model: nn.Module, params: Params) -> None:
        self.inner.set_params(model, params)


def dp_task(inner: Task, config: DPConfig) -> DPTask:
    """The DP-SGD task over `inner` (keeping its choice of which tensors travel, if it makes one)."""
    return _SelectingDPTask(inner, config) if isinstance(inner, SelectsParams) else DPTask(inner, config)


def _seed(config: Mapping[str, Any]) -> int | None:
    seed = config.get("seed")
    return int(seed) if seed is not None else None


class DPSGDMod:
    """Client Mod: gives DPTask the client id and the client's persistent DP state for this fit, and puts the
    round's accounting (`PrivacyReport`) into the reply.

    The state lives in `ctx.state["dp"]` (checkpointed with the other client state). The mod also keeps a
    reference per client, so a second run with the same plugin (FLModel.fit called again) continues each
    client's ledger instead of starting a fresh one; a checkpoint being resumed takes precedence.
    """

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}

    def __call__(self, msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
        if isinstance(msg, FitIns):
            state = ctx.state.get("dp")
            if not isinstance(state, dict):
                state = ctx.state["dp"] = self.states.get(ctx.client, {})
            self.states[ctx.client] = state
            run = DPClient(ctx.client, state)
            ctx.train_config[DP_KEY] = run
            reply = call_next(msg, ctx)
            if isinstance(reply, FitRes) and run.report is not None:
                return replace(reply, metrics=run.report.into(reply.metrics))
            return reply
        return call_next(msg, ctx)


class DPRecorder(Extension):
    """Aggregation wrapper + Extension: per-client epsilon in every record, and the budget enforced by the
    coordinator itself (privacy/guard.py): a client whose next round would exceed it is not asked, a reply whose
    report would exceed it is refused, so no recorded epsilon exceeds the budget whatever a client's ledger says."""

    name = "dp"

    def __init__(self, inner: Aggregation | None, ledger: PrivacyLedger) -> None:
        self._inner = inner
        self.ledger = ledger
        self.guard = BudgetGuard(ledger)
        self.exhausted: set[str] = set()
        self.unprivate: set[str] = set()  # clients that trained with noise_multiplier=0 (epsilon = inf)

    def run(self, rnd: int, plan: list[tuple[str, FitIns]], backend: Backend, strategy: Strategy,
            current: Params, *, timeout: float | None) -> FitOutcome:
        for cid, _ in plan:
            eps = None if cid in self.exhausted else self.guard.over(cid)
            if eps is not None:
                log.warning("round %d: a client's next round would reach epsilon %.4f > budget %g; not asked",
                            rnd, eps, self.ledger.budget)
                self.exhausted.add(cid)
        skipped = [c for c, _ in plan if c in self.exhausted]
        live = [(c, ins) for c, ins in plan if c not in self.exhausted]
        if len(live) < strategy.min_available:
            raise PrivacyBudgetExceeded(
                f"{BUDGET_EXHAUSTED}: round {rnd} would need {strategy.min_available} client(s) but only "
                f"{len(live)} of the {len(plan)} sampled have budget left; the run stops after round {rnd - 1} "
                "with every recorded epsilon within the budget")
        spy = GuardedBackend(backend, self.guard)
        assert self._inner is not None, "DPRecorder.wrap() sets the aggregation it records"
        try:
            outcome = self._inner.run(rnd, live, spy, strategy, current, timeout=timeout)
        except RoundFailed:
            if not spy.exhausted:
                raise
            self.exhausted |= spy.exhausted
            raise PrivacyBudgetExceeded(
                f"{BUDGET_EXHAUSTED}: in round {rnd}, {len(spy.exhausted)} client(s) refused to train or were "
                f"refused because the round would exceed their budget, leaving fewer than strategy.min_available="
                f"{strategy.min_available}; the run stops after round {rnd - 1}") from None
        self.exhausted |= spy.exhausted
        for cid, res in outcome.results:
            self._mirror(cid, res)
        # accounting is this extension's business, not training metrics to average into the record
        outcome.results = [(cid, replace(res, metrics=strip_report(res.metrics)))
                           for cid, res in outcome.results]
        outcome.failures.extend(ClientFailure(c, f"{BUDGET_EXHAUSTED} (not asked to train)", FailureKind.NOT_ASKED)
                                for c in skipped)
        return outcome

    def wrap(self, inner: Aggregation) -> DPRecorder:
        self._inner = inner
        return self

    def _mirror(self, cid: str, res: FitRes) -> None:
        report = PrivacyReport.read(res.metrics, who=cid)
        if report is None:
            log.warning("a client replied without its DP accounting; its epsilon is not mirrored")
            return
        self.guard.noted(cid, report)
        if report.noise_multiplier == 0:  # clipping only, no privacy
            self.unprivate.add(cid)
            return
        why = self.guard.refusal(cid, report)
        if why is not None:  # secure aggregation: the update is already in the sum; never hide what was spent
            log.warning("round over budget under secure aggregation: %s", why)
            self.exhausted.add(cid)
        self.ledger.step(cid, noise_multiplier=report.noise_multiplier, sample_rate=report.sample_rate,
                         steps=report.steps)

    # Extension hooks
    def on_round_end(self, rnd: int, record: dict[str, Any]) -> None:
        record["epsilon"] = {**self.ledger.epsilons(), **dict.fromkeys(sorted(self.unprivate), float("inf"))}
        record["dp_delta"] = self.ledger.delta
        if self.exhausted:
            record["dp_exhausted"] = sorted(self.exhausted)

    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger.state_dict(), "exhausted": sorted(self.exhausted),
                "last": self.guard.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fix = "resume from an untouched checkpoint or start a fresh output_dir"
        exhausted = state.get("exhausted") if isinstance(state, dict) else None
        if not (isinstance(exhausted, list) and all(isinstance(c, str) for c in exhausted)
                and isinstance(state.get("ledger"), dict)):
            raise ConfigError(f"the checkpoint's dp section needs a ledger map and an exhausted list of client ids; "
                              f"{fix}")
        try:
            self.ledger.load_state_dict(state["ledger"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"the checkpoint's dp ledger is malformed ({type(exc).__name__}: {exc}); {fix}") from None
        self.guard.load_state_dict(state.get("last", {}))  # checkpoints from before the guard have none
        self.exhausted = set(exhausted)


class DPSGD(Plugin):
    """Plugin: clients train with sample-level DP-SGD; per-client epsilon is recorded and the budget enforced.

    One DPSGD object is one privacy context: reuse it for more rounds of the same model (FLModel.fit again) and
    every client's epsilon continues; build a new one for an unrelated run.

    >>> simulate(parts, rounds=10, plugins=[DPSGD(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5,
    ...                                           budget=3.0)])
    """

    def __init__(self, config: DPConfig | None = None, **settings: Any) -> None:
        """`DPSGD(noise_multiplier=1.1, ...)` or `DPSGD(DPConfig(...))`: the settings are DPConfig's (the same
        model validates job.toml's [dp] section)."""
        if config is not None and settings:
            raise ConfigError("DPSGD: give a DPConfig or keyword settings, not both")
        self.config = config if config is not None else DPConfig(**settings)
        self.ledger = self.config.new_ledger()  # validates accountant, delta and budget now
        self.mod = DPSGDMod()
        self.recorder: DPRecorder | None = None

    name = "dpsgd"

    def contribute(self, parts: JobParts) -> Contribution:
        if isinstance(parts.task, DPTask):
            raise ConfigError("DPSGD is configured twice for this job; give it once")
        if getattr(parts.strategy, "proximal_mu", 0) or parts.strategy.client_mods():
            raise ConfigError(f"DPSGD cannot run {parts.strategy.name}: its client-side term (proximal term, "
                              "control variates) is not applied by Opacus' DP optimizer; use FedAvg, FedAvgM or a "
                              "server optimiser (FedAdam, FedYogi, FedAdagrad)")
        exhausted = self.recorder.exhausted if self.recorder is not None else set()
        self.recorder = DPRecorder(None, self.ledger)
        self.recorder.exhausted = exhausted
        config = self.config
        return Contribution(plugin=self.name, roles=frozenset({"privacy"}),
                            wrap_task=lambda task: dp_task(task, config), mods=(self.mod,),
                            wrap_aggregation=self.recorder.wrap, extensions=(self.recorder,))
