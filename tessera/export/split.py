"""Split (vertical) models as one inference module, and who may export what.

`SplitInference` composes each party's base with the fuse model: ``fuse([base_p(x_p) for p in parties])``, the
forward of split learning without the wire. It takes the per-party inputs as keyword arguments
(``model(alice=xa, bob=xb)``), as one dict, or as a list in party order.

Only the label party holds the fuse model, so only it may export the fused inference model; a data owner may
export its own base alone (``save_bundle(base, path, example_inputs=x, party="bob")``), for its side of
inference or to hand it to the label party. These checks take plain modules and party names, so they do not
depend on how a split trainer stores them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tessera.core.errors import ExportError


class SplitInference(nn.Module):
    """The fused inference model of a split network: one base per party, then the fuse model.

    >>> model = SplitInference(bases={"alice": base_a, "bob": base_b}, fuse=fuse, label_party="alice")
    >>> logits = model(alice=x_alice, bob=x_bob)
    """

    def __init__(self, *, bases: Mapping[str, nn.Module], fuse: nn.Module, label_party: str) -> None:
        super().__init__()
        if not bases:
            raise ExportError("a split model needs at least one base model")
        if not isinstance(label_party, str) or not label_party:
            raise ExportError(f"label_party must be a party name, got {label_party!r}")
        self.bases = nn.ModuleDict(dict(bases))
        self.fuse = fuse
        self.label_party = label_party

    @property
    def parties(self) -> list[str]:
        return list(self.bases.keys())

    def forward(self, *args: Any, **inputs: torch.Tensor) -> Any:
        if args:
            if inputs or len(args) != 1:
                raise ExportError("give the per-party inputs as keywords, one dict, or one list in party order")
            inputs = _per_party(args[0], self.parties)
        missing = [p for p in self.parties if p not in inputs]
        extra = [p for p in inputs if p not in self.bases]
        if missing or extra:
            raise ExportError(f"split inference needs one input per party {self.parties}; missing {missing}, "
                              f"unexpected {extra}")
        return self.fuse([self.bases[p](inputs[p]) for p in self.parties])


def _per_party(x: Any, parties: list[str]) -> dict[str, torch.Tensor]:
    if isinstance(x, Mapping):
        return dict(x)
    if isinstance(x, Sequence) and len(x) == len(parties):
        return dict(zip(parties, x, strict=True))
    raise ExportError(f"split inference needs a dict or a list of {len(parties)} inputs (parties {parties})")


def fused_model(*, base_models: Mapping[str, nn.Module], fuse_model: nn.Module, label_party: str,
                party: str) -> SplitInference:
    """The fused inference model, if `party` (who asks) is the label party; a data owner is refused."""
    if party != label_party:
        owner = party in base_models
        raise ExportError(
            f"party {party!r} may not export the fused inference model: only the label party {label_party!r} "
            "holds the fuse model. "
            + (f"A data owner can export its own base alone: save_bundle(base_models[{party!r}], path, "
               f"example_inputs=..., party={party!r})." if owner else f"{party!r} is not a party of this model."))
    return SplitInference(bases=base_models, fuse=fuse_model, label_party=label_party)


def split_parts(obj: Any) -> tuple[Mapping[str, nn.Module], nn.Module, str] | None:
    """(base_models, fuse_model, label_party) of a split trainer such as SLModel, by its public attributes."""
    if all(hasattr(obj, a) for a in ("base_models", "fuse_model", "label_party")) and not isinstance(obj, nn.Module):
        return obj.base_models, obj.fuse_model, obj.label_party
    return None
