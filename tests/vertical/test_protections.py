"""Protections: off by default (the off switch equals no protection bit for bit), correct maths, and what each
buys against label inference from gradients (the attack test)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import tessera
from tessera.vertical import ConcatFuse, EmbeddingDP, GradientPerturbation, LabelDP, Protections
from tessera.vertical.attacks import spy_on
from tessera.vertical.protections import clip_rows, randomized_response

from .helpers import make_data, make_split


def fit(protections: Protections | None, **kw: Any) -> Any:
    x, y = make_data()
    bases, fuse = make_split()
    sl = tessera.SLModel(base_models=bases, fuse_model=fuse, label_party="alice", loss_fn=nn.BCEWithLogitsLoss(),
                         optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1), protections=protections, **kw)
    sl.fit(x=x, y=y, epochs=2, batch_size=16)
    return sl


def params(sl: Any) -> dict[str, torch.Tensor]:
    return dict(sl.model.state_dict())


def test_off_by_default_and_off_switch_is_exact() -> None:
    ref = params(fit(None))
    for prot in (Protections(),
                 Protections(embedding_dp=EmbeddingDP(clip_norm=1e9, noise_multiplier=0.0),
                             gradient=GradientPerturbation(clip_norm=1e9, noise_multiplier=0.0))):
        got = params(fit(prot))
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    on = params(fit(Protections(embedding_dp=EmbeddingDP(clip_norm=0.5, noise_multiplier=0.5))))
    assert not all(torch.equal(ref[k], on[k]) for k in ref)


def test_clip_rows_against_hand_computed_norms() -> None:
    t = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    torch.testing.assert_close(clip_rows(t, clip_norm=1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


def test_randomized_response_keeps_labels_at_the_promised_rate() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (40000,), generator=g)
    noisy = randomized_response(y, epsilon=1.0, num_classes=4, generator=g)
    keep = math.e / (math.e + 3)
    assert float((noisy == y).float().mean()) == pytest.approx(keep, abs=0.01)
    assert set(noisy.tolist()) == {0, 1, 2, 3}


def test_embedding_dp_is_accounted_in_a_ledger() -> None:
    class Ledger:
        def __init__(self) -> None:
            self.calls: list[tuple[str, float, float, int]] = []

        def step(self, party: str, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
            self.calls.append((party, noise_multiplier, sample_rate, steps))

        def epsilons(self) -> dict[str, float]:
            return {}

    ledger = Ledger()
    fit(Protections(embedding_dp=EmbeddingDP(clip_norm=1.0, noise_multiplier=1.1)), ledger=ledger)
    # 60 rows, batch 16: 4 steps per epoch (16, 16, 16, 12 rows), 2 epochs, bob only (alice's base is local)
    assert ledger.calls == [("bob", 1.1, r / 60, 1) for r in (16, 16, 16, 12)] * 2


def test_embedding_dp_epsilon_matches_opacus_accountant() -> None:
    from opacus.accountants import RDPAccountant

    from tessera.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger("rdp", delta=1e-5)
    sl = fit(Protections(embedding_dp=EmbeddingDP(clip_norm=1.0, noise_multiplier=1.1)), ledger=ledger)
    oracle = RDPAccountant()
    for _ in range(2):
        for rows in (16, 16, 16, 12):
            oracle.step(noise_multiplier=1.1, sample_rate=rows / 60)
    expected = oracle.get_epsilon(delta=1e-5)
    assert ledger.epsilon("bob") == pytest.approx(expected, rel=1e-9)
    assert sl.trainer.history.last["epsilon"] == {"bob": pytest.approx(expected, rel=1e-9)}


def attack_run(protections: Protections | None) -> tuple[dict[str, float], float]:
    """Bob (a data owner) reads the gradients he gets back during 2 epochs on 10%-positive labels."""
    g = torch.Generator().manual_seed(0)
    n = 800
    xa, xb = torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)
    score = xa[:, 0] + xb[:, 0] + 0.5 * torch.randn(n, generator=g)
    y = (score > score.quantile(0.9)).float().unsqueeze(1)
    torch.manual_seed(0)
    bases: dict[str, nn.Module] = {p: nn.Sequential(nn.Linear(5, 4), nn.Tanh()) for p in ("alice", "bob")}
    fuse = ConcatFuse(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1)))
    sl = tessera.SLModel(base_models=bases, fuse_model=fuse, label_party="alice", loss_fn=nn.BCEWithLogitsLoss(),
                         optimizer_fn=lambda p: torch.optim.Adam(p, lr=0.01), protections=protections)
    spy = spy_on(sl)
    sl.fit(x={"alice": xa, "bob": xb}, y=y, epochs=2, batch_size=32)
    return spy.report(y), sl.evaluate(x={"alice": xa, "bob": xb}, y=y)["auc"]


@pytest.mark.slow
def test_label_inference_attack_and_what_each_protection_buys() -> None:
    none, auc_none = attack_run(None)
    clip, _ = attack_run(Protections(gradient=GradientPerturbation(clip_norm=1e-4)))
    noise, _ = attack_run(Protections(gradient=GradientPerturbation(clip_norm=1e-3, noise_multiplier=1.0)))
    rr, auc_rr = attack_run(Protections(label_dp=LabelDP(epsilon=1.0)))
    emb, _ = attack_run(Protections(embedding_dp=EmbeddingDP(clip_norm=1.0, noise_multiplier=0.5)))
    # unprotected: both attacks recover most labels
    assert none["norm_attack_auc"] > 0.8 and none["direction_attack_auc"] > 0.8 and auc_none > 0.8
    # clipping every row to the same norm defeats the norm attack, not the direction attack
    assert clip["norm_attack_auc"] < 0.6 and clip["direction_attack_auc"] > 0.8
    # noise on the returned gradients blunts both
    assert noise["norm_attack_auc"] < none["norm_attack_auc"] - 0.2
    assert noise["direction_attack_auc"] < none["direction_attack_auc"] - 0.15
    # randomised response: the gradients reveal noisy labels only; the model pays for it
    assert rr["direction_attack_auc"] < none["direction_attack_auc"] - 0.2 and auc_rr < auc_none
    # embedding DP protects bob's features, not alice's labels
    assert emb["direction_attack_auc"] > 0.8
