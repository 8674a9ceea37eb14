"""LoRA under secure aggregation and client-level DP: the adapters are what gets masked / clipped / noised, and
the aggregate is the hand-computed mean of what the clients trained."""

import math

import pytest
import torch

import tessera.privacy
import tessera.secagg
from tessera.horizontal.simulation import JobParts, simulate
from tessera.horizontal.strategies import FedAvg
from tests.llm.helpers import Recorder, clients, llama_task


def _run(plugin: object, n: int = 4) -> tuple[Recorder, dict[str, torch.Tensor], list[dict[str, object]]]:
    task = llama_task(n, train_size=8, test_size=4)
    rec = Recorder()
    parts = JobParts(task=task, strategy=FedAvg(fraction_evaluate=0.0), clients=clients(n), mods=[rec])
    history, final = simulate(parts, rounds=1, plugins=[plugin])  # type: ignore[list-item]
    return rec, final, history.records


def test_lora_under_secagg_plus_aggregates_to_the_weighted_mean_of_the_adapters() -> None:
    rec, final, records = _run(tessera.secagg.plugin({"kind": "secagg+", "bits": 48, "clip": 1.0}))
    assert len(rec.sent) == 4  # the recorder sits inside the masking mod: it sees each client's plain adapter
    assert all("lora_" in k for _, r in rec.sent for k in r.params)
    total = sum(r.num_examples for _, r in rec.sent)
    for k, v in final.items():
        hand = sum(r.params[k].double() * r.num_examples for _, r in rec.sent) / total
        # 48-bit fixed point over [-1, 1]: a step of ~1e-14, so only float32 storage of the result is left
        torch.testing.assert_close(v.double(), hand, rtol=0, atol=1e-6)
    assert records[0]["clients_succeeded"] == 4


def test_lora_with_client_level_dp_clips_and_noises_the_adapter_update() -> None:
    # z = 0 and a clip no update reaches: client-level DP is then the uniform mean of the client adapters
    rec, exact, _ = _run(tessera.privacy.plugin({"mode": "client", "clip": 1e6, "noise_multiplier": 0.0}))
    for k, v in exact.items():
        hand = sum(r.params[k].double() for _, r in rec.sent) / len(rec.sent)
        torch.testing.assert_close(v.double(), hand, rtol=0, atol=1e-7)
    # with noise the run spends a finite, positive epsilon and the aggregate moves away from the mean
    _, noisy, records = _run(tessera.privacy.plugin({"mode": "client", "clip": 0.5, "noise_multiplier": 1.0,
                                                     "seed": 3}))
    eps = records[0]["epsilon"]
    value = next(iter(eps.values())) if isinstance(eps, dict) else eps
    assert 0 < float(value) < math.inf
    assert any(not torch.allclose(noisy[k], exact[k]) for k in exact)
    assert set(noisy) == set(exact)


@pytest.mark.parametrize("kind", ["distributed"])
def test_distributed_client_dp_composes_with_secagg_on_adapters(kind: str) -> None:
    task = llama_task(4, train_size=8, test_size=4)
    parts = JobParts(task=task, strategy=FedAvg(fraction_evaluate=0.0), clients=clients(4))
    dp = tessera.privacy.plugin({"mode": "client", "clip": 0.5, "noise_multiplier": 0.5, "kind": kind, "seed": 1})
    history, final = simulate(parts, rounds=1, plugins=[dp, tessera.secagg.plugin("secagg+")])
    assert history.records[0]["clients_succeeded"] == 4
    assert all(torch.isfinite(t).all() for t in final.values())
