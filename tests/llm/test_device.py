"""LoRA on a chosen device: device="cpu" equals the default bit for bit, and a hub id that is not on this machine
is a tessera error saying to download it first (tessera never downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tessera.core.errors import ConfigError
from tessera.horizontal.job import JobParts
from tessera.horizontal.simulation import simulate
from tessera.horizontal.strategies import FedAvg
from tessera.llm import Arch, LoRATask, ModelSpec, load_base
from tests.llm.helpers import clients, llama_task

# Runs on another device or with checkpointing build their own base: on a spec of their own, so LOADS[LLAMA]
# (one build per process, asserted in test_task.py) is untouched.
OWN = ModelSpec(arch=Arch.LLAMA, max_length=40, seed=7)

def _round(init: dict[str, torch.Tensor] | None = None, **kw: Any) -> tuple[dict[str, torch.Tensor], list[Any]]:
    task = llama_task(2, **kw)
    history, final = simulate(JobParts(task=task, strategy=FedAvg(), clients=clients(2)), rounds=1, seed=3,
                              params=init)
    return final, [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_lora_device_cpu_is_bit_identical_to_the_default() -> None:
    p0, h0 = _round()
    p1, h1 = _round(device="cpu")
    assert list(p0) == list(p1) and all(torch.equal(p0[k], p1[k]) for k in p0)
    assert h0 == h1


def test_lora_gradient_checkpointing_gives_the_same_round() -> None:
    """Recomputing activations in the backward pass changes memory, not the arithmetic."""
    p0, _ = _round(spec=OWN)
    p1, _ = _round(spec=OWN, gradient_checkpointing=True)
    assert all(torch.allclose(p0[k], p1[k], rtol=1e-5, atol=1e-7) for k in p0)


def test_a_hub_id_with_no_local_copy_says_download_it_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec(arch=Arch.LOCAL, path="someorg/some-decoder-0.5B")
    with pytest.raises(ConfigError, match=r"model 'someorg/some-decoder-0.5B' is not on this machine and tessera "
                                          r"never downloads: fetch it first \(`huggingface-cli download"):
        load_base(spec)
    with pytest.raises(ConfigError, match=r"model path .*no-such-dir is not a directory"):
        load_base(ModelSpec(arch=Arch.LOCAL, path=str(tmp_path / "no-such-dir")))


def test_lora_bad_device_and_precision_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        LoRATask(ModelSpec(), device="cuda")
    with pytest.raises(ConfigError, match="precision='fp16' on the CPU"):
        LoRATask(ModelSpec(), device="cpu", precision="fp16")
