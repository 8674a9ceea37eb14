"""examples/iot: a new subset of a new size every round, under DP-SGD with one accountant per device, through a
Task (data_fn(client, round)) and through FLModel (one fit per round). Oracle: Opacus' RDP accountant given the
per-round history the example's data implies (q = 1 / batches, steps = batches), and the two spellings agree."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "iot"))


def expected_epsilon(per_round: object, device: str, rounds: int) -> float:
    acc = RDPAccountant()
    for rnd in range(1, rounds + 1):
        size = len(per_round.readings(device, rnd)[1])  # type: ignore[attr-defined]
        batches = math.ceil(size / 16)
        acc.history.append((1.0, 1 / batches, batches))
    return float(acc.get_epsilon(delta=1e-5))


@pytest.mark.slow
def test_per_round_subsets_are_accounted_round_by_round_in_both_spellings() -> None:
    import per_round

    sizes = {len(per_round.readings("sensor0", r)[1]) for r in range(1, 4)}
    assert len(sizes) == 3  # the data really changes size from round to round
    task_records, task_params = per_round.with_task(rounds=3)
    fl_records, fl_params = per_round.with_flmodel(rounds=3)
    for records in (task_records, fl_records):
        assert [r["round"] for r in records] == [1, 2, 3]
        for device in per_round.DEVICES:
            assert records[-1]["epsilon"][device] == pytest.approx(expected_epsilon(per_round, device, 3),
                                                                   rel=1e-9)
    # Same data, seeds and reproducible noise: the Task and the FLModel spelling train the same model
    for k in task_params:
        assert torch.allclose(task_params[k], fl_params[k], atol=1e-6), k
