"""DPTrainer: sample-level DP-SGD with Opacus, done once per client for the whole federation.

What goes wrong when Opacus' `make_private` is called in every round, and what this does instead:
- the model is wrapped in `GradSampleModule` exactly once; global params are loaded into the *underlying* module
  by value, so no hooks stack up and no `_module.` prefix reaches the params that leave the client;
- the DP optimizer lives across rounds (its inner state, e.g. momentum, is reset at each round start, as a
  non-private client building a fresh optimizer per round would); accounting lives in a `PrivacyLedger` that
  composes every round's steps, so epsilon never restarts;
- the Poisson sampling rate is recomputed from the loader each round, so a client whose dataset grows or shrinks
  is accounted at its true rate (and the optimizer's expected batch size follows);
- a target epsilon becomes a noise multiplier for the planned rounds (Opacus' `get_noise_multiplier`).

>>> trainer = DPTrainer(model, lambda p: torch.optim.SGD(p, lr=0.1),
...                     config=DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5, budget=3.0))
>>> for rnd in range(5):
...     trainer.load_params(global_params)
...     metrics = trainer.train(loader, loss_fn=nn.CrossEntropyLoss())
...     update = trainer.params()
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal

import torch
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.validators import ModuleValidator
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import DataLoader

from tessera.core.config import PluginConfig
from tessera.core.device import DeviceSpec, Placement, device_of
from tessera.core.errors import ConfigError
from tessera.core.logging import get_logger
from tessera.core.types import Metrics, Params, get_params, set_params
from tessera.privacy.ledger import PrivacyLedger

log = get_logger(__name__)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFn = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


DP_PRECISION = (
    "DP-SGD trains in full precision only: under autocast Opacus computes each example's gradient, and so the "
    "norm that clipping bounds, in bf16/fp16, so the sensitivity the privacy guarantee rests on would be off by "
    "the rounding error; use precision='32' with DP-SGD")


class DPConfig(PluginConfig):
    """Sample-level DP-SGD settings. Give `noise_multiplier`, or `target_epsilon` with `planned_rounds`.

    `budget` (an epsilon) is enforced by the ledger; it defaults to `target_epsilon` when that is given.
    `clipping="per_layer"` splits `max_grad_norm` evenly in squared norm over the trainable tensors, so the
    whole gradient still has norm <= max_grad_norm. Noise and Poisson sampling draw from OS entropy unless
    `reproducible=True`, which seeds them from the round seed: bit-identical reruns and resumes, but whoever knows
    the job seed (the coordinator) could regenerate the noise, so use it for simulations only.
    `noise_multiplier=0` trains with clipping only and no privacy (epsilon is reported as inf; no budget allowed).
    """

    SECTION: ClassVar[str] = "dp"

    noise_multiplier: float | None = Field(None, ge=0, allow_inf_nan=False)
    max_grad_norm: float = Field(1.0, gt=0)
    target_epsilon: float | None = Field(None, gt=0)
    planned_rounds: int | None = Field(None, ge=1)
    delta: float = Field(1e-5, gt=0, lt=1)
    budget: float | None = Field(None, gt=0)
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"
    clipping: Literal["flat", "per_layer"] = "flat"
    reproducible: bool = False
    device: str | None = None  # where DP-SGD trains ("auto", "cpu", "cuda", "cuda:N", "mps"); None: the task's
    precision: str = "32"  # only "32": see DP_PRECISION

    @model_validator(mode="after")
    def _consistent(self) -> DPConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        if self.precision != "32":
            raise ValueError(f"precision={self.precision!r}: {DP_PRECISION}")
        if self.noise_multiplier == 0 and self.budget is not None:
            raise ValueError("budget: noise_multiplier=0 gives no privacy, so no budget can hold; set a positive "
                             "noise_multiplier or drop the budget")
        if self.target_epsilon is not None and self.planned_rounds is None:
            raise ValueError("planned_rounds: a target_epsilon needs the number of rounds it must last (e.g. "
                             "planned_rounds = job.rounds)")
        return self

    @property
    def effective_budget(self) -> float | None:
        return self.budget if self.budget is not None else self.target_epsilon

    def new_ledger(self) -> PrivacyLedger:
        return PrivacyLedger(self.accountant, delta=self.delta, budget=self.effective_budget)


class DPTrainer:
    """One client's model under DP-SGD across every round it trains in (see the module docstring)."""

    def __init__(self, model: nn.Module, optimizer_fn: OptimizerFn, *, config: DPConfig,
                 ledger: PrivacyLedger | None = None, party: str = "local", device: DeviceSpec = None,
                 precision: str = "32") -> None:
        if precision != "32":
            raise ConfigError(f"precision={precision!r}: {DP_PRECISION}")
        # placed once, before the one wrap; None (and no config.device) trains where the model already is
        model = Placement.of(device if device is not None else config.device).place(model)
        self.device = device_of(model)
        problems = ModuleValidator.validate(model, strict=False)
        if problems:
            raise ConfigError(f"model cannot be trained with DP-SGD: {problems[0]}; replace the layer "
                              "(e.g. opacus.validators.ModuleValidator.fix(model) swaps BatchNorm for GroupNorm)")
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("model has no trainable parameters; DP-SGD has nothing to train")
        self.config = config
        self.party = party
        self.module = model
        self.wrapped = GradSampleModule(model, loss_reduction="mean")  # the one and only wrap
        self.wrapped.forbid_grad_accumulation()  # Poisson sampling: one forward/backward per step
        self.optimizer: DPOptimizer = get_optimizer_class(config.clipping, False, "hooks")(
            optimizer_fn(trainable), noise_multiplier=config.noise_multiplier or 0.0,
            max_grad_norm=_clip_norms(config, len(trainable)), expected_batch_size=1, loss_reduction="mean")
        self.ledger = ledger if ledger is not None else config.new_ledger()
        self.noise_multiplier: float | None = config.noise_multiplier
        self.sample_rate: float | None = None
        self.dataset_size: int | None = None
        self.rounds = 0

    # ------------------------------------------------------------------------------------------------- params
    def load_params(self, params: Mapping[str, torch.Tensor]) -> None:
        """Copy global params into the underlying module by value (no wrapper, no prefixes)."""
        set_params(self.module, params)

    def params(self) -> Params:
        """The underlying module's state, with the user's own keys."""
        return get_params(self.module)

    # ------------------------------------------------------------------------------------------------ training
    def prepare(self, loader: DataLoader[Any], *, epochs: int = 1, max_steps: int | None = None) -> tuple[float, int]:
        """Fix this round's sampling rate, expected batch size and noise; returns (sample_rate, planned steps).

        As Opacus' `make_private`: q = 1 / len(loader), so the mean Poisson batch is the loader's batch size,
        and an epoch is int(1 / q) steps. Both follow the loader's *current* dataset size."""
        batches = len(loader)
        if batches == 0:
            raise ConfigError(f"client {self.party} has an empty training set; DP-SGD needs at least one example")
        size = len(loader.dataset)  # type: ignore[arg-type]
        q = 1.0 / batches
        if self.sample_rate is not None and q != self.sample_rate:
            # The IoT case: new traffic every round. Accounting and averaging follow the new rate.
            log.info("dataset size changed (%s -> %d examples): sample rate %.5g -> %.5g",
                     self.dataset_size, size, self.sample_rate, q)
        self.sample_rate, self.dataset_size = q, size
        self.optimizer.expected_batch_size = int(size * q)
        steps = epochs * int(1 / q)
        if max_steps is not None:
            steps = min(steps, max_steps)
        if self.noise_multiplier is None:
            self.noise_multiplier = self._noise_for_target(q, steps)
        self.optimizer.noise_multiplier = self.noise_multiplier
        return q, steps

    def _noise_for_target(self, q: float, steps: int) -> float:
        cfg = self.config
        assert cfg.target_epsilon is not None and cfg.planned_rounds is not None  # guaranteed by DPConfig
        sigma = noise_for_target(target_epsilon=cfg.target_epsilon, delta=cfg.delta, sample_rate=q,
                                 steps=steps * cfg.planned_rounds, accountant=cfg.accountant)
        log.info("noise multiplier %.4f reaches epsilon <= %.3g after %d rounds of %d steps at q=%.4g", sigma,
                 cfg.target_epsilon, cfg.planned_rounds, steps, q)
        return sigma

    def train(self, loader: DataLoader[Any], *, loss_fn: LossFn, epochs: int = 1, max_steps: int | None = None,
              seed: int | None = None) -> Metrics:
        """One round of DP-SGD on `loader` (Poisson-sampled). Checks the budget first: if the planned steps
        would exceed it, raises PrivacyBudgetExceeded and trains nothing."""
        q, planned = self.prepare(loader, epochs=epochs, max_steps=max_steps)
        sigma = float(self.optimizer.noise_multiplier)
        planned_eps = math.inf
        if sigma > 0:
            planned_eps = self.ledger.check(self.party, noise_multiplier=sigma, sample_rate=q, steps=planned)
        sample_gen, noise_gen = round_generators(None if not self.config.reproducible else seed,
                                                 noise_device=self.device)
        self.optimizer.generator = noise_gen
        self.optimizer.original_optimizer.state.clear()  # a fresh optimizer per round, without re-wrapping
        dp_loader = DPDataLoader.from_data_loader(loader, generator=sample_gen)
        self.wrapped.train()
        steps, count = 0, 0
        losses: list[torch.Tensor] = []  # read once at the end of the round: no host sync per step on a device
        sizes: list[int] = []
        try:
            for _ in range(epochs):
                for batch in dp_loader:
                    xb, yb = _to(batch, self.device)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(self.wrapped(xb), yb)
                    loss.backward()  # type: ignore[no-untyped-call]
                    self.optimizer.step()
                    steps += 1
                    if n := len(yb):  # a Poisson batch may be empty: still a (pure-noise) DP step, but no loss
                        losses.append(loss.detach())
                        sizes.append(n)
                        count += n
                    if steps >= planned:
                        break
                if steps >= planned:
                    break
        finally:
            # Every step that ran released noisy gradients: account for them even if training failed midway.
            if sigma > 0:
                self.ledger.step(self.party, noise_multiplier=sigma, sample_rate=q, steps=steps)
            self.optimizer.zero_grad(set_to_none=True)
        self.rounds += 1
        eps = planned_eps if sigma == 0 or steps == planned else self.ledger.epsilon(self.party)
        total = float(torch.stack(losses).cpu().double() @ torch.tensor(sizes, dtype=torch.float64)) if losses else 0.0
        return {"loss": total / max(count, 1), "steps": float(steps), "dp_noise_multiplier": sigma,
                "dp_sample_rate": q, "dp_steps": float(steps), "epsilon": eps}


@functools.lru_cache(maxsize=256)
def noise_for_target(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Opacus' `get_noise_multiplier` (a binary search of many accountant evaluations), memoised: clients with
    the same sampling rate share one search."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant))


def hook_count(module: nn.Module) -> int:
    """Forward + backward hooks registered on `module` and its submodules (Opacus adds one of each per layer)."""
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in module.modules())


def _clip_norms(config: DPConfig, n_tensors: int) -> float | list[float]:
    if config.clipping == "flat":
        return config.max_grad_norm
    return [config.max_grad_norm / math.sqrt(n_tensors)] * n_tensors


def round_generators(seed: int | None, *, noise_device: torch.device | None = None
                     ) -> tuple[torch.Generator, torch.Generator]:
    """(Poisson sampling, noise) generators: from `seed` if given (reproducible), else from OS entropy. The noise
    generator lives where the gradients are (Opacus draws the noise on their device)."""
    seeds = (secrets.randbits(63), secrets.randbits(63)) if seed is None else (seed, seed ^ 0x5DEECE66D)
    noise = torch.Generator() if noise_device is None or noise_device.type == "cpu" else \
        torch.Generator(device=noise_device)
    return torch.Generator().manual_seed(seeds[0]), noise.manual_seed(seeds[1])


def _to(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    xb, yb = batch
    if xb.device == device:
        return xb, yb
    return xb.to(device, non_blocking=xb.is_pinned()), yb.to(device, non_blocking=yb.is_pinned())
