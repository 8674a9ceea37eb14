"""Split models: one base per data owner, a fuse module at the label party, and the composed model.

`SplitModel` is also the centralised reference: `SplitModel(bases, fuse)(xs)` is exactly the computation split
training distributes, which is what the equality tests compare against.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from tessera.core.errors import ConfigError, ShapeMismatch


def _first_linear(module: nn.Module) -> nn.Linear | None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Embedding, nn.RNNBase)):
            return None  # the first layer is not a Linear: do not guess its input width
    return None


class ConcatFuse(nn.Module):
    """Concatenate the parties' embeddings on the last dimension, then apply `head`."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        return self.head(torch.cat(embeddings, dim=-1))  # type: ignore[no-any-return]


class SumFuse(nn.Module):
    """Add the parties' embeddings (all the same shape), then apply `head` (identity if None)."""

    def __init__(self, head: nn.Module | None = None) -> None:
        super().__init__()
        self.head = head if head is not None else nn.Identity()

    def forward(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        total = embeddings[0]
        for e in embeddings[1:]:
            total = total + e
        return self.head(total)  # type: ignore[no-any-return]


def make_fuse(fuse: nn.Module | str, head: nn.Module | None = None) -> nn.Module:
    """`"concat"` / `"sum"` (with `head`) or a user module whose forward takes the list of embeddings."""
    if isinstance(fuse, nn.Module):
        return fuse
    if fuse == "concat":
        if head is None:
            raise ConfigError("fuse='concat' needs a head module (e.g. nn.Linear(total_embedding_width, classes))")
        return ConcatFuse(head)
    if fuse == "sum":
        return SumFuse(head)
    raise ConfigError(f"fuse must be 'concat', 'sum' or an nn.Module taking a list of embeddings, got {fuse!r}")


class SplitModel(nn.Module):
    """The composed model: `fuse([bases[p](xs[p]) for p in bases])`, with the label party named.

    >>> model = SplitModel({"alice": nn.Linear(10, 4), "bob": nn.Linear(20, 4)},
    ...                    ConcatFuse(nn.Linear(8, 1)), label_party="alice")
    >>> out = model({"alice": xa, "bob": xb})
    """

    def __init__(self, bases: Mapping[str, nn.Module], fuse: nn.Module | str, *, label_party: str,
                 head: nn.Module | None = None) -> None:
        super().__init__()
        if not bases:
            raise ConfigError("a split model needs at least one base model (one per data owner)")
        if not label_party:
            raise ConfigError("label_party must name the party holding the labels and the fuse model")
        self.bases = nn.ModuleDict(OrderedDict(bases))
        self.fuse = make_fuse(fuse, head)
        self.label_party = label_party

    @property
    def parties(self) -> list[str]:
        """Every party: the base owners in order, then the label party if it owns no base."""
        names = list(self.bases)
        return names if self.label_party in names else [*names, self.label_party]

    @property
    def owners(self) -> list[str]:
        """Parties whose base runs away from the label party (they exchange messages with it)."""
        return [p for p in self.bases if p != self.label_party]

    def forward(self, xs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = [p for p in self.bases if p not in xs]
        if missing:
            raise ConfigError(f"inputs are missing for part(ies) {missing}; give one array per base owner")
        return self.fuse([self.bases[p](xs[p]) for p in self.bases])  # type: ignore[no-any-return]


def check_fuse_shapes(embeddings: Mapping[str, torch.Tensor], fuse: nn.Module, *, label_party: str) -> torch.Tensor:
    """Run `fuse` on one dry-run batch of embeddings; raise ShapeMismatch naming the parties and shapes.

    Returns the fuse output so the caller can check it against the labels.
    """
    shapes = {p: tuple(e.shape) for p, e in embeddings.items()}
    desc = ", ".join(f"{p}: {s}" for p, s in shapes.items())
    rows = {s[0] if s else None for s in shapes.values()}
    if len(rows) != 1:
        raise ShapeMismatch(f"embeddings disagree on the batch size ({desc}); every base must keep dim 0 as rows")
    if isinstance(fuse, SumFuse):
        ref_party, ref = next(iter(shapes.items()))
        for p, s in shapes.items():
            if s != ref:
                raise ShapeMismatch(f"sum fuse at {label_party}: expected every embedding shaped like {ref_party}'s "
                                    f"{ref}, but {p} sends {s}; give all bases the same output width")
    lin = _first_linear(fuse.head) if isinstance(fuse, (ConcatFuse, SumFuse)) else None
    if lin is not None and all(len(s) >= 1 for s in shapes.values()):
        width = sum(s[-1] for s in shapes.values()) if isinstance(fuse, ConcatFuse) else next(iter(shapes.values()))[-1]
        if width != lin.in_features:
            how = "concatenated width" if isinstance(fuse, ConcatFuse) else "embedding width"
            raise ShapeMismatch(f"fuse at {label_party} expects a {how} of {lin.in_features} but got {width} "
                                f"({desc}); change the head's in_features or the bases' output widths")
    try:
        with torch.no_grad():
            return fuse([e for e in embeddings.values()])  # type: ignore[no-any-return]
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ShapeMismatch(f"fuse at {label_party} cannot take the embeddings ({desc}): {first}; "
                            "make the bases' outputs match what the fuse model expects") from None


def check_output_shape(output: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module | object, *,
                       label_party: str) -> None:
    """The loss must accept the fuse output against the labels (one dry-run batch)."""
    try:
        with torch.no_grad():
            loss = loss_fn(output, y)  # type: ignore[operator]
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ShapeMismatch(f"loss at {label_party}: fuse output {tuple(output.shape)} does not fit labels "
                            f"{tuple(y.shape)} ({y.dtype}): {first}; fix the head's output size or the label shape"
                            ) from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ShapeMismatch(f"loss at {label_party} must return a scalar tensor, got shape "
                            f"{tuple(getattr(loss, 'shape', ()))}; use reduction='mean'")


def split_sequential(model: nn.Module, *, at: str) -> tuple[nn.Sequential, ConcatFuse]:
    """Cut a `nn.Sequential` after the layer named `at` into (base, fuse), as deep copies.

    The base is the layers up to and including `at`; the fuse is a `ConcatFuse` over the remaining layers, so with
    one owner `fuse([base(x)]) == model(x)`. For several owners give each its own base on its columns.

    >>> base, fuse = split_sequential(MLP(30, 2, hidden=(16,)), at="act0")
    """
    if not isinstance(model, nn.Sequential):
        raise ConfigError(f"split_sequential needs an nn.Sequential, got {type(model).__name__}; wrap your layers "
                          "in nn.Sequential(OrderedDict(...)) or build base and fuse by hand")
    names = [n for n, _ in model.named_children()]
    if at not in names:
        raise ConfigError(f"split point {at!r} is not a layer of the model; choose one of {names}")
    cut = names.index(at) + 1
    if cut == len(names):
        raise ConfigError(f"split point {at!r} is the last layer; the fuse part would be empty, cut earlier")
    children = list(model.named_children())
    base = nn.Sequential(OrderedDict((n, copy.deepcopy(m)) for n, m in children[:cut]))
    head = nn.Sequential(OrderedDict((n, copy.deepcopy(m)) for n, m in children[cut:]))
    return base, ConcatFuse(head)


def set_mode(module: nn.Module, training: bool) -> None:
    """`module.train(training)` unless already in that mode (the recursive call costs more than a small step)."""
    if module.training != training:
        module.train(training)


def order_parties(bases: Sequence[str], label_party: str) -> list[str]:
    return list(bases) if label_party in bases else [*bases, label_party]
