"""Export a federated LoRA result as a tessera bundle: the merged model, or the adapter alone.

Both go through `tessera.export.save_bundle`, so `load_bundle` rebuilds them without pickle and `verify_bundle`
reruns the stored reference inputs. The wrappers here are what the manifest names (allowlisted: `tessera`):
- `MergedLM`: the base with the adapter merged into its weights; the bundle holds every weight and rebuilds
  the transformers model from the JSON config it records. This is what a serving team loads.
- `LoRAAdapter`: only the adapter tensors; the bundle records the `ModelSpec` and `LoRAConfig`, and loading it
  rebuilds the base the same way training did (MiniLM package, seeded config, or the same local checkpoint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tessera.core.types import Params
from tessera.llm.lora import LoRAConfig, adapter_params, load_adapter, lora_template, merged_model, shared_copy
from tessera.llm.models import Head, ModelSpec
from tessera.llm.task import LoRATask

_SEP = "__"  # module attribute names cannot hold dots; peft names never contain a double underscore


class MergedLM(nn.Module):
    """A transformers model rebuilt from its JSON config; `forward(input_ids, attention_mask) -> logits`."""

    def __init__(self, model_type: str, hf_config: dict[str, Any], head: str) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        self.config = {"model_type": model_type, "hf_config": hf_config, "head": head}
        cfg = AutoConfig.for_model(model_type, **hf_config)
        cls = AutoModelForCausalLM if Head(head) is Head.CAUSAL_LM else AutoModelForSequenceClassification
        self.model = cls.from_config(cfg)  # type: ignore[no-untyped-call]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return out


class LoRAAdapter(nn.Module):
    """Only the adapter tensors as parameters; the frozen base is rebuilt from `spec` (shared per process).

    `forward(input_ids, attention_mask) -> logits` runs base + adapter. Parameter names are the peft names
    with "." replaced by "__"; `adapter()` gives them back under the names training used.
    """

    def __init__(self, spec: dict[str, Any], lora: dict[str, Any]) -> None:
        super().__init__()
        self.config = {"spec": spec, "lora": lora}
        with torch.device("cpu"):  # the loader builds modules on "meta"; the shared base must hold real weights
            model = shared_copy(lora_template(ModelSpec(**spec), LoRAConfig(**lora)))
            for name, t in adapter_params(model).items():
                self.register_parameter(name.replace(".", _SEP), nn.Parameter(t, requires_grad=False))
        self._model = [model]  # a list, so the base is not a submodule and stays out of the bundle

    def adapter(self) -> Params:
        return {k.replace(_SEP, "."): p.detach() for k, p in self.named_parameters()}

    def train(self, mode: bool = True) -> LoRAAdapter:
        super().train(mode)
        self._model[0].train(mode)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = self._model[0]
        load_adapter(model, self.adapter(), who="bundle adapter")
        out: torch.Tensor = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return out


def _json_spec(obj: Any) -> dict[str, Any]:
    d = dataclasses.asdict(obj)
    return {k: (str(v) if isinstance(v, str) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def example_inputs(task: LoRATask, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tokenised reference inputs for a bundle (what `verify_bundle` reruns)."""
    ids, _ = task.tokenize(list(texts), [0] * len(texts)).tensors
    return {"input_ids": ids, "attention_mask": task.attention_mask(ids)}


def export_adapter(task: LoRATask, params: Params, path: str | Path, *, texts: Sequence[str],
                   **bundle_kwargs: Any) -> Path:
    """Write the adapter alone as a bundle (kilobytes); the loader needs the same base available offline."""
    from tessera.export import save_bundle

    module = LoRAAdapter(_json_spec(task.spec), _json_spec(task.lora))
    with torch.no_grad():
        for k, p in module.named_parameters():
            p.copy_(params[k.replace(_SEP, ".")])
    return save_bundle(module, path, example_inputs=example_inputs(task, texts), **bundle_kwargs)


def export_merged(task: LoRATask, params: Params, path: str | Path, *, texts: Sequence[str],
                  **bundle_kwargs: Any) -> Path:
    """Write the base with the adapter merged in as a standalone bundle (no peft needed to serve it)."""
    from tessera.export import save_bundle

    merged = merged_model(lora_template(task.spec, task.lora), params)
    config: Any = merged.config
    hf_config = config.to_dict()
    model_type = str(hf_config.pop("model_type"))
    for key in ("transformers_version", "architectures", "_name_or_path"):
        hf_config.pop(key, None)
    module = MergedLM(model_type, hf_config, task.spec.head.value)
    module.model.load_state_dict(merged.state_dict())
    return save_bundle(module, path, example_inputs=example_inputs(task, texts), **bundle_kwargs)
