"""User-defined models for the export tests (importable, so a bundle can name them as `module:Class`)."""

from dataclasses import dataclass

import torch
from torch import nn

from tessera.export import record_init


@dataclass
class TowerConfig:
    features: int
    width: int = 8
    classes: int = 3


class Tower(nn.Module):
    """A user model exposing its constructor kwargs as a dataclass `config`, with a buffer and two outputs."""

    def __init__(self, features: int, width: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.config = TowerConfig(features, width, classes)
        self.body = nn.Sequential(nn.Linear(features, width), nn.Tanh())
        self.norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self.norm(self.body(x))
        logits = self.head(h) if scale is None else self.head(h) * scale
        return {"logits": logits, "embedding": h}


class Bare(nn.Module):
    """A user model that does not say how it was constructed."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(features, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)



@record_init
class Recorded(nn.Module):
    """A user model without `config`: its constructor arguments are recorded by the decorator."""

    def __init__(self, features: int, hidden: int = 4, head: nn.Module | None = None) -> None:
        super().__init__()
        self.body = nn.Linear(features, hidden)
        self.head = head if head is not None else nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


class RecordedChild(Recorded):
    """Subclass of a decorated class that is not decorated itself: its own arguments are unknown."""

    def __init__(self, width: int) -> None:
        super().__init__(width, hidden=3)
