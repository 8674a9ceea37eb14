"""Federated LoRA fine-tuning of transformers models: only adapter tensors cross the wire.

>>> from tessera.llm import LoRATask, LoRAConfig, ModelSpec, Arch  # doctest: +SKIP
"""

from tessera.llm.data import ClientText, client_corpus
from tessera.llm.lora import (
    LoRAConfig,
    adapter_params,
    base_params,
    full_model_bytes,
    load_adapter,
    merged_model,
    shared_copy,
)
from tessera.llm.models import LOADS, Arch, Head, ModelSpec, load_base
from tessera.llm.task import LoRATask, evaluate_clients

__all__ = [
    "LOADS", "Arch", "ClientText", "Head", "LoRAConfig", "LoRATask", "ModelSpec", "adapter_params", "base_params",
    "client_corpus", "evaluate_clients", "full_model_bytes", "load_adapter", "load_base", "merged_model",
    "shared_copy",
]
