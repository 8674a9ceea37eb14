"""Round loop: failures, quorum, metrics, checkpoint/resume."""

import json
from pathlib import Path

import pytest

from tessera.core.errors import RoundFailed
from tessera.horizontal.checkpoint import load_checkpoint
from tessera.horizontal.simulation import JobParts, simulate
from tessera.horizontal.strategies import FedAdam, FedAvg

from .helpers import make_data, make_task, params_equal


def test_client_that_raises_is_counted_failed_and_round_completes(tmp_path: Path) -> None:
    data = make_data(num_clients=4)
    parts = JobParts(task=make_task(data, fail={"c2"}), strategy=FedAvg(min_available=2, fraction_evaluate=0.0),
                     clients=list(data))
    history, _ = simulate(parts, rounds=2, output_dir=tmp_path)
    rec = history.last
    assert rec["clients_sampled"] == 4 and rec["clients_succeeded"] == 3 and rec["clients_failed"] == 1
    assert rec["failures"][0]["client"] == "c2" and "RuntimeError" in rec["failures"][0]["reason"]
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2] and lines[1]["clients_failed"] == 1
    assert lines[1]["bytes_up"] > 0 and lines[1]["bytes_down"] > lines[1]["bytes_up"] / 2


def test_too_few_successes_fail_the_round_clearly_and_keep_the_checkpoint(tmp_path: Path) -> None:
    data = make_data(num_clients=3)
    ok = JobParts(task=make_task(data), strategy=FedAvg(min_available=3), clients=list(data))
    simulate(ok, rounds=1, output_dir=tmp_path)
    before = (tmp_path / "checkpoint.tsr").read_bytes()
    bad = JobParts(task=make_task(data, fail={"c0", "c1"}), strategy=FedAvg(min_available=2), clients=list(data))
    with pytest.raises(RoundFailed, match="min_available=2"):
        simulate(bad, rounds=2, output_dir=tmp_path, resume=True)
    assert (tmp_path / "checkpoint.tsr").read_bytes() == before


@pytest.mark.parametrize("strategy_cls", [FedAvg, FedAdam])
def test_resume_after_kill_equals_uninterrupted_run_bit_for_bit(tmp_path: Path, strategy_cls: type) -> None:
    def parts() -> JobParts:
        data = make_data(num_clients=5)
        return JobParts(task=make_task(data), strategy=strategy_cls(fraction_fit=0.6), clients=list(data))

    full_hist, full = simulate(parts(), rounds=5, seed=7, output_dir=tmp_path / "full")
    simulate(parts(), rounds=2, seed=7, output_dir=tmp_path / "cut")  # "killed" after round 2
    resumed_hist, resumed = simulate(parts(), rounds=5, seed=7, output_dir=tmp_path / "cut", resume=True)
    assert params_equal(full, resumed)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full_hist.records]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in resumed_hist.records]
    ckpt = load_checkpoint(tmp_path / "cut")
    assert ckpt["round"] == 5
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["round"] for s in lines] == [1, 2, 3, 4, 5]


def test_nan_update_never_reaches_global_params() -> None:
    import torch

    from tessera.horizontal.client import ClientContext, Mod

    def poison(msg: object, ctx: ClientContext, call_next: object) -> object:
        res = call_next(msg, ctx)  # type: ignore[operator]
        if ctx.client == "c1":
            from tessera.runtime.messages import FitRes

            if isinstance(res, FitRes):
                return FitRes(params={k: v * float("nan") for k, v in res.params.items()},
                              num_examples=res.num_examples)
        return res

    data = make_data(num_clients=3)
    mods: list[Mod] = [poison]
    parts = JobParts(task=make_task(data), strategy=FedAvg(fraction_evaluate=0.0), clients=list(data), mods=mods)
    history, params = simulate(parts, rounds=2)
    assert all(bool(torch.isfinite(t).all()) for t in params.values())
    assert history.last["failures"][0]["reason"] == "rejected: update contains NaN or Inf"
