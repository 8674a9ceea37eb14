"""`LoRATask`: the horizontal Task for federated LoRA fine-tuning of a transformers model.

Only adapter tensors travel (`get_params`/`set_params` are the Task hooks the client and server use); the base is
frozen, built once per process and shared by every virtual client there. Each client tokenises its own text with
the shared tokenizer. Causal LM: the loss is the mean next-token NLL, the metric `perplexity = exp(loss)`.
Sequence classification: cross-entropy and `accuracy`.

Batches are `(input_ids, target)` pairs (the attention mask is `input_ids != pad`), and the task has `loss_fn`
and `optimizer_fn`, so tessera's DP-SGD plugin (Opacus, per-sample gradients of the adapters) can train it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tessera.core.device import DeviceSpec, Placement, scalar, scaled_step
from tessera.core.errors import ConfigError
from tessera.core.types import Metrics, Params
from tessera.llm.data import ClientText, client_corpus
from tessera.llm.lora import LoRAConfig, adapter_params, load_adapter, lora_template, shared_copy
from tessera.llm.models import Head, ModelSpec, load_base

TextFn = Callable[[str], ClientText]


class LoRATask:
    """Federated LoRA on `spec`'s base model. `text_fn(client_id)` returns that client's sentences (default:
    generated non-IID topics, see `tessera.llm.data`); training config keys: `local_epochs`, `max_steps`.

    `device` places the shared base (once per process) and every client's adapters; batches move per step;
    `precision` "bf16"/"fp16" trains under autocast; `gradient_checkpointing` trades compute for activation memory.

    >>> task = LoRATask(ModelSpec(arch=Arch.LLAMA), LoRAConfig(r=4), clients=["a", "b"])  # doctest: +SKIP
    """

    def __init__(self, spec: ModelSpec, lora: LoRAConfig | None = None, *, clients: Sequence[str] = (),
                 text_fn: TextFn | None = None, train_size: int = 64, test_size: int = 32, num_topics: int = 4,
                 skew: float = 0.9, data_seed: int = 0, batch_size: int = 16, lr: float = 5e-3,
                 optimizer: str = "adamw", shuffle: bool = True, device: DeviceSpec = None,
                 precision: str = "32", gradient_checkpointing: bool = False) -> None:
        if optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        if lr <= 0 or batch_size < 1:
            raise ConfigError("lr must be positive and batch_size >= 1")
        self.spec = spec
        self.lora = lora or LoRAConfig()
        self.placement = Placement.of(device, precision)
        self.gradient_checkpointing = gradient_checkpointing
        self.batch_size, self.lr, self.optimizer, self.shuffle = batch_size, lr, optimizer, shuffle
        index = {c: i for i, c in enumerate(clients)}

        def generated(client: str) -> ClientText:
            if client not in index:
                raise ConfigError(f"client {client!r} is not one of LoRATask(clients=...)")
            return client_corpus(client, index[client], train_size=train_size, test_size=test_size,
                                 num_topics=num_topics, skew=skew, seed=data_seed)

        self.text_fn: TextFn = text_fn or generated

    # ------------------------------------------------------------------------------------------ Task protocol
    def model_fn(self) -> nn.Module:
        """A LoRA model sharing the process-wide frozen base; its adapter tensors are its own. Called as
        `model(input_ids)` (as DP-SGD does) it derives the attention mask from the pad token."""
        device = self.placement.device if self.placement.explicit else None
        model = shared_copy(lora_template(self.spec, self.lora, device=device,
                                          gradient_checkpointing=self.gradient_checkpointing))
        model.register_forward_pre_hook(functools.partial(_fill_mask, self.tokenizer.pad_token_id),
                                        with_kwargs=True)
        return model

    def get_params(self, model: nn.Module) -> Params:
        return adapter_params(model)

    def set_params(self, model: nn.Module, params: Params) -> None:
        load_adapter(model, params)

    @property
    def tokenizer(self) -> Any:
        return load_base(self.spec)[1]

    def tokenize(self, texts: Sequence[str], labels: Sequence[int]) -> TensorDataset:
        """Token ids and targets (next-token labels with padding ignored, or the class), right-padded."""
        tok = self.tokenizer
        enc = tok(list(texts), padding="max_length", truncation=True, max_length=self.spec.max_length,
                  return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if not torch.equal(mask, self.attention_mask(ids)):
            raise ConfigError("the text contains the tokenizer's pad token (often the EOS token reused as pad); "
                              "give the tokenizer a pad token of its own (tokenizer.add_special_tokens)")
        if self.spec.head is Head.CAUSAL_LM:
            target = ids.masked_fill(mask == 0, -100)
        else:
            target = torch.tensor(list(labels), dtype=torch.long)
        return TensorDataset(ids, target)

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        pad = int(self.tokenizer.pad_token_id)
        return (ids != pad).long()

    def data_fn(self, client_id: str, round: int = 0) -> tuple[DataLoader[Any], DataLoader[Any] | None]:
        """The client's tokenised text; the same every round (`text_fn(client_id)` takes no round)."""
        text = self.text_fn(client_id)
        train = self.tokenize(text.train, text.train_labels)
        test = self.tokenize(text.test, text.test_labels) if text.test else None
        pin = self.placement.pin_memory
        return (DataLoader(train, batch_size=self.batch_size, shuffle=self.shuffle, pin_memory=pin),
                DataLoader(test, batch_size=64, pin_memory=pin) if test is not None else None)

    def optimizer_fn(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """A fresh optimizer over the adapter tensors (AdamW or SGD at `lr`)."""
        params = list(params)
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)

    def train(self, model: nn.Module, loader: DataLoader[Any], config: Mapping[str, Any]) -> Metrics:
        epochs = int(config.get("local_epochs", 1))
        max_steps = int(config.get("max_steps", 0)) or None
        opt = self.optimizer_fn(p for p in model.parameters() if p.requires_grad)
        place, scaler = self.placement, self.placement.scaler()
        model.train()
        steps, count = 0, 0
        total: float | torch.Tensor = 0.0  # summed where the loss is, in float64: no host sync per step
        for _ in range(epochs):
            for batch in loader:
                ids, target = place.move(batch)
                opt.zero_grad(set_to_none=True)
                with place.autocast():
                    loss, n, _ = self.batch_loss(model, ids, target)
                with scaled_step(scaler, opt, loss):
                    pass
                total = total + loss.detach().double() * n
                count += n
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    break
            if max_steps is not None and steps >= max_steps:
                break
        value = scalar(total) if isinstance(total, torch.Tensor) else total
        return {"loss": value / max(count, 1), "steps": float(steps)}

    def loss_fn(self, out: Any, target: torch.Tensor) -> torch.Tensor:
        """Mean next-token NLL over non-padding targets (causal LM) or cross-entropy (classification)."""
        logits = (out.logits if hasattr(out, "logits") else out).float()
        if self.spec.head is Head.CAUSAL_LM:
            shift, labels = logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1)
            return F.cross_entropy(shift, labels, ignore_index=-100)
        return F.cross_entropy(logits, target)

    def batch_loss(self, model: nn.Module, ids: torch.Tensor,
                   target: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Mean loss of a batch, how many items it averages over (target tokens, or rows), and the logits."""
        logits = model(input_ids=ids, attention_mask=self.attention_mask(ids)).logits
        n = int((target[:, 1:] != -100).sum()) if self.spec.head is Head.CAUSAL_LM else len(target)
        return self.loss_fn(logits, target), n, logits

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader[Any]) -> tuple[float, Metrics]:
        model.eval()
        total, count, correct, rows = 0.0, 0, 0, 0
        for batch in loader:
            ids, target = self.placement.move(batch)
            with self.placement.autocast():
                loss, n, logits = self.batch_loss(model, ids, target)
            total += float(loss) * n
            count += n
            if self.spec.head is Head.SEQ_CLS:
                correct += int((logits.argmax(-1) == target).sum())
                rows += len(target)
        if count == 0:
            return float("nan"), {}
        mean = total / count
        if self.spec.head is Head.CAUSAL_LM:
            return mean, {"perplexity": math.exp(min(mean, 700.0))}
        return mean, {"accuracy": correct / rows}


def _fill_mask(pad_id: int, module: nn.Module, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Forward pre-hook: `model(ids)` (positional, no mask) becomes `model(input_ids=ids, attention_mask=...)`."""
    if args and "input_ids" not in kwargs and isinstance(args[0], torch.Tensor):
        kwargs = {"input_ids": args[0], **kwargs}
        args = args[1:]
    ids = kwargs.get("input_ids")
    if isinstance(ids, torch.Tensor) and kwargs.get("attention_mask") is None:
        kwargs["attention_mask"] = (ids != pad_id).long()
    return args, kwargs


def evaluate_clients(task: LoRATask, params: Params, clients: Sequence[str]) -> dict[str, dict[str, float]]:
    """Each client's held-out loss and metric (perplexity or accuracy) under the adapter `params`."""
    model = task.model_fn()
    task.set_params(model, params)
    out: dict[str, dict[str, float]] = {}
    for c in clients:
        _, test = task.data_fn(c)
        if test is None:
            raise ConfigError(f"client {c} has no held-out text; give test_size > 0")
        loss, metrics = task.evaluate(model, test)
        out[c] = {"loss": loss, **metrics}
    return out
