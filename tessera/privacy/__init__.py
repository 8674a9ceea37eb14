"""Differential privacy across rounds: one ledger with a budget, DP-SGD with Opacus, client-level DP of updates.

- `PrivacyLedger`: per-party Opacus accountant histories (RDP, PRV or GDP), checkpointable, budget-enforcing.
- `DPTrainer` / `DPConfig`: sample-level DP-SGD for one client across rounds (wrap once, load by value).
- `DPSGD`, `ClientLevelDP`: plugins for the horizontal core; `plugin(spec)` builds one from job.toml's `[dp]`.
"""

from tessera.privacy.client_dp import CLIENT_PARTY, ClientLevelDP
from tessera.privacy.dpsgd import DPSGD, DPRecorder, DPTask
from tessera.privacy.ledger import BUDGET_EXHAUSTED, Accountant, PrivacyLedger, compute_epsilon
from tessera.privacy.opacus import DPConfig, DPTrainer
from tessera.privacy.plugin import plugin

__all__ = [
    "BUDGET_EXHAUSTED", "CLIENT_PARTY", "DPSGD", "Accountant", "ClientLevelDP", "DPConfig", "DPRecorder", "DPTask",
    "DPTrainer", "PrivacyLedger", "compute_epsilon", "plugin",
]
