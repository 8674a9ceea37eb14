"""GPU vs CPU and bf16 vs fp32, through tessera's one `device` / `precision` setting (make gpu-check).

Two workloads, each run with the same seed and starting weights on the CPU in fp32 (the reference), on CUDA in
fp32 and on CUDA under bf16 autocast:
- FedAvg of a ResNet-18 (11.2M weights, CIFAR-shaped synthetic images) over 4 clients, one local epoch per round
  (FLModel(device=..., precision=...)): seconds per round (the second round: the first pays CUDA start-up),
- one LoRA round (r=8 on q/v) on a Llama-style decoder of ~280M weights built from a config, 2 clients
  (LoRATask(device=..., precision=...)).
Each row also gives the largest |parameter difference| from the CPU fp32 run: the GPU is a faster route to the
same model, not a different one. GPU memory is torch.cuda.max_memory_allocated per run.

ratio = CPU fp32 seconds / CUDA bf16 seconds of the LoRA round (how much the one setting buys).

Without CUDA it says so and exits cleanly; `--quick` then runs tiny versions of both workloads on the CPU (fp32
and bf16) as a smoke test of the code path. Under 10 minutes on one H200 (most of it is the CPU reference).

    python benchmarks/gpu.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import report
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(out)) + self.short(x))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18 (He et al. 2016): 4 stages of 2 basic blocks, widths 64..512 (`width` scales them)."""

    def __init__(self, classes: int = 10, width: int = 64) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU())
        layers, cin = [], w[0]
        for i, cout in enumerate(w):
            layers += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(w[3], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def _peak(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def fedavg(device: str, precision: str, *, quick: bool) -> tuple[float, dict[str, torch.Tensor], float]:
    import tessera
    from tessera.core.types import get_params

    rows, width = (32, 8) if quick else (256, 64)
    torch.manual_seed(0)
    model = ResNet18(width=width)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(rows, 3, 32, 32, generator=g) for _ in range(4)]
    ys = [torch.randint(0, 10, (rows,), generator=g) for _ in range(4)]
    fl = tessera.FLModel(parties=[f"c{i}" for i in range(4)], model=model, loss_fn=nn.CrossEntropyLoss(),
                         optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), device=device,
                         precision=precision, seed=0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    fl.fit(x=xs, y=ys, rounds=1, batch_size=64, shuffle=False)
    t0 = time.perf_counter()
    fl.fit(x=xs, y=ys, rounds=1, batch_size=64, shuffle=False)
    return time.perf_counter() - t0, get_params(fl.model), _peak(device)


def lora(device: str, precision: str, *, quick: bool,
         init: dict[str, torch.Tensor] | None) -> tuple[float, dict[str, torch.Tensor], float, int,
                                                       dict[str, torch.Tensor]]:
    from tessera.horizontal.job import JobParts
    from tessera.horizontal.simulation import simulate
    from tessera.horizontal.strategies import FedAvg
    from tessera.llm import Arch, LoRAConfig, LoRATask, ModelSpec

    size = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_length=32) \
        if quick else dict(hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16, num_kv_heads=8,
                           max_length=128)
    spec = ModelSpec(arch=Arch.LLAMA, **size)  # type: ignore[arg-type]
    task = LoRATask(spec, LoRAConfig(r=8, alpha=16), clients=["a", "b"], train_size=32, test_size=0, batch_size=8,
                    device=device, precision=precision)
    model = task.model_fn()  # builds (and places) the base once, outside the timed round
    weights = sum(p.numel() for p in model.parameters())
    start = init if init is not None else task.get_params(model)  # every run starts from the same adapters
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _, final = simulate(JobParts(task=task, strategy=FedAvg(fraction_evaluate=0.0), clients=["a", "b"]), rounds=1,
                        seed=0, params=start)
    return time.perf_counter() - t0, final, _peak(device), weights, start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny models (a CPU smoke test without CUDA)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("CUDA is absent on this machine (torch.cuda.is_available() is False): nothing to measure. Run "
              "`make gpu-check` on a CUDA machine (docs/gpu.md); `--quick` smoke-tests the code path on the CPU.")
        return
    runs = [("cpu", "32"), ("cuda", "32"), ("cuda", "bf16")] if cuda else [("cpu", "32"), ("cpu", "bf16")]
    rows: list[list[Any]] = []
    ref_fl: dict[str, torch.Tensor] = {}
    ref_lora: dict[str, torch.Tensor] = {}
    init: dict[str, torch.Tensor] | None = None
    secs: dict[tuple[str, str, str], float] = {}
    for device, precision in runs:
        s, params, peak = fedavg(device, precision, quick=args.quick)
        ref_fl = ref_fl or params
        secs["fedavg", device, precision] = s
        rows.append(["fedavg resnet18 x4 clients", device, precision, s, secs["fedavg", "cpu", "32"] / s,
                     _max_diff(params, ref_fl), peak])
    for device, precision in runs:
        s, params, peak, weights, init = lora(device, precision, quick=args.quick, init=init)
        ref_lora = ref_lora or params
        secs["lora", device, precision] = s
        rows.append([f"lora round {weights / 1e6:.0f}M decoder x2", device, precision, s,
                     secs["lora", "cpu", "32"] / s, _max_diff(params, ref_lora), peak])
    best = ("cuda", "bf16") if cuda else ("cpu", "bf16")
    ratio = secs["lora", "cpu", "32"] / secs[("lora", *best)]
    extra = {"cuda": cuda, "quick": args.quick, "torch": torch.__version__,
             "gpu": torch.cuda.get_device_name(0) if cuda else None}
    report("gpu", ["workload", "device", "precision", "seconds", "speedup vs cpu fp32", "max |dparam| vs cpu fp32",
                   "peak GPU GiB"], rows, ratio=ratio,
           ratio_means=f"LoRA round seconds, cpu fp32 / {best[0]} {best[1]}", extra=extra)


if __name__ == "__main__":
    main()
