"""Small built-in models for demos, tests and benchmarks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn


class MLP(nn.Sequential):
    """in_features -> hidden... (ReLU) -> num_classes. Layer names are fc0, act0, fc1, ... for split points."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (64,)) -> None:
        layers: list[tuple[str, nn.Module]] = []
        width = in_features
        for i, h in enumerate(hidden):
            layers += [(f"fc{i}", nn.Linear(width, h)), (f"act{i}", nn.ReLU())]
            width = h
        layers.append((f"fc{len(hidden)}", nn.Linear(width, num_classes)))
        super().__init__(OrderedDict(layers))
        self.config = {"in_features": in_features, "num_classes": num_classes, "hidden": list(hidden)}
