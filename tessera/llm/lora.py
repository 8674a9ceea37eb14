"""LoRA adapters on a shared frozen base: build, copy cheaply, read/write only the adapter, merge.

A `LoRAModel` (peft) is built once per (base, LoRA config) and process; `shared_copy` gives further instances
whose frozen tensors *are* the template's (same storage, no copy) and whose adapter tensors are their own, so a
thread that trains its copy never touches another's adapters and N virtual clients cost one base in memory.
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from tessera.core.errors import ConfigError, ShapeMismatch
from tessera.core.types import Params
from tessera.llm.models import Arch, Head, ModelSpec, load_base

# Default target modules: the query and value projections (the LoRA paper's choice). Decoders built from a config
# have random weights, so their output layer gets an adapter too: without it no adapter can make the random,
# near-uniform next-token distribution sharp. A pretrained checkpoint does not need that.
DEFAULT_TARGETS: dict[Arch, tuple[str, ...]] = {
    Arch.MINILM: ("query", "value"),
    Arch.LLAMA: ("q_proj", "v_proj", "lm_head"),
    Arch.QWEN2: ("q_proj", "v_proj", "lm_head"),
    Arch.LOCAL: ("q_proj", "v_proj"),
}


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters. `target_modules=()` picks `DEFAULT_TARGETS` for the architecture; `seed` draws
    the initial A matrices (B starts at zero, so the initial adapter leaves the base's outputs unchanged)."""

    r: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ()
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))  # hashable even from JSON lists
        if self.r < 1:
            raise ConfigError(f"lora.r: must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha: must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")


_TEMPLATES: dict[tuple[ModelSpec, LoRAConfig, str, bool], nn.Module] = {}
_LOCK = threading.Lock()


def shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of `model` that shares every frozen parameter and every buffer with it (same tensor
    objects) and owns fresh copies of the trainable ones."""
    memo: dict[int, object] = {id(t): t for t in model.parameters() if not t.requires_grad}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def lora_template(spec: ModelSpec, lora: LoRAConfig, *, device: torch.device | None = None,
                  gradient_checkpointing: bool = False) -> nn.Module:
    """The peft model for (spec, lora), built once per process (and device) on the shared base (which it does not
    modify). Clients load the global adapters before training, so where the initial draw ran does not matter."""
    from peft import LoraConfig, TaskType, get_peft_model

    key = (spec, lora, str(device or "cpu"), gradient_checkpointing)
    with _LOCK:
        if key in _TEMPLATES:
            return _TEMPLATES[key]
    base, _ = load_base(spec, device=device, gradient_checkpointing=gradient_checkpointing)
    targets = list(lora.target_modules or DEFAULT_TARGETS[spec.arch])
    task_type = TaskType.CAUSAL_LM if spec.head is Head.CAUSAL_LM else TaskType.SEQ_CLS
    cfg = LoraConfig(task_type=task_type, r=lora.r, lora_alpha=lora.alpha, target_modules=targets,
                     lora_dropout=lora.dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora.seed)
        try:
            with warnings.catch_warnings():
                # peft 0.21 still asks transformers 5 for the renamed is_gradient_checkpointing; harmless here
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                # peft swaps modules in place, so it works on a copy; the copy still shares the base's tensors.
                model = get_peft_model(shared_copy(base), cfg)
        except ValueError as exc:
            raise ConfigError(f"lora.target_modules {targets} do not fit {spec.arch.value}: {exc}") from None
    with _LOCK:
        return _TEMPLATES.setdefault(key, model)


def adapter_params(model: nn.Module) -> Params:
    """The tensors that travel: every trainable parameter (LoRA A/B, plus a new classifier head), CPU copies."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_adapter(model: nn.Module, params: Mapping[str, torch.Tensor], *, who: str = "adapter params") -> None:
    """Copy `params` into the model's adapter tensors; refuses missing/extra names, wrong shapes, base tensors."""
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in own if k not in params]
    extra = [k for k in params if k not in own]
    if missing or extra:
        raise ShapeMismatch(f"{who} do not match the LoRA model: missing {missing[:3]}, unexpected {extra[:3]}; "
                            "build every party's LoRATask with the same ModelSpec and LoRAConfig")
    with torch.no_grad():
        for k, p in own.items():
            if tuple(p.shape) != tuple(params[k].shape):
                raise ShapeMismatch(f"{who}: '{k}' has shape {tuple(params[k].shape)}, the model expects "
                                    f"{tuple(p.shape)}; use the same LoRAConfig (rank) everywhere")
            p.copy_(params[k])


def base_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen tensors of a LoRA model (for the 'base never changes' checks), by name, not copied."""
    return {n: p for n, p in model.named_parameters() if not p.requires_grad}


def merged_model(model: nn.Module, params: Mapping[str, torch.Tensor]) -> nn.Module:
    """A standalone transformers model with `params` merged into its weights: what serving loads.

    Works on a full deep copy, so the shared base every virtual client uses is never modified.
    """
    standalone = copy.deepcopy(model)
    load_adapter(standalone, params)
    merged: nn.Module = standalone.merge_and_unload()  # type: ignore[operator]
    merged.eval()
    return merged



def full_model_bytes(spec: ModelSpec) -> int:
    """Tensor bytes of the whole base model: what each message would carry if the full model travelled."""
    base, _ = load_base(spec)
    return sum(t.numel() * t.element_size() for t in base.state_dict().values())
