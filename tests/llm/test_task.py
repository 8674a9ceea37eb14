"""LoRATask against oracles: only adapters travel, the base never changes, FedAvg is a hand-computed mean,
one client equals plain LoRA training, one base per process."""

import pytest
import torch

from tessera.core.errors import ConfigError, ShapeMismatch
from tessera.horizontal.simulation import JobParts, simulate
from tessera.horizontal.strategies import FedAvg
from tessera.llm import LOADS, ClientText, LoRAConfig, LoRATask, ModelSpec, base_params, load_adapter, load_base
from tessera.llm.lora import lora_template
from tests.llm.helpers import LLAMA, LORA, Recorder, clients, llama_task, snapshot


def test_only_adapter_tensors_leave_a_client_and_the_base_is_bit_identical_everywhere() -> None:
    task = llama_task(3)
    template = lora_template(LLAMA, LORA)
    base_before = snapshot(base_params(template))
    rec = Recorder()
    models: list[torch.nn.Module] = []
    parts = JobParts(task=task, strategy=FedAvg(), clients=clients(3), mods=[rec])
    orig_model_fn = task.model_fn

    def tracking_model_fn() -> torch.nn.Module:
        m = orig_model_fn()
        models.append(m)
        return m

    task.model_fn = tracking_model_fn  # type: ignore[method-assign]
    history, final = simulate(parts, rounds=2)

    trainable = {n for n, p in template.named_parameters() if p.requires_grad}
    assert len(rec.sent) == 6
    for _, res in rec.sent:
        assert set(res.params) == trainable
        assert all("lora_A" in k or "lora_B" in k for k in res.params)
    assert set(final) == trainable
    adapter_bytes = sum(t.numel() * t.element_size() for t in final.values())
    # what crossed the wire up is the 3 clients' adapters plus small headers, nothing of the base's size
    assert 3 * adapter_bytes <= history.records[0]["bytes_up"] < 3 * adapter_bytes + 3 * 16_384
    assert models  # the server's and the clients' models
    for m in [template, *models]:
        now = base_params(m)
        assert set(now) == set(base_before)
        for k, t in base_before.items():
            assert torch.equal(now[k], t), k


def test_fedavg_of_adapters_equals_the_hand_computed_weighted_mean() -> None:
    sizes = {"a": 8, "b": 16, "c": 24}

    def text_fn(cid: str) -> ClientText:
        words = {"a": "north rain", "b": "bank stock", "c": "mars probe"}[cid]
        train = [f"{words} {i}." for i in range(sizes[cid])]
        return ClientText(train=train, train_labels=[0] * len(train), test=train[:2], test_labels=[0, 0])

    task = LoRATask(LLAMA, LORA, text_fn=text_fn, batch_size=8, lr=2e-2)
    rec = Recorder()
    _, final = simulate(JobParts(task=task, strategy=FedAvg(fraction_evaluate=0.0), clients=list(sizes),
                                 mods=[rec]), rounds=1)
    assert [r.num_examples for _, r in rec.sent] == [8, 16, 24]
    total = sum(sizes.values())
    for k in final:
        hand = sum(r.params[k].double() * sizes[c] for c, r in rec.sent) / total
        torch.testing.assert_close(final[k].double(), hand, rtol=0, atol=1e-7)
    # the clients really did train different adapters (the mean is not trivially any one of them)
    assert not torch.equal(rec.sent[0][1].params[k], rec.sent[2][1].params[k])


def test_one_client_equals_plain_single_client_lora_training() -> None:
    """Oracle: a plain peft training loop (HF's own loss, SGD) over the same batches for the same epochs."""
    task = llama_task(1, optimizer="sgd", lr=0.05, shuffle=False)
    _, fed = simulate(JobParts(task=task, strategy=FedAvg(fraction_evaluate=0.0), clients=["c0"]), rounds=3)

    oracle = task.model_fn()
    opt = torch.optim.SGD([p for p in oracle.parameters() if p.requires_grad], lr=0.05)
    train, _ = task.data_fn("c0")
    oracle.train()
    for _ in range(3):
        for ids, labels in train:
            opt.zero_grad()
            mask = (ids != task.tokenizer.pad_token_id).long()
            oracle(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
    want = task.get_params(oracle)
    assert list(fed) == list(want)
    for k in want:
        torch.testing.assert_close(fed[k], want[k], rtol=1e-5, atol=1e-6)


def test_the_base_is_loaded_once_per_process_and_shared_by_every_model() -> None:
    task = llama_task(10, train_size=4, test_size=2)
    base, _ = load_base(LLAMA)
    loads = LOADS[LLAMA]
    _, _ = simulate(JobParts(task=task, strategy=FedAvg(), clients=clients(10)), rounds=1)
    assert LOADS[LLAMA] == loads == 1  # 10 clients, the server, a fresh model: one build of the base
    a, b = task.model_fn(), task.model_fn()
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    for m in (a, b):
        assert {p.data_ptr() for p in base_params(m).values()} <= base_ptrs | {
            p.data_ptr() for p in base_params(lora_template(LLAMA, LORA)).values()}
    shared = [k for k in base_params(a) if base_params(a)[k] is base_params(b)[k]]
    assert len(shared) == len(base_params(a))  # same tensor objects, not equal copies
    adapters_a = {n: p for n, p in a.named_parameters() if p.requires_grad}
    adapters_b = {n: p for n, p in b.named_parameters() if p.requires_grad}
    assert all(adapters_a[k].data_ptr() != adapters_b[k].data_ptr() for k in adapters_a)


def test_refuses_foreign_adapters_and_bad_configs() -> None:
    task = llama_task(1)
    model = task.model_fn()
    params = task.get_params(model)
    k = next(iter(params))
    with pytest.raises(ShapeMismatch, match="missing"):
        load_adapter(model, {n: t for n, t in params.items() if n != k})
    with pytest.raises(ShapeMismatch, match="same LoRAConfig"):
        load_adapter(model, {**params, k: torch.zeros(1, 1)})
    with pytest.raises(ConfigError, match="path"):
        ModelSpec(arch="local")
    with pytest.raises(ConfigError, match=r"lora\.r"):
        LoRAConfig(r=0)
    with pytest.raises(ConfigError, match="target_modules"):
        lora_template(LLAMA, LoRAConfig(target_modules=("no_such_layer",)))
    with pytest.raises(ConfigError, match="not one of"):
        task.data_fn("stranger")


def test_tokenisation_masks_padding_out_of_the_loss() -> None:
    task = llama_task(1)
    ds = task.tokenize(["hi.", "a longer sentence."], [0, 0])
    ids, target = ds.tensors
    mask = task.attention_mask(ids)
    assert ids.shape == (2, LLAMA.max_length)
    assert torch.equal(target == -100, mask == 0)
    assert task.tokenizer.decode(ids[0][mask[0] == 1]) == "hi."
