"""Vertical split learning: parties hold different columns of the same rows, one party holds the labels.

The array API is `tessera.SLModel` (tessera/api.py); `SplitModel`, `DataOwner` (the owners' message handler),
`SplitTrainer` (the label party's loop) and `psi.intersect` (private row alignment) are the parts it is built from.

Names are loaded on first use, so that PSI's worker processes (tessera.vertical.psi_curve) start without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tessera.vertical import psi
    from tessera.vertical.model import ConcatFuse, SplitModel, SumFuse, split_sequential
    from tessera.vertical.owner import DataOwner, OwnerGroup
    from tessera.vertical.protections import EmbeddingDP, GradientPerturbation, LabelDP, Protections
    from tessera.vertical.trainer import EarlyStopping, SplitTrainer

_LAZY = {
    "ConcatFuse": "model", "SplitModel": "model", "SumFuse": "model", "split_sequential": "model",
    "DataOwner": "owner", "OwnerGroup": "owner", "EmbeddingDP": "protections",
    "GradientPerturbation": "protections", "LabelDP": "protections", "Protections": "protections",
    "EarlyStopping": "trainer", "SplitTrainer": "trainer",
}


def __getattr__(name: str) -> Any:
    if name == "psi":
        return importlib.import_module("tessera.vertical.psi")
    if name in _LAZY:
        return getattr(importlib.import_module(f"tessera.vertical.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tessera.vertical' has no attribute {name!r}")


__all__ = [
    "ConcatFuse", "DataOwner", "EarlyStopping", "EmbeddingDP", "GradientPerturbation", "LabelDP", "OwnerGroup",
    "Protections", "SplitModel", "SplitTrainer", "SumFuse", "psi", "split_sequential",
]
