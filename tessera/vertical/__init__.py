"""Vertical split learning: parties hold different columns of the same rows, one party holds the labels.

The array API is `tessera.SLModel` (tessera/api.py); `SplitModel`, `DataOwner` (the owners' message handler), `SplitTrainer` (the label
party's loop) and `psi.intersect` (private row alignment) are the parts it is built from.
"""

from tessera.vertical import psi
from tessera.vertical.model import ConcatFuse, SplitModel, SumFuse, split_sequential
from tessera.vertical.owner import DataOwner, OwnerGroup
from tessera.vertical.protections import EmbeddingDP, GradientPerturbation, LabelDP, Protections
from tessera.vertical.trainer import EarlyStopping, SplitTrainer

__all__ = [
    "ConcatFuse", "DataOwner", "EarlyStopping", "EmbeddingDP", "GradientPerturbation", "LabelDP", "OwnerGroup",
    "Protections", "SplitModel", "SplitTrainer", "SumFuse", "psi", "split_sequential",
]
