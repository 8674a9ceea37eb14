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


def test_lora_with_dp_sgd_trains_only_adapters_with_per_sample_clipping_and_spends_epsilon() -> None:
    """Sample-level DP-SGD (Opacus) on the adapters: the client's ledger and the server's record agree on
    epsilon, only adapters travel, and the shared base is untouched by Opacus' wrapping."""
    from tessera.llm import base_params
    from tessera.llm.lora import lora_template
    from tests.llm.helpers import LLAMA, LORA, snapshot

    base_before = snapshot(base_params(lora_template(LLAMA, LORA)))
    task = llama_task(2, train_size=16, test_size=4)
    rec = Recorder()
    dp = tessera.privacy.plugin({"mode": "dpsgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5})
    parts = JobParts(task=task, strategy=FedAvg(fraction_evaluate=0.0), clients=clients(2), mods=[rec])
    history, final = simulate(parts, rounds=2, plugins=[dp])
    assert set(final) == set(task.get_params(task.model_fn()))
    assert all("lora_" in k for _, r in rec.sent for k in r.params)
    eps = history.records[-1]["epsilon"]
    assert set(eps) == set(clients(2))
    # oracle: the accountant for 2 rounds of 2 Poisson steps each at q = 1/2, sigma = 1 (batch 8 of 16 rows)
    from tessera.privacy import PrivacyLedger

    ledger = PrivacyLedger(accountant="rdp", delta=1e-5)
    ledger.step("x", noise_multiplier=1.0, sample_rate=0.5, steps=4)
    for c in clients(2):
        assert eps[c] == pytest.approx(ledger.epsilon("x"), rel=1e-9)
    for k, t in base_params(lora_template(LLAMA, LORA)).items():
        assert torch.equal(t, base_before[k]), k
