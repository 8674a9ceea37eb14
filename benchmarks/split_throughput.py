"""Split learning throughput: tessera split training (in-process backend, every message encoded and decoded as on
the wire) vs plain PyTorch training of the same composed model on the joined data.

Two parties (alice: label party + base, bob: base), 2 x 32 features, MLP bases 32-64-32, fuse 64-32-1, Adam,
batch 128. Both runs start from the same params and use the same batch order; the final params are checked equal
so the ratio compares identical work. ratio = split time / centralised time (target <= 1.25, i.e. throughput
>= 0.8 of centralised).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, report

import tessera
from tessera.vertical import ConcatFuse, SplitModel
from tessera.vertical.trainer import batch_order

FEATURES, BATCH, SEED = 32, 128, 0


def build() -> tuple[dict[str, nn.Module], nn.Module]:
    torch.manual_seed(SEED)
    bases: dict[str, nn.Module] = {p: nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
                                   for p in ("alice", "bob")}
    return bases, ConcatFuse(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1)))


def data(rows: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    x = {p: torch.randn(rows, FEATURES, generator=g) for p in ("alice", "bob")}
    y = ((x["alice"][:, 0] + x["bob"][:, 0]) > 0).float().unsqueeze(1)
    return x, y


def opt(p: object) -> torch.optim.Optimizer:
    return torch.optim.Adam(p, lr=1e-3)  # type: ignore[arg-type]


def central(x: dict[str, torch.Tensor], y: torch.Tensor, epochs: int) -> SplitModel:
    bases, fuse = build()
    model = SplitModel(bases, fuse, label_party="alice")
    o, loss_fn = opt(model.parameters()), nn.BCEWithLogitsLoss()
    for epoch in range(epochs):
        perm = batch_order(seed=SEED, epoch=epoch, n=len(y), shuffle=True)
        for i in range(0, len(y), BATCH):
            rows = perm[i : i + BATCH]
            loss = loss_fn(model({p: v[rows] for p, v in x.items()}), y[rows])
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
    return model


def split(x: dict[str, torch.Tensor], y: torch.Tensor, epochs: int) -> tessera.SLModel:
    bases, fuse = build()
    sl = tessera.SLModel(base_models=bases, fuse_model=fuse, label_party="alice", loss_fn=nn.BCEWithLogitsLoss(),
                         optimizer_fn=opt, seed=SEED)
    sl.fit(x=x, y=y, epochs=epochs, batch_size=BATCH)
    return sl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, epochs, repeats = (2048, 2, 3) if args.quick else (8192, 3, 5)
    x, y = data(rows)
    ref, sl = central(x, y, epochs), split(x, y, epochs)
    diff = max(float((a - b).abs().max()) for a, b in zip(ref.state_dict().values(), sl.model.state_dict().values(),
                                                          strict=True))
    if diff > 1e-5:
        raise SystemExit(f"split and centralised params differ by {diff}: the benchmark would compare different work")
    t_central, _ = best_of(lambda: central(x, y, epochs), repeats)
    t_split, _ = best_of(lambda: split(x, y, epochs), repeats)
    samples = rows * epochs
    traffic = sl.backend.traffic
    steps = epochs * -(-rows // BATCH)
    report("split_throughput",
           ["setup", "seconds", "samples/s", "bytes/step"],
           [["centralised (plain PyTorch)", t_central, samples / t_central, 0],
            ["split, in-process backend", t_split, samples / t_split, (traffic.up + traffic.down) / steps]],
           ratio=t_split / t_central, ratio_means="split training time / centralised training time (lower is better)",
           extra={"rows": rows, "epochs": epochs, "batch": BATCH, "max_param_diff": diff,
                  "throughput_ratio": t_central / t_split})


if __name__ == "__main__":
    main()
