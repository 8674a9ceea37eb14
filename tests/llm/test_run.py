"""Whole federated LoRA runs: held-out perplexity drops on every client, the MiniLM classifier learns, and ten
simulated clients cost far less than ten base models of memory."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tessera.llm import Arch, LoRAConfig, ModelSpec, base_params, load_base
from tessera.llm.lora import lora_template
from tessera.llm.rss import measure
from tessera.llm.run import full_model_round_bytes, run_lora
from tessera.llm.task import LoRATask
from tests.llm.helpers import LLAMA, LORA, MINILM, QWEN, clients, llama_task, snapshot


def _base_perplexity(task: LoRATask, client: str) -> float:
    """Oracle: the plain transformers base model (no peft), token-weighted NLL on the client's held-out text."""
    base, _ = load_base(task.spec)
    _, test = task.data_fn(client)
    assert test is not None
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, target in test:
            logits = base(input_ids=ids, attention_mask=(ids != task.tokenizer.pad_token_id).long()).logits
            labels = target[:, 1:].reshape(-1)
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels, ignore_index=-100,
                                           reduction="sum"))
            count += int((labels != -100).sum())
    return math.exp(total / count)


@pytest.mark.parametrize("spec", [LLAMA, QWEN], ids=["llama", "qwen2"])
def test_federated_lora_lowers_held_out_perplexity_on_every_client(spec: object) -> None:
    task = llama_task(4, spec=spec)
    run = run_lora(task, clients(4), rounds=3)
    for c in clients(4):
        # before = the base model itself (B starts at zero), checked against plain transformers
        assert run.before[c]["perplexity"] == pytest.approx(_base_perplexity(task, c), rel=1e-5)
        assert run.after[c]["perplexity"] < 0.5 * run.before[c]["perplexity"], c
    losses = [r["train_loss"] for r in run.history.records]
    assert losses[-1] < losses[0]
    # bytes: measured adapter traffic vs the same messages carrying the full model
    rec = run.history.records[0]
    assert run.full_model_bytes_per_round()[0] == full_model_round_bytes(
        rec, adapter_bytes=run.adapter_bytes, full_bytes=run.full_bytes)
    assert run.summary()["bytes_ratio"] > 5


def test_minilm_sequence_classification_trains_adapters_and_head_only() -> None:
    task = LoRATask(MINILM, LORA, clients=clients(2), train_size=24, test_size=12, batch_size=12, lr=5e-3)
    template = lora_template(MINILM, LORA)
    before_base = snapshot(base_params(template))
    run = run_lora(task, clients(2), rounds=2)
    names = list(run.params_after)
    lora = [k for k in names if "lora_A" in k or "lora_B" in k]
    head = [k for k in names if k not in lora]
    # the new classification head is trained and travels (it has no pretrained value); nothing else does
    assert sorted(head) == ["base_model.model.classifier.modules_to_save.default.bias",
                            "base_model.model.classifier.modules_to_save.default.weight"]
    assert len(lora) == 6 * 2 * 2  # 6 layers x (query, value) x (A, B)
    for k, t in before_base.items():
        assert torch.equal(base_params(template)[k], t), k
    mean_before = sum(run.before[c]["loss"] for c in clients(2)) / 2
    mean_after = sum(run.after[c]["loss"] for c in clients(2)) / 2
    assert mean_after < mean_before
    assert all(0.0 <= run.after[c]["accuracy"] <= 1.0 for c in clients(2))
    assert sum(run.after[c]["accuracy"] for c in clients(2)) > sum(run.before[c]["accuracy"] for c in clients(2))


@pytest.mark.slow
def test_peak_rss_of_ten_clients_is_below_twice_that_of_one() -> None:
    """Each measurement runs in a fresh process (peak RSS is a high-water mark). MiniLM's base is ~90 MB, so
    ten private copies would add ~800 MB; sharing keeps the ten-client run near the one-client run."""
    one, ten = measure(clients=[1, 10], arch="minilm", parallel=True)
    assert one["base_loads"] == ten["base_loads"] == 1
    assert ten["peak_rss_mb"] < 2 * one["peak_rss_mb"]
    assert ten["peak_rss_mb"] - one["peak_rss_mb"] < 9 * ten["full_model_tensor_bytes"] / 2**20 / 2


def test_a_local_checkpoint_directory_trains_like_the_built_model(tmp_path: Path) -> None:
    """arch='local' (how a user points at a DeepSeek/Qwen/Llama checkpoint): save a tiny decoder and its
    tokenizer with transformers' own save_pretrained, then fine-tune from that directory."""
    directory = tmp_path / "tiny-qwen2"
    base, tok = load_base(QWEN)
    base.save_pretrained(directory)
    tok.save_pretrained(directory)
    spec = ModelSpec(arch=Arch.LOCAL, path=str(directory), max_length=40)
    task = llama_task(2, spec=spec, lora=LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "lm_head")))
    local, _ = load_base(spec)
    for (k, a), (k2, b) in zip(base.state_dict().items(), local.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)  # the same weights, read back from disk
    run = run_lora(task, clients(2), rounds=2)
    for c in clients(2):
        assert run.after[c]["perplexity"] < run.before[c]["perplexity"]
