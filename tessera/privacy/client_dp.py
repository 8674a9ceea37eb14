"""Client-level DP of updates (DP-FedAvg, McMahan et al. 2018): each client's whole update is the unit of privacy.

Per round, with n clients aggregated, clip bound C and noise multiplier z:
- central: the server clips each delta to L2 <= C, sums, adds N(0, (zC)^2) per coordinate (OS entropy unless seeded),
  divides by n and hands the mean to the inner strategy's server update (`apply`). Trusts the server.
- distributed: each client clips its own delta and adds N(0, (zC)^2 / n); the server (or secure aggregation,
  whose masking mod is outermost, so it masks the already-noised update) averages. The sum of the n shares has
  the central noise, and no single party sees an un-noised update under SecAgg. Clients report
  num_examples = 1 so any mean-based aggregation computes the plain (uniform) mean the noise is scaled for.
Accounting: one subsampled Gaussian step per round at q = sampled clients / all clients (sampling without
replacement is accounted as Poisson, as is usual for DP-FedAvg), composed by the ledger under party
`CLIENT_PARTY`. Weights are uniform, not example-weighted: that is what bounds one client's influence by C / n.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import AliasChoices, Field, model_validator

from tessera.core.config import PluginConfig
from tessera.core.errors import ConfigError
from tessera.core.logging import get_logger
from tessera.core.types import Params, Scalar
from tessera.horizontal.client import CallNext, ClientContext
from tessera.horizontal.job import Contribution, Extension, JobParts, Plugin
from tessera.horizontal.strategies.base import (
    FitAccumulator,
    FitResults,
    MeanStrategy,
    RunningMean,
    Strategy,
    StrategyWrapper,
)
from tessera.horizontal.strategies.clipping import clip_update
from tessera.privacy.ledger import PrivacyLedger
from tessera.runtime.messages import FitIns, FitRes

log = get_logger(__name__)
CLIENT_PARTY = "client-level"


def gaussian_like(params: Params, std: float, gen: torch.Generator) -> Params:
    """N(0, std^2) noise (float64) for every floating tensor of `params`; zeros for the others."""
    return {k: torch.randn(v.shape, dtype=torch.float64, generator=gen) * std if v.is_floating_point()
            else torch.zeros(v.shape, dtype=torch.float64) for k, v in params.items()}


def clipped_delta(params: Params, current: Params, *, clip: float) -> Params:
    """(params - current) clipped to L2 <= clip, in float64."""
    p = clip_update(params, current, max_norm=clip)
    return {k: p[k].double() - c.double() for k, c in current.items()}


class ClientDPStrategy(StrategyWrapper, MeanStrategy):
    """Wraps a mean-based strategy (FedAvg family) with client-level DP aggregation."""

    label = "client_dp"

    def __init__(self, inner: Strategy, *, clip: float, noise_multiplier: float, mode: str, ledger: PrivacyLedger,
                 seed: int | None = None) -> None:
        if not isinstance(inner, MeanStrategy):
            raise ConfigError(f"client-level DP needs a mean-based strategy with a server update (FedAvg, FedAvgM, "
                              f"FedAdam, ...); {inner.name} has none")
        super().__init__(inner)
        self.mean_inner: MeanStrategy = inner
        self.clip, self.z, self.mode = clip, noise_multiplier, mode
        self.ledger, self.seed = ledger, seed
        self.pending: float | None = None  # this round's client sampling rate, committed at round end
        self.total_clients = 0

    def configure_fit(self, rnd: int, params: Params, clients: Sequence[str],
                      rng: np.random.Generator) -> list[tuple[str, FitIns]]:
        plan = self.inner.configure_fit(rnd, params, clients, rng)
        q = len(plan) / max(1, len(clients))
        if self.z > 0:
            self.ledger.check(CLIENT_PARTY, noise_multiplier=self.z, sample_rate=q, steps=1)
        self.pending = q
        if self.mode == "distributed":
            extra: dict[str, Scalar] = {"dp_clip": self.clip, "dp_noise_std": self.z * self.clip / len(plan) ** 0.5}
            plan = [(c, FitIns(round=i.round, params=i.params, config={**i.config, **extra}, extras=i.extras))
                    for c, i in plan]
        return plan

    def aggregate_fit(self, rnd: int, results: FitResults, current: Params) -> Params:
        fold = self.accumulator(rnd, current)
        for cid, res in results:
            fold.fold(cid, res)
        return fold.finish()

    def accumulator(self, rnd: int, current: Params) -> FitAccumulator:
        """Each reply's (clipped) delta folded into a uniform running mean as it arrives; noise added once."""
        return _NoisyMean(self, rnd, current)

    def apply(self, rnd: int, current: Params, delta: Params) -> Params:
        """The inner server update from an already-private mean (secure aggregation of noised updates)."""
        return self.mean_inner.apply(rnd, current, delta)

    def noisy_mean(self, rnd: int, results: FitResults, current: Params) -> Params:
        fold = _NoisyMean(self, rnd, current)
        for cid, res in results:
            fold.fold(cid, res)
        return fold.mean()

    def noise(self, rnd: int, current: Params, n: int) -> Params:
        """N(0, (zC)^2) / n per floating coordinate (zeros elsewhere)."""
        # Anyone who could regenerate this noise could subtract it from the released model: OS entropy unless a
        # seed was given explicitly for a reproducible simulation.
        seed = secrets.randbits(63) if self.seed is None else \
            int(np.random.SeedSequence([self.seed, rnd]).generate_state(1)[0])
        gen = torch.Generator().manual_seed(seed)
        return {k: v.div_(n) for k, v in gaussian_like(current, self.z * self.clip, gen).items()}


class _NoisyMean(FitAccumulator):
    """Uniform mean of the clients' deltas (clipped by the server in central mode; already clipped and noised by
    the clients in distributed mode), plus the central noise / n, then the inner strategy's server update."""

    def __init__(self, dp: ClientDPStrategy, rnd: int, current: Params) -> None:
        self.dp, self.rnd, self.current = dp, rnd, current
        self.running = RunningMean()

    def fold(self, cid: str, res: FitRes) -> None:
        if self.dp.mode == "distributed":  # clients clipped and noised: the server only averages
            delta = {k: res.params[k].double() - c for k, c in self.current.items()}
        else:
            delta = clipped_delta(res.params, self.current, clip=self.dp.clip)
        self.running.add(delta, 1.0)

    def mean(self) -> Params:
        n = self.running.count
        mean = self.running.mean()
        if self.dp.mode == "distributed" or self.dp.z == 0:
            return mean
        noise = self.dp.noise(self.rnd, self.current, n)
        return {k: m.add_(noise[k]) if self.current[k].is_floating_point() else m for k, m in mean.items()}

    def finish(self) -> Params:
        return self.dp.mean_inner.apply(self.rnd, self.current, self.mean())


def distributed_noise_mod(msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
    """Client side of distributed client-level DP: clip the update to C, add this client's noise share."""
    reply = call_next(msg, ctx)
    if not (isinstance(msg, FitIns) and isinstance(reply, FitRes) and "dp_clip" in msg.config):
        return reply
    clip, std = float(msg.config["dp_clip"]), float(msg.config["dp_noise_std"])
    delta = clipped_delta(reply.params, msg.params, clip=clip)
    # The coordinator knows every round seed, so noise it could regenerate would protect nothing: use the OS.
    gen = torch.Generator().manual_seed(secrets.randbits(63))
    noise = gaussian_like(msg.params, std, gen) if std > 0 else None
    params: Params = {}
    for k, c in msg.params.items():
        if not c.is_floating_point():
            params[k] = reply.params[k]
            continue
        d = delta[k] + noise[k] if noise is not None else delta[k]
        params[k] = (c.double() + d).to(c.dtype)
    return FitRes(params=params, num_examples=1, metrics=reply.metrics, extras=reply.extras)


class ClientDPRecorder(Extension):
    """Extension: commits each round's client-level DP step to the ledger and records epsilon."""

    name = "client_dp"

    def __init__(self, strategy: ClientDPStrategy | None) -> None:
        self.strategy = strategy  # set when the plugin wraps the job's strategy (job.compose)

    def on_round_end(self, rnd: int, record: dict[str, Any]) -> None:
        s = self.strategy
        assert s is not None
        if s.pending is not None and s.z > 0:
            s.ledger.step(CLIENT_PARTY, noise_multiplier=s.z, sample_rate=s.pending, steps=1)
        s.pending = None
        record["epsilon"] = {CLIENT_PARTY: s.ledger.epsilon(CLIENT_PARTY) if s.z > 0 else float("inf")}
        record["dp_delta"] = s.ledger.delta

    def state_dict(self) -> dict[str, Any]:
        assert self.strategy is not None
        return {"ledger": self.strategy.ledger.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.strategy is not None
        self.strategy.ledger.load_state_dict(state["ledger"])


class ClientDPConfig(PluginConfig):
    """Client-level DP settings (job.toml `[dp] mode = "client"`, where `mode` here is spelled `kind`)."""

    SECTION: ClassVar[str] = "dp"

    clip: float = Field(gt=0, allow_inf_nan=False)
    noise_multiplier: float = Field(ge=0, allow_inf_nan=False)
    mode: Literal["central", "distributed"] = Field("central", validation_alias=AliasChoices("mode", "kind"))
    delta: float = Field(1e-5, gt=0, lt=1)
    budget: float | None = Field(None, gt=0)
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"
    seed: int | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ClientDPConfig:
        if self.noise_multiplier == 0 and self.budget is not None:
            raise ValueError("budget: a noise multiplier of 0 gives no privacy, so no budget can hold")
        return self


class ClientLevelDP(Plugin):
    """Plugin: client-level DP of updates, central (server noises) or distributed (clients noise, SecAgg sums).

    >>> simulate(parts, rounds=20, plugins=[ClientLevelDP(clip=0.5, noise_multiplier=1.0, mode="central")])
    """

    name = "client_dp"

    def __init__(self, config: ClientDPConfig | None = None, **settings: Any) -> None:
        """`ClientLevelDP(clip=..., noise_multiplier=..., mode=...)` or `ClientLevelDP(ClientDPConfig(...))`."""
        if config is not None and settings:
            raise ConfigError("ClientLevelDP: give a ClientDPConfig or keyword settings, not both")
        self.config = cfg = config if config is not None else ClientDPConfig(**settings)
        if cfg.noise_multiplier == 0:
            log.warning("client-level DP with noise_multiplier=0 clips updates but gives no privacy (epsilon=inf)")
        self.clip, self.z, self.mode, self.seed = cfg.clip, cfg.noise_multiplier, cfg.mode, cfg.seed
        self.ledger = PrivacyLedger(cfg.accountant, delta=cfg.delta, budget=cfg.budget)
        self.strategy: ClientDPStrategy | None = None

    def contribute(self, parts: JobParts) -> Contribution:
        self.strategy = None

        def wrap(inner: Strategy) -> Strategy:
            self.strategy = ClientDPStrategy(inner, clip=self.clip, noise_multiplier=self.z, mode=self.mode,
                                             ledger=self.ledger, seed=self.seed)
            recorder.strategy = self.strategy
            return self.strategy

        recorder = ClientDPRecorder(None)
        return Contribution(plugin=self.name, roles=frozenset({"privacy"}), wrap_strategy=wrap,
                            mods=(distributed_noise_mod,) if self.mode == "distributed" else (),
                            extensions=(recorder,), needs_single_updates=self.mode == "central")
