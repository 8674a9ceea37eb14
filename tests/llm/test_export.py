"""Export through tessera's bundle format: the adapter alone (kilobytes) and the merged model, each rebuilt by
load_bundle and checked against the trained peft model's own outputs."""

from pathlib import Path

import torch

from tessera.export import load_bundle, verify_bundle
from tessera.export.io import load_tensors
from tessera.llm import base_params
from tessera.llm.export import LoRAAdapter, MergedLM, example_inputs, export_adapter, export_merged
from tessera.llm.lora import lora_template
from tessera.llm.run import run_lora
from tests.llm.helpers import LLAMA, LORA, clients, llama_task, snapshot


def test_adapter_and_merged_bundles_reproduce_the_trained_model(tmp_path: Path) -> None:
    task = llama_task(2, train_size=16, test_size=4)
    run = run_lora(task, clients(2), rounds=1, evaluate=False)
    base_before = snapshot(base_params(lora_template(LLAMA, LORA)))
    texts = task.text_fn("c1").test[:3]
    x = example_inputs(task, texts)
    trained = task.model_fn()
    task.set_params(trained, run.params_after)
    trained.eval()
    with torch.no_grad():
        want = trained(**x).logits

    adapter_dir = export_adapter(task, run.params_after, tmp_path / "adapter", texts=texts)
    merged_dir = export_merged(task, run.params_after, tmp_path / "merged", texts=texts)
    assert verify_bundle(adapter_dir).ok and verify_bundle(merged_dir).ok

    stored = load_tensors(adapter_dir / "model.safetensors")
    assert {k.replace("__", ".") for k in stored} == set(run.params_after)  # the adapter, nothing of the base
    adapter = load_bundle(adapter_dir)
    assert isinstance(adapter, LoRAAdapter)
    for k, t in adapter.adapter().items():
        assert torch.equal(t, run.params_after[k])
    merged = load_bundle(merged_dir)
    assert isinstance(merged, MergedLM)
    assert "lora_" not in " ".join(merged.state_dict())  # a plain transformers model, no peft layers
    with torch.no_grad():
        torch.testing.assert_close(adapter(**x), want, rtol=0, atol=0)
        torch.testing.assert_close(merged(**x), want, rtol=1e-5, atol=1e-5)
    # merging worked on a copy: the base every virtual client shares is unchanged
    for k, t in base_params(lora_template(LLAMA, LORA)).items():
        assert torch.equal(t, base_before[k]), k
