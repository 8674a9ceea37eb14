"""What a DP-SGD client reports about the privacy it spent in a round, and how that report travels.

The report rides in the reply's metrics (so it passes unchanged through every aggregation, secure aggregation
included, whose replies carry metrics in the clear) under three reserved keys that only this module reads or
writes. A reply with a partial or out-of-range report is refused, naming the client.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from tessera.core.errors import ProtocolError

_KEYS = ("dp_noise_multiplier", "dp_sample_rate", "dp_steps")


@dataclass(frozen=True)
class PrivacyReport:
    """One client's DP-SGD accounting for one round: `steps` noisy steps at `noise_multiplier`, each sampling
    rows with probability `sample_rate`."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def into(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """`metrics` with this report added."""
        return {**strip_report(metrics), _KEYS[0]: self.noise_multiplier, _KEYS[1]: self.sample_rate,
                _KEYS[2]: float(self.steps)}

    @staticmethod
    def read(metrics: Mapping[str, float], *, who: str) -> PrivacyReport | None:
        """The report in a reply's metrics; None if there is none; ProtocolError for a partial or invalid one."""
        present = [k for k in _KEYS if k in metrics]
        if not present:
            return None
        if len(present) != len(_KEYS):
            raise ProtocolError(f"{who} sent a partial privacy report (has {present}); it must send all of {_KEYS}")
        z, q, steps = (float(metrics[k]) for k in _KEYS)
        if not (math.isfinite(z) and z >= 0 and 0 < q <= 1 and steps >= 0 and steps == int(steps)):
            raise ProtocolError(f"{who} sent an invalid privacy report (noise multiplier >= 0, sample rate in (0, 1] "
                                "and a whole number of steps are required)")
        return PrivacyReport(noise_multiplier=z, sample_rate=q, steps=int(steps))


def strip_report(metrics: Mapping[str, float]) -> dict[str, float]:
    """`metrics` without a privacy report (what is averaged into the round's training metrics)."""
    return {k: v for k, v in metrics.items() if k not in _KEYS}
