"""Protections for split learning, each off by default: the maths as pure functions, configs as dataclasses.

- `EmbeddingDP` (at each data owner): clip each row's embedding to L2 norm `clip_norm`, add Gaussian noise of
  std `noise_multiplier * clip_norm`. Protects the owner's features from the label party.
- `LabelDP` (at the label party): randomised response on the training labels with parameter `epsilon`
  (epsilon-label-DP). Protects labels from data owners who read the returned gradients.
- `GradientPerturbation` (at the label party): clip each row of d(loss)/d(embedding) to `clip_norm`, optionally
  add Gaussian noise of std `noise_multiplier * clip_norm` before it is sent back. Clipping alone hides gradient
  norms (the norm attack) but not directions; noise hides both, at a cost in accuracy.
- `Decorrelation` (at each data owner): adds `alpha * dCor(x, embedding)` (sample distance correlation of the
  batch's features and the embedding it releases, as in NoPeek, Vepakomma et al. 2019) to the owner's loss, so
  the base learns embeddings that carry less of its raw features. An empirical defence: no formal guarantee.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tessera.core.errors import ConfigError


def clip_rows(t: torch.Tensor, *, clip_norm: float) -> torch.Tensor:
    """Scale each row (dim 0) of `t` so its L2 norm is at most `clip_norm` (differentiable)."""
    if clip_norm <= 0:
        raise ConfigError(f"clip_norm must be positive, got {clip_norm}")
    flat = t.reshape(t.shape[0], -1)
    norms = flat.norm(dim=1, keepdim=True)
    factor = torch.clamp(clip_norm / (norms + 1e-12), max=1.0)
    return (flat * factor).reshape(t.shape)


def gaussian_like(t: torch.Tensor, *, std: float, generator: torch.Generator) -> torch.Tensor:
    # drawn on the CPU generator, then moved: the same noise whichever device the party trains on
    return torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) * std


def randomized_response(y: torch.Tensor, *, epsilon: float, num_classes: int,
                        generator: torch.Generator) -> torch.Tensor:
    """k-ary randomised response: keep each label with probability e^eps / (e^eps + k - 1), else replace it by one
    of the other k - 1 classes uniformly. Works on integer class labels or {0, 1} float labels (same dtype out)."""
    if epsilon <= 0:
        raise ConfigError(f"label DP epsilon must be positive, got {epsilon}")
    if num_classes < 2:
        raise ConfigError("randomised response needs at least 2 classes")
    keep_p = math.exp(epsilon) / (math.exp(epsilon) + num_classes - 1)
    labels = y.long()
    keep = torch.rand(labels.shape, generator=generator) < keep_p
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    flipped = (labels + shift) % num_classes
    return torch.where(keep, labels, flipped).to(y.dtype)


@dataclass(frozen=True)
class EmbeddingDP:
    """Clip + Gaussian noise on each row of an owner's embedding before it leaves the owner."""

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if self.clip_norm <= 0 or self.noise_multiplier < 0:
            raise ConfigError("EmbeddingDP needs clip_norm > 0 and noise_multiplier >= 0")

    def apply(self, embedding: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        clipped = clip_rows(embedding, clip_norm=self.clip_norm)
        if self.noise_multiplier == 0:
            return clipped
        return clipped + gaussian_like(clipped, std=self.noise_multiplier * self.clip_norm, generator=generator)


@dataclass(frozen=True)
class LabelDP:
    """Randomised response with parameter `epsilon` on the training labels, drawn once per fit."""

    epsilon: float

    def __post_init__(self) -> None:
        if self.epsilon <= 0:
            raise ConfigError("LabelDP epsilon must be positive (smaller = more private)")


@dataclass(frozen=True)
class GradientPerturbation:
    """Per-row clipping of the gradients returned to owners, plus optional Gaussian noise."""

    clip_norm: float
    noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        if self.clip_norm <= 0 or self.noise_multiplier < 0:
            raise ConfigError("GradientPerturbation needs clip_norm > 0 and noise_multiplier >= 0")

    def apply(self, grad: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        clipped = clip_rows(grad, clip_norm=self.clip_norm)
        if self.noise_multiplier == 0:
            return clipped
        return clipped + gaussian_like(clipped, std=self.noise_multiplier * self.clip_norm, generator=generator)


def _centred_distances(t: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(t.reshape(len(t), -1).double(), t.reshape(len(t), -1).double())
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation of the rows of `x` and `z` (Szekely et al. 2007): 0 when independent, 1 when
    one is a similarity transform of the other. Differentiable in both; float64 scalar."""
    a, b = _centred_distances(x), _centred_distances(z)
    cov, vx, vz = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return torch.sqrt(torch.clamp(cov, min=0.0) / torch.sqrt(vx * vz + 1e-24) + 1e-12)


@dataclass(frozen=True)
class Decorrelation:
    """An owner-side penalty `alpha * distance_correlation(features, embedding)` added to each training step."""

    alpha: float

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ConfigError("Decorrelation alpha must be >= 0 (0 = off, larger = less of the features released)")


@dataclass(frozen=True)
class Protections:
    """Which protections a split job uses; the default (all None) is plain split learning."""

    embedding_dp: EmbeddingDP | None = None
    label_dp: LabelDP | None = None
    gradient: GradientPerturbation | None = None
    decorrelation: Decorrelation | None = None

    @property
    def any(self) -> bool:
        return any(p is not None for p in (self.embedding_dp, self.label_dp, self.gradient, self.decorrelation))


def step_generator(seed: int, *parts: int) -> torch.Generator:
    """A generator seeded from (seed, parts...): a step's noise is the same on resume and on any backend."""
    import numpy as np

    s = int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])
    return torch.Generator().manual_seed(s)
