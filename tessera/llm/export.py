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
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tessera.core.errors import ExportError
from tessera.core.types import Params
from tessera.export.arch import Rebuildable, Shapes, check_bounds
from tessera.llm.lora import LoRAConfig, adapter_params, load_adapter, lora_template, merged_model, shared_copy
from tessera.llm.models import Arch, Head, ModelSpec
from tessera.llm.task import LoRATask

_SEP = "__"  # module attribute names cannot hold dots; peft names never contain a double underscore


# Declared bounds for what a manifest may ask the loader to build (checked before any constructor runs).
SPEC_BOUNDS = {"hidden_size": (1, 16384), "intermediate_size": (1, 131072), "num_layers": (1, 512),
               "num_heads": (1, 512), "num_kv_heads": (1, 512), "max_length": (1, 1 << 20),
               "num_labels": (1, 1 << 20), "seed": (0, 2**63 - 1)}
LORA_BOUNDS = {"r": (1, 4096), "alpha": (1, 1 << 20)}
HF_BOUNDS = {"vocab_size": (1, 1 << 20), "hidden_size": (1, 16384), "intermediate_size": (1, 131072),
             "num_hidden_layers": (1, 512), "num_attention_heads": (1, 512), "max_position_embeddings": (1, 1 << 20)}
BASE_PER_ADAPTER = 4096  # a built base may hold at most this many parameters per adapter parameter (+ a floor)
BASE_FLOOR = 10_000_000
_LAYER = re.compile(r"__layers__(\d+)__")


class MergedLM(Rebuildable):
    """A transformers model rebuilt from its JSON config; `forward(input_ids, attention_mask) -> logits`."""

    @classmethod
    def check_rebuild(cls, kwargs: Mapping[str, Any], shapes: Shapes) -> None:
        hf = kwargs.get("hf_config")
        if not isinstance(hf, dict):
            raise ExportError("MergedLM needs hf_config, a dict; the manifest is corrupt")
        check_bounds(hf, HF_BOUNDS, what="MergedLM.hf_config")

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


class LoRAAdapter(Rebuildable):
    """Only the adapter tensors as parameters; the frozen base is rebuilt from `spec` (shared per process).

    `forward(input_ids, attention_mask) -> logits` runs base + adapter. Parameter names are the peft names
    with "." replaced by "__"; `adapter()` gives them back under the names training used. A local base path is
    stored relative to the folder holding the bundle and resolved against it when the bundle is loaded.
    """

    path_kwargs = (("spec", "path"),)

    @classmethod
    def check_rebuild(cls, kwargs: Mapping[str, Any], shapes: Shapes) -> None:
        """Bounds, the local base's presence, and the built base's size against the adapter the bundle holds."""
        spec, lora = kwargs.get("spec"), kwargs.get("lora")
        if not isinstance(spec, dict) or not isinstance(lora, dict):
            raise ExportError("LoRAAdapter needs spec and lora dicts; the manifest is corrupt")
        check_bounds(spec, SPEC_BOUNDS, what="LoRAAdapter.spec")
        check_bounds(lora, LORA_BOUNDS, what="LoRAAdapter.lora")
        try:
            model_spec, lora_cfg = ModelSpec(**spec), LoRAConfig(**lora)
        except (TypeError, ValueError) as exc:
            raise ExportError(f"LoRAAdapter spec or lora is malformed ({exc}); the manifest is corrupt") from None
        if model_spec.arch is Arch.LOCAL and not Path(str(model_spec.path)).is_dir():
            raise ExportError(f"the adapter's base model {model_spec.path} is not a directory; put the base "
                              "checkpoint there (the bundle records it relative to the folder holding the bundle)")
        lora_shapes = [(k, list(v)) for k, v in shapes.items() if "__lora_A__" in k or "__lora_B__" in k]
        if any(len(v) != 2 or lora_cfg.r not in v for _, v in lora_shapes):
            raise ExportError(f"the adapter's tensors do not have rank r={lora_cfg.r} (LoRA A is [r, in], B is "
                              "[out, r]); the manifest is corrupt or hostile")
        if model_spec.arch in (Arch.LLAMA, Arch.QWEN2):
            _check_built_base(model_spec, lora_shapes, sum(math.prod(v) for v in shapes.values()))

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


def _check_built_base(spec: ModelSpec, lora_shapes: list[tuple[str, list[int]]], adapter_numel: int) -> None:
    """A decoder built from the manifest's numbers must be the one the adapter's tensors were trained on."""
    layers = {int(m.group(1)) for k, _ in lora_shapes if (m := _LAYER.search(k))}
    if layers and layers != set(range(spec.num_layers)):
        raise ExportError(f"spec.num_layers={spec.num_layers} but the adapter holds layers {sorted(layers)[:5]}...; "
                          "the manifest is corrupt or hostile")
    if lora_shapes and not any(spec.hidden_size in v for _, v in lora_shapes):
        raise ExportError(f"spec.hidden_size={spec.hidden_size} matches none of the adapter's tensor shapes; the "
                          "manifest is corrupt or hostile")
    h, i, n = spec.hidden_size, spec.intermediate_size, spec.num_layers
    base = n * (4 * h * h + 3 * h * i) + 2 * 30522 * h  # attention + MLP per layer, embeddings (vocab bound)
    if base > BASE_FLOOR + BASE_PER_ADAPTER * adapter_numel:
        raise ExportError(f"the manifest asks for a base of about {base:,} parameters for an adapter of "
                          f"{adapter_numel:,}; that is not a LoRA adapter of this base (corrupt or hostile manifest)")


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
