"""Split point advisor: for each place an `nn.Sequential` can be cut into (base, fuse), what crosses the wire and
what each side computes.

Per candidate cut (after the layer named `at`): the embedding shape and bytes per row, the payload bytes of one
training epoch at `rows` rows (the embedding up, its gradient down and the int64 row index of each row:
`rows * (2 * embedding_bytes + 8)`, exactly the tensor bytes split training sends; each of the 4 messages per step
adds a small fixed header on top), the forward FLOPs per row and the parameters on each side. Pass the chosen
`at` to `split_sequential(model, at=...)`.

>>> for cut in advise(model, input_shape=(30,), rows=100_000):
...     print(cut.at, cut.bytes_per_epoch, cut.base_flops, cut.fuse_flops)
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tessera.core.errors import ConfigError

INDEX_BYTES = 8  # one int64 row position per row in each ForwardIns


@dataclass(frozen=True)
class Cut:
    """One candidate split point: the base is every layer up to and including `at`."""

    at: str
    embedding_shape: tuple[int, ...]  # per row
    embedding_bytes: int  # per row, one direction
    bytes_per_epoch: int  # training payload: embeddings up + gradients down + row indices
    base_flops: int  # forward, per row
    fuse_flops: int
    base_params: int
    fuse_params: int


def _flops(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = module(x)
    return int(counter.get_total_flops()), out


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def advise(model: nn.Module, *, input_shape: tuple[int, ...], rows: int, dtype: torch.dtype = torch.float32
           ) -> list[Cut]:
    """Every cut of `model` after one of its layers but the last, in layer order. `model` is an nn.Sequential, or
    a module whose forward chains its named top-level modules (checked on a random row; see `sequential`).
    `input_shape` is one row's shape (no batch dimension); `rows` is the number of aligned training rows."""
    if rows < 0 or not input_shape or any(d < 1 for d in input_shape):
        raise ConfigError(f"give rows >= 0 and a row shape of positive sizes, got rows={rows}, {input_shape}")
    model = sequential(model, example=torch.randn(2, *input_shape).to(dtype))
    children = list(model.named_children())
    if len(children) < 2:
        raise ConfigError("the model has fewer than two layers: there is nowhere to cut")
    was = model.training
    model.eval()
    try:
        h = torch.zeros(1, *input_shape, dtype=dtype)
        flops, params = [], []
        shapes: list[tuple[int, ...]] = []
        for _, layer in children:
            f, h = _flops(layer, h)
            flops.append(f)
            params.append(_params(layer))
            shapes.append(tuple(h.shape[1:]))
    finally:
        model.train(was)
    size = torch.tensor([], dtype=dtype).element_size()
    cuts = []
    for i, (name, _) in enumerate(children[:-1]):
        per_row = size * int(torch.tensor(shapes[i]).prod()) if shapes[i] else size
        cuts.append(Cut(at=name, embedding_shape=shapes[i], embedding_bytes=per_row,
                        bytes_per_epoch=rows * (2 * per_row + INDEX_BYTES), base_flops=sum(flops[: i + 1]),
                        fuse_flops=sum(flops[i + 1 :]), base_params=sum(params[: i + 1]),
                        fuse_params=sum(params[i + 1 :])))
    return cuts


def table(cuts: list[Cut]) -> list[dict[str, Any]]:
    """The advisor's answer as rows for a printed table (CLI) or JSON."""
    return [{"cut after": c.at, "embedding": "x".join(map(str, c.embedding_shape)) or "scalar",
             "bytes/row": c.embedding_bytes, "bytes/epoch": c.bytes_per_epoch, "base FLOPs/row": c.base_flops,
             "fuse FLOPs/row": c.fuse_flops, "base params": c.base_params, "fuse params": c.fuse_params}
            for c in cuts]


def load_model(ref: str) -> nn.Module:
    """`path/model.py` or `path/model.py:attr` (default attr `model`): an nn.Module, or a callable returning one."""
    where, _, attr = ref.partition(":")
    path = Path(where)
    spec = importlib.util.spec_from_file_location(path.stem, path) if path.is_file() else None
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load {where!r}: give a .py file defining `model` (or name it as file.py:attr)")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    obj = getattr(mod, attr or "model", None)
    if obj is not None and not isinstance(obj, nn.Module) and callable(obj):
        obj = obj()
    if not isinstance(obj, nn.Module):
        raise ConfigError(f"{ref}: `{attr or 'model'}` is not an nn.Module or a function returning one")
    return obj


def sequential(model: nn.Module, *, example: torch.Tensor) -> nn.Sequential:
    """`model` itself if it is an nn.Sequential, else its named top-level modules in order, provided that chain
    computes what `model` does on `example` (give the result to `split_sequential`)."""
    if isinstance(model, nn.Sequential):
        return model
    chain = nn.Sequential(OrderedDict(model.named_children()))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            same = torch.equal(chain(example), model(example))
    except (RuntimeError, TypeError, ValueError):
        same = False
    finally:
        model.train(was)
    if not same:
        raise ConfigError(f"{type(model).__name__}.forward is not the chain of its named modules "
                          f"{[n for n, _ in model.named_children()]}; write the model as an nn.Sequential")
    return chain
