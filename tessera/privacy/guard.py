"""The coordinator's own enforcement of DP-SGD budgets: it never relies on a client's ledger.

A client's ledger can be lost (a restarted process without `--state-dir`) or lie (a client that resets it). The
coordinator mirrors every client's reported accounting in its own ledger (DPRecorder) and, with a budget set:

- before a round, predicts each sampled client's epsilon after the round from its *last reported* (noise
  multiplier, sample rate, steps): a round plans the same local work as the one before (same data, same epochs).
  A client whose predicted epsilon would exceed the budget is not asked (`NOT_ASKED`) and stays excluded;
- when a reply arrives, refuses it (`BUDGET_EXHAUSTED`, the update is not aggregated and not recorded) if its own
  report would push the mirrored epsilon above the budget: a client that trained more than it did before, or with
  less noise, or that has no history with the coordinator yet and overspent in its first round.

So every epsilon recorded stays within the budget whatever a client's ledger says. What the coordinator cannot
check is the noise in an update itself: it trusts each round's report (see docs/security.md, Differential privacy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tessera.core.errors import ConfigError, ProtocolError
from tessera.privacy.ledger import BUDGET_EXHAUSTED, PrivacyLedger
from tessera.privacy.report import PrivacyReport
from tessera.runtime.backend import Backend, ClientFailure, FailureKind, OnReply, exchange_each
from tessera.runtime.messages import FitRes


class BudgetGuard:
    """The mirrored ledger's budget checks, plus each client's last report (the basis of its next round's plan)."""

    def __init__(self, ledger: PrivacyLedger) -> None:
        self.ledger = ledger
        self.last: dict[str, PrivacyReport] = {}

    def predicted(self, cid: str) -> float | None:
        """The epsilon `cid` would reach after a round like its last one; None when it has never reported."""
        last = self.last.get(cid)
        if last is None or last.noise_multiplier == 0:
            return None
        return self.ledger.epsilon_after(cid, noise_multiplier=last.noise_multiplier, sample_rate=last.sample_rate,
                                         steps=last.steps)

    def over(self, cid: str) -> float | None:
        """The predicted epsilon of `cid` if the next round would exceed the budget, else None."""
        eps = self.predicted(cid)
        budget = self.ledger.budget
        return eps if budget is not None and eps is not None and eps > budget else None

    def refusal(self, cid: str, report: PrivacyReport) -> str | None:
        """Why the reply carrying `report` must be refused (it would exceed the budget), or None."""
        budget = self.ledger.budget
        if budget is None:
            return None
        if report.noise_multiplier == 0:
            return f"{BUDGET_EXHAUSTED}: {cid} trained without noise (epsilon = inf) under a budget of {budget:g}"
        eps = self.ledger.epsilon_after(cid, noise_multiplier=report.noise_multiplier,
                                        sample_rate=report.sample_rate, steps=report.steps)
        if eps > budget:
            return (f"{BUDGET_EXHAUSTED}: the coordinator refused {cid}'s update: its {report.steps} steps would "
                    f"bring the recorded epsilon to {eps:.4f} > budget {budget:g} (the client's own ledger was lost "
                    "or disagrees; give the client party a --state-dir)")
        return None

    def noted(self, cid: str, report: PrivacyReport) -> None:
        self.last[cid] = report

    def state_dict(self) -> dict[str, Any]:
        return {c: [r.noise_multiplier, r.sample_rate, r.steps] for c, r in sorted(self.last.items())}

    def load_state_dict(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise ConfigError("the checkpoint's dp.last is not a map of client -> [noise, rate, steps]; resume "
                              "from a checkpoint written by this version or start a fresh output_dir")
        last: dict[str, PrivacyReport] = {}
        for cid, row in state.items():
            ok = isinstance(row, list) and len(row) == 3 and all(isinstance(x, (int, float)) for x in row)
            if not ok or not (math.isfinite(row[0]) and row[0] >= 0 and 0 < row[1] <= 1 and row[2] >= 0):
                raise ConfigError(f"the checkpoint's dp.last[{cid!r}] is not [noise >= 0, rate in (0, 1], steps]; "
                                  "resume from an untouched checkpoint or start a fresh output_dir")
            last[str(cid)] = PrivacyReport(float(row[0]), float(row[1]), int(row[2]))
        self.last = last


class GuardedBackend:
    """A Backend proxy for one round: notes which clients refused to train because their budget is spent, and
    turns a reply whose report would exceed the budget (or is malformed) into that client's failure."""

    def __init__(self, backend: Backend, guard: BudgetGuard) -> None:
        self.backend, self.guard = backend, guard
        self.traffic = backend.traffic
        self.exhausted: set[str] = set()

    def start(self, clients: list[str]) -> None:
        self.backend.start(clients)

    def _screen(self, cid: str, reply: Any) -> Any:
        if isinstance(reply, ClientFailure):
            if reply.kind is FailureKind.BUDGET_EXHAUSTED:
                self.exhausted.add(cid)
            return reply
        if not isinstance(reply, FitRes):
            return reply  # secure aggregation stages: their reports are checked when the round's results exist
        try:
            report = PrivacyReport.read(reply.metrics, who=cid)
        except ProtocolError as exc:
            return ClientFailure(cid, str(exc), FailureKind.REJECTED)
        why = self.guard.refusal(cid, report) if report is not None else None
        if why is not None:
            self.exhausted.add(cid)
            return ClientFailure(cid, why, FailureKind.BUDGET_EXHAUSTED)
        return reply

    def exchange(self, requests: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        replies = self.backend.exchange(requests, timeout=timeout)
        return {c: self._screen(c, r) for c, r in replies.items()}

    def exchange_each(self, requests: Mapping[str, Any], on_reply: OnReply, *,
                      timeout: float | None = None) -> dict[str, Any]:
        def screened(cid: str, reply: Any) -> Any:
            out = self._screen(cid, reply)
            return out if isinstance(out, ClientFailure) else on_reply(cid, out)

        return exchange_each(self.backend, requests, screened, timeout=timeout)

    def close(self) -> None:
        self.backend.close()
