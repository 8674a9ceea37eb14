"""Small builders shared by the LLM tests: a tiny Llama decoder and short generated texts keep each run fast."""

from typing import Any

import torch

from tessera.horizontal.client import CallNext, ClientContext
from tessera.llm import Arch, Head, LoRAConfig, LoRATask, ModelSpec
from tessera.runtime.messages import FitRes

LLAMA = ModelSpec(arch=Arch.LLAMA, max_length=40)
QWEN = ModelSpec(arch=Arch.QWEN2, max_length=40)
MINILM = ModelSpec(arch=Arch.MINILM, head=Head.SEQ_CLS, max_length=24)
LORA = LoRAConfig(r=4, alpha=8)


def clients(n: int) -> list[str]:
    return [f"c{i}" for i in range(n)]


def llama_task(n: int = 4, **kw: Any) -> LoRATask:
    opts: dict[str, Any] = {"train_size": 32, "test_size": 16, "batch_size": 8, "lr": 2e-2}
    opts.update(kw)
    return LoRATask(opts.pop("spec", LLAMA), opts.pop("lora", LORA), clients=clients(n), **opts)


class Recorder:
    """A client mod that keeps a copy of every FitRes a client sends: what leaves the client."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, FitRes]] = []

    def __call__(self, msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
        reply = call_next(msg, ctx)
        if isinstance(reply, FitRes):
            self.sent.append((ctx.client, reply))
        return reply


def snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}
