"""PrivacyLedger: one Opacus accountant history per private party, composed across every round, with a budget.

The ledger stores only what an Opacus accountant stores, its `history` of (noise_multiplier, sample_rate, steps)
entries, as plain lists of numbers: it survives checkpoints through `core.serde` (never pickle), and epsilon is
computed by handing that history to a fresh Opacus accountant, so tessera's epsilon *is* Opacus' epsilon.

>>> ledger = PrivacyLedger(accountant="rdp", delta=1e-5, budget=3.0)
>>> ledger.step("alice", noise_multiplier=1.1, sample_rate=0.01, steps=100)
>>> round(ledger.epsilon("alice"), 3) < 3.0
True
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import numpy as np
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from tessera.core.errors import ConfigError, PrivacyBudgetExceeded
from tessera.core.logging import get_logger

log = get_logger(__name__)
Entry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), Opacus' history format


class Accountant(StrEnum):
    RDP = "rdp"
    PRV = "prv"
    GDP = "gdp"


BUDGET_EXHAUSTED = "privacy budget exhausted"


def make_accountant(kind: Accountant, history: Sequence[Entry]) -> IAccountant:
    """A fresh Opacus accountant holding `history`."""
    acc: IAccountant
    if kind is Accountant.GDP:
        # Opacus warns on every construction that GDP is experimental; that warning is the reason the user
        # chose or not, so it is raised once per ledger (see PrivacyLedger.__init__), not per epsilon query.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="GDP accounting is experimental", category=UserWarning)
            acc = GaussianAccountant()
        if len({(s, q) for s, q, _ in history}) > 1:
            raise ConfigError("dp.accountant='gdp' needs one noise multiplier and sample rate for the whole run "
                              "(a client's dataset size changed); use accountant='rdp' or 'prv'")
        merged = [(history[0][0], history[0][1], sum(n for _, _, n in history))] if history else []
        acc.history = merged
        return acc
    acc = RDPAccountant() if kind is Accountant.RDP else PRVAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one subsampled Gaussian step at Opacus' default orders (the slow part: ~0.3 s, so cached)."""
    rdp = np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                              orders=RDPAccountant.DEFAULT_ALPHAS))
    rdp.setflags(write=False)
    return rdp


def compute_epsilon(kind: Accountant, history: Sequence[Entry], delta: float) -> float:
    """Epsilon of `history` at `delta`, as the Opacus accountant of that kind reports it (0 for no steps).

    RDP is computed as `RDPAccountant.get_privacy_spent` does, term for term (compute_rdp is `rdp * steps`, summed
    over the history), with the per-step RDP of each (sigma, q) cached: the same float operations, so the same
    epsilon, but a ledger queried every round for every client costs microseconds instead of seconds."""
    if not history:
        return 0.0
    return _epsilon(kind, tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta))


@functools.lru_cache(maxsize=65536)
def _epsilon(kind: Accountant, history: tuple[Entry, ...], delta: float) -> float:
    """Memoised: a client's budget check and the server's record of the same history cost one computation."""
    if kind is Accountant.RDP:
        rdp = sum([_rdp_per_step(float(s), float(q)) * int(n) for s, q, n in history])
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    return float(make_accountant(kind, history).get_epsilon(delta=delta))


class PrivacyLedger:
    """Per-party accountant histories composing across rounds, with an optional (epsilon, delta) budget."""

    def __init__(self, accountant: str | Accountant = "rdp", *, delta: float = 1e-5,
                 budget: float | None = None) -> None:
        try:
            self.accountant = Accountant(accountant)
        except ValueError:
            raise ConfigError(f"dp.accountant: unknown accountant {accountant!r}; use 'rdp', 'prv' or 'gdp'") from None
        if not 0 < delta < 1:
            raise ConfigError(f"dp.delta: must be in (0, 1), got {delta}; 1/(number of examples) or less is usual")
        if budget is not None and not budget > 0:
            raise ConfigError(f"dp.budget: must be a positive epsilon, got {budget}")
        if self.accountant is Accountant.GDP:
            warnings.warn("GDP accounting is experimental and can underestimate privacy expenditure; "
                          "prefer accountant='rdp' or 'prv' for guarantees", UserWarning, stacklevel=2)
        self.delta = float(delta)
        self.budget = None if budget is None else float(budget)
        self.history: dict[str, list[Entry]] = {}

    # ----------------------------------------------------------------------------------------------- accounting
    def step(self, party: str, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Record `steps` DP steps of `party` at (noise_multiplier, sample_rate); merges with an equal last entry."""
        _check_entry(noise_multiplier, sample_rate, steps)
        if steps == 0:
            return
        self.history[party] = _appended(self.history.get(party, []), (noise_multiplier, sample_rate, steps))

    def epsilon(self, party: str) -> float:
        """Epsilon spent so far by `party` at this ledger's delta (0.0 for a party with no steps)."""
        return compute_epsilon(self.accountant, self.history.get(party, []), self.delta)

    def epsilons(self) -> dict[str, float]:
        return {p: self.epsilon(p) for p in sorted(self.history)}

    def epsilon_after(self, party: str, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon `party` would have spent after `steps` more steps (nothing is recorded)."""
        _check_entry(noise_multiplier, sample_rate, steps)
        hist = self.history.get(party, [])
        if steps:  # merged exactly as `step` will merge it, so the promised epsilon is the recorded one
            hist = _appended(hist, (noise_multiplier, sample_rate, steps))
        return compute_epsilon(self.accountant, hist, self.delta)

    def check(self, party: str, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Raise PrivacyBudgetExceeded if the planned steps would push `party` above the budget; else return
        the epsilon they would lead to. Call it before running the steps, then `step` after."""
        eps = self.epsilon_after(party, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        if self.budget is not None and eps > self.budget:
            raise PrivacyBudgetExceeded(
                f"{BUDGET_EXHAUSTED}: {steps} more steps at noise_multiplier={noise_multiplier:.4g}, "
                f"sample_rate={sample_rate:.4g} would reach epsilon {eps:.4f} > budget {self.budget:g} "
                f"(delta={self.delta:g}, spent {self.epsilon(party):.4f}); nothing was run. Raise dp.budget, "
                "raise the noise multiplier or plan fewer rounds"
            )
        return eps

    # ---------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and lists only, so core.serde can store it in a checkpoint."""
        return {"accountant": self.accountant.value, "delta": self.delta, "budget": self.budget,
                "history": {p: [[s, q, n] for s, q, n in h] for p, h in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("accountant") != self.accountant.value or not math.isclose(float(state["delta"]), self.delta):
            raise ConfigError(
                f"checkpointed privacy ledger used accountant={state.get('accountant')!r}, delta={state.get('delta')}"
                f" but this run uses {self.accountant.value!r}, {self.delta}; resume with the same dp settings"
            )
        history: dict[str, list[Entry]] = {}
        for party, entries in dict(state["history"]).items():
            rows = [(float(s), float(q), int(n)) for s, q, n in entries]
            for s, q, n in rows:
                _check_entry(s, q, n)
            history[str(party)] = rows
        self.history = history

    def __repr__(self) -> str:
        return f"PrivacyLedger({self.accountant.value}, delta={self.delta:g}, budget={self.budget}, " \
               f"parties={len(self.history)})"


def _appended(history: list[Entry], entry: tuple[float, float, int]) -> list[Entry]:
    """A new history with `entry` added; merged into the last entry when (sigma, q) are equal, as Opacus does."""
    s, q, n = float(entry[0]), float(entry[1]), int(entry[2])
    if history and history[-1][0] == s and history[-1][1] == q:
        return [*history[:-1], (s, q, history[-1][2] + n)]
    return [*history, (s, q, n)]


def _check_entry(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ConfigError(f"noise_multiplier must be a positive number, got {noise_multiplier}; "
                          "a zero noise multiplier gives no differential privacy")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if int(steps) != steps or steps < 0:
        raise ConfigError(f"steps must be a non-negative integer, got {steps}")
