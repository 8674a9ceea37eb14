"""The same jobs on a CUDA GPU and on the CPU agree (run by `make gpu-check`; skipped without CUDA).

Tolerance: float32 kernels on a GPU sum in a different order than on the CPU, so parameters after a few SGD steps
agree to rtol=1e-4, atol=1e-5 (TF32 stays off: PyTorch's default for matmul). Privacy accounting depends only on
(noise, sampling rate, steps), so epsilon agrees exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tessera.core.types import get_params
from tessera.export import load_bundle, save_bundle, verify_bundle
from tessera.horizontal.client import ClientContext, TaskClient
from tessera.runtime.messages import FitIns
from tests.core.test_device import Recording, _dp, _fl, _sl, _task

pytestmark = pytest.mark.gpu
RTOL, ATOL = 1e-4, 1e-5


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k, t in a.items():
        assert t.device.type == "cpu" and b[k].device.type == "cpu"
        torch.testing.assert_close(t, b[k], rtol=RTOL, atol=ATOL, msg=k)


def test_fedavg_on_cuda_equals_fedavg_on_cpu() -> None:
    gpu, _, e_gpu = _fl(device="cuda")
    cpu, _, e_cpu = _fl(device="cpu")
    _close(gpu, cpu)
    assert e_gpu["loss"] == pytest.approx(e_cpu["loss"], rel=1e-4)


def test_client_model_on_cuda_sends_cpu_tensors() -> None:
    built: list[nn.Module] = []
    client = TaskClient(_task("cuda", built))
    res = client.fit(FitIns(round=1, params=get_params(Recording()), config={}), ClientContext("a"))
    assert {t.device.type for t in res.params.values()} == {"cpu"}
    assert {p.device.type for p in client.model().parameters()} == {"cuda"}
    assert {d.type for d in built[0].seen} == {"cuda"}  # type: ignore[attr-defined]


def test_split_job_with_one_party_on_cuda_equals_all_cpu() -> None:
    mixed, losses_mixed = _sl(device={"alice": "cuda", "bob": "cpu"})
    cpu, losses_cpu = _sl(device="cpu")
    _close(mixed, cpu)
    assert losses_mixed == pytest.approx(losses_cpu, rel=1e-4)


def test_dpsgd_epsilon_on_cuda_equals_cpu_exactly() -> None:
    gpu, m_gpu = _dp(device="cuda")
    _, m_cpu = _dp(device="cpu")
    for key in ("epsilon", "dp_noise_multiplier", "dp_sample_rate", "dp_steps"):
        assert m_gpu[key] == m_cpu[key], key
    assert all(t.device.type == "cpu" for t in gpu.values())


def test_bf16_and_fp16_on_cuda_train_close_to_fp32() -> None:
    _, _, e32 = _fl(device="cuda")
    for precision in ("bf16", "fp16"):
        params, _, e = _fl(device="cuda", precision=precision)
        assert all(t.dtype == torch.float32 for t in params.values())
        assert abs(e["loss"] - e32["loss"]) < 0.05, precision


def test_bundle_saved_from_cuda_loads_on_cpu_and_verifies(tmp_path: Path) -> None:
    from tessera.core.models import MLP

    x = torch.randn(16, 6)
    model = MLP(6, 3, [8]).cuda().eval()
    save_bundle(model, tmp_path / "b", example_inputs=x[:4].cuda())
    assert verify_bundle(tmp_path / "b").ok
    on_cpu = load_bundle(tmp_path / "b", map_location="cpu")
    assert {p.device.type for p in on_cpu.parameters()} == {"cpu"}
    with torch.no_grad():
        torch.testing.assert_close(on_cpu(x), model(x.cuda()).cpu(), rtol=RTOL, atol=ATOL)


def test_lora_round_on_cuda_equals_cpu() -> None:
    from tests.llm.helpers import llama_task
    from tests.llm.test_device import OWN, _round

    task = llama_task(2, spec=OWN)
    init = task.get_params(task.model_fn())  # the same starting adapters (where peft draws them may differ)
    gpu, _ = _round(init, spec=OWN, device="cuda")
    cpu, _ = _round(init, spec=OWN, device="cpu")
    _close(gpu, cpu)
