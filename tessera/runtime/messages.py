"""The messages of a horizontal round. Other layers define theirs the same way (frozen dataclass + @message)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tessera.core.serde import message
from tessera.core.types import Params, Scalar


@message
@dataclass(frozen=True)
class FitIns:
    """Server -> client: train from `params` with `config` (local_epochs, seed, proximal_mu, ...).

    `extras` carries strategy-specific tensors (SCAFFOLD's server control variate, ...), keyed by name.
    """

    round: int
    params: Params
    config: dict[str, Scalar] = field(default_factory=dict)
    extras: dict[str, Params] = field(default_factory=dict)


@message
@dataclass(frozen=True)
class FitRes:
    """Client -> server: the locally trained params, how many examples they saw, and training metrics.

    `extras` carries strategy-specific tensors (SCAFFOLD's control-variate delta, ...), keyed by name.
    """

    params: Params
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Params] = field(default_factory=dict)


@message
@dataclass(frozen=True)
class EvaluateIns:
    round: int
    params: Params
    config: dict[str, Scalar] = field(default_factory=dict)


@message
@dataclass(frozen=True)
class EvaluateRes:
    loss: float
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@message
@dataclass(frozen=True)
class ErrorRes:
    """Client -> server: the client could not serve the request. Carries the error's type and a short reason."""

    kind: str
    reason: str


def tensor_bytes(params: Params) -> int:
    return sum(t.numel() * t.element_size() for t in params.values() if isinstance(t, torch.Tensor))
