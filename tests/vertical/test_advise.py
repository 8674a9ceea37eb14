"""Split point advisor: its byte count equals the tensor bytes one training epoch sends at the chosen cut; FLOPs
and parameters on each side add up to the whole model's; a non-chain model is refused."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import tessera
from tessera.core.errors import ConfigError
from tessera.runtime.backend import InProcessBackend
from tessera.vertical import split_sequential
from tessera.vertical.advise import advise, load_model, table
from tessera.vertical.messages import Backward, Forward, ForwardIns


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc0=nn.Linear(12, 32), act0=nn.ReLU(), fc1=nn.Linear(32, 6), act1=nn.Tanh(),
                                     out=nn.Linear(6, 1)))


class Tap(InProcessBackend):
    def __init__(self, handler: Any) -> None:
        super().__init__(handler)
        self.payload = 0

    def exchange(self, requests: Any, *, timeout: float | None = None) -> dict[str, Any]:
        replies = super().exchange(requests, timeout=timeout)
        for msg, rep in zip(requests.values(), replies.values(), strict=True):
            if isinstance(msg, ForwardIns) and msg.mode == "train":
                assert isinstance(rep, Forward)
                self.payload += msg.rows.nbytes + rep.embedding.nbytes
            if isinstance(msg, Backward):
                self.payload += msg.grad.nbytes
        return replies


@pytest.mark.parametrize("at", ["act0", "act1"])
def test_advised_bytes_equal_one_measured_epoch(at: str) -> None:
    rows = 100
    cuts = {c.at: c for c in advise(mlp(), input_shape=(12,), rows=rows)}
    assert list(cuts) == ["fc0", "act0", "fc1", "act1"]
    base, fuse = split_sequential(mlp(), at=at)
    taps: list[Tap] = []
    sl = tessera.SLModel(base_models={"bob": base}, fuse_model=fuse, label_party="alice",
                         loss_fn=nn.BCEWithLogitsLoss(), optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1),
                         backend=lambda h: taps.append(Tap(h)) or taps[-1])
    g = torch.Generator().manual_seed(1)
    sl.fit(x={"bob": torch.randn(rows, 12, generator=g)}, y=torch.randint(0, 2, (rows, 1), generator=g).float(),
           epochs=1, batch_size=16)
    assert taps[0].payload == cuts[at].bytes_per_epoch == rows * (2 * 4 * cuts[at].embedding_shape[0] + 8)


def test_flops_and_params_split_the_whole_model() -> None:
    cuts = advise(mlp(), input_shape=(12,), rows=10)
    whole = sum(p.numel() for p in mlp().parameters())
    linear_flops = 2 * (12 * 32 + 32 * 6 + 6 * 1)  # multiply-adds of the three Linear layers, one row
    for c in cuts:
        assert c.base_params + c.fuse_params == whole
        assert c.base_flops + c.fuse_flops == linear_flops
    assert [c.embedding_bytes for c in cuts] == [128, 128, 24, 24]
    assert table(cuts)[0]["cut after"] == "fc0"


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))  # type: ignore[no-any-return]


class Skip(Chain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + x[:, :1]  # type: ignore[no-any-return]


def test_named_modules_chain_is_accepted_and_a_skip_is_refused(tmp_path: Path) -> None:
    assert [c.at for c in advise(Chain(), input_shape=(4,), rows=1)] == ["a"]
    with pytest.raises(ConfigError, match="not the chain"):
        advise(Skip(), input_shape=(4,), rows=1)
    (tmp_path / "m.py").write_text("from torch import nn\nmodel = nn.Sequential(nn.Linear(3, 2), nn.ReLU())\n")
    assert isinstance(load_model(str(tmp_path / "m.py")), nn.Sequential)
    with pytest.raises(ConfigError, match=r"not an nn\.Module"):
        load_model(f"{tmp_path / 'm.py'}:nothing")
