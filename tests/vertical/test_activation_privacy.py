"""Activation privacy, measured (seeded): model inversion succeeds against unprotected embeddings and its success
drops monotonically, by a margin, as embedding DP noise or the distance-correlation penalty grows; label
inference from gradients drops likewise as the noise on the returned gradients grows."""

from __future__ import annotations

import itertools

import pytest
import torch

from tessera.vertical.attacks import inversion_attack
from tessera.vertical.audit import measure, synthetic_task
from tessera.vertical.protections import (
    Decorrelation,
    EmbeddingDP,
    GradientPerturbation,
    Protections,
    distance_correlation,
)

MARGIN = 0.05


def test_distance_correlation_against_known_cases() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    assert float(distance_correlation(x, 2 * x + 1)) == pytest.approx(1.0, abs=1e-6)  # similarity transform
    assert float(distance_correlation(x, torch.randn(200, 2, generator=g))) < 0.25  # independent
    z = x.clone().requires_grad_(True)
    distance_correlation(x, z).backward()
    assert z.grad is not None and bool(torch.isfinite(z.grad).all())


def test_inversion_attack_recovers_an_invertible_embedding_and_not_noise() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 5, generator=g)
    emb = x @ torch.randn(5, 8, generator=g)  # linear and injective: fully recoverable
    assert inversion_attack(emb[:200], x[:200], emb[200:], x[200:]) > 0.95
    noise = torch.randn(400, 8, generator=g)
    assert inversion_attack(noise[:200], x[:200], noise[200:], x[200:]) < 0.05


def _strictly_weaker(r2: list[float]) -> bool:
    """Each stronger protection lowers the attack's success by MARGIN, until it has nothing left (0)."""
    return all(b <= a - MARGIN or a == b == 0.0 for a, b in itertools.pairwise(r2)) and r2[0] > r2[-1]


@pytest.mark.slow
def test_inversion_success_drops_monotonically_with_protection_strength() -> None:
    task = synthetic_task()
    plain = measure("none", Protections(), task)
    assert plain.inversion_r2 > 0.4 and plain.accuracy > 0.8  # the attack works on the unprotected model
    dp = [measure(f"dp {m}", Protections(embedding_dp=EmbeddingDP(clip_norm=1.0, noise_multiplier=m)), task)
          for m in (0.02, 0.05, 0.2)]
    assert _strictly_weaker([plain.inversion_r2, *(m.inversion_r2 for m in dp)])
    dcor = [measure(f"dcor {a}", Protections(decorrelation=Decorrelation(a)), task) for a in (1.0, 4.0)]
    assert _strictly_weaker([plain.inversion_r2, *(m.inversion_r2 for m in dcor)])


@pytest.mark.slow
def test_label_inference_drops_monotonically_with_gradient_noise() -> None:
    task = synthetic_task()
    auc = [measure(f"grad {m}", Protections(gradient=GradientPerturbation(clip_norm=1e-3, noise_multiplier=m))
                   if m else Protections(), task).label_auc for m in (0.0, 1.0, 4.0)]
    assert auc[0] > 0.95  # the unprotected owner reads the labels off the gradients
    assert all(b <= a - MARGIN for a, b in itertools.pairwise(auc)), auc
