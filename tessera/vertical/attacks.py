"""Label inference from returned gradients: what an honest-but-curious data owner learns about the labels.

For binary labels, d(loss)/d(embedding) of a row is (p - y) times a direction set by the fuse model: positives
and negatives point in opposite directions (the *direction* attack: cosine with one row whose label the owner
knows) and, with imbalanced classes, differ in norm (the *norm* attack). Both are from Li et al., "Label Leakage
and Protection in Two-party Split Learning" (ICLR 2022). `GradientSpy` wraps an owner's handler and records
what it receives; `attack_auc` scores an attack (0.5 = chance, 1.0 = every label revealed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tessera.vertical.messages import Backward, ForwardIns
from tessera.vertical.metrics import binary_auc


def norm_scores(grads: torch.Tensor) -> np.ndarray:
    """Per-row L2 norm of the returned gradients (larger norm -> minority class, typically positive)."""
    return grads.reshape(len(grads), -1).norm(dim=1).double().numpy()  # type: ignore[no-any-return]


def direction_scores(grads: torch.Tensor, *, reference: int) -> np.ndarray:
    """Cosine similarity of each row's gradient with the gradient of row `reference` (a label the owner knows)."""
    flat = grads.reshape(len(grads), -1).double()
    ref = flat[reference]
    cos = flat @ ref / (flat.norm(dim=1) * ref.norm() + 1e-30)
    return cos.numpy()  # type: ignore[no-any-return]


def attack_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC of the attack's scores against the true labels, oriented in the attacker's favour (>= 0.5)."""
    auc = binary_auc(scores, labels)
    return max(auc, 1.0 - auc)


class GradientSpy:
    """Wraps a data owner's handler; records the rows of each training step and the gradient it gets back."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._rows: dict[int, torch.Tensor] = {}
        self.rows: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []

    def handle(self, party: str, msg: Any) -> Any:
        if isinstance(msg, ForwardIns) and msg.mode == "train":
            self._rows[msg.step] = msg.rows.clone()
        if isinstance(msg, Backward):
            self.rows.append(self._rows.pop(msg.step))
            self.grads.append(msg.grad.detach().clone())
        return self.inner.handle(party, msg)

    def observed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row indices, gradients) of every training step seen so far, concatenated."""
        return torch.cat(self.rows), torch.cat(self.grads)

    def report(self, labels: torch.Tensor, *, steps: slice | None = None) -> dict[str, float]:
        """Norm and direction attack AUC over the recorded steps (`steps` selects a range, e.g. the first epoch).
        The direction attack's reference is the first recorded positive row (the owner knows one label)."""
        sel = steps or slice(None)
        rows, grads = torch.cat(self.rows[sel]), torch.cat(self.grads[sel])
        y = labels.reshape(-1)[rows].long().numpy()
        ref = int(np.flatnonzero(y == 1)[0])
        return {"norm_attack_auc": attack_auc(norm_scores(grads), y),
                "direction_attack_auc": attack_auc(direction_scores(grads, reference=ref), y)}


def spy_on(model: Any) -> GradientSpy:
    """Make every data owner of an in-process `SLModel` record its gradients (for attack experiments)."""
    from tessera.core.errors import ConfigError
    from tessera.runtime.backend import InProcessBackend

    backend = model.backend
    if not isinstance(backend, InProcessBackend):
        raise ConfigError("spy_on needs an SLModel on the in-process backend; on a real deployment the owner "
                          "wraps its own handler in GradientSpy")
    spy = GradientSpy(backend.handler)
    backend.handler = spy
    return spy


def inversion_attack(emb_aux: torch.Tensor, x_aux: torch.Tensor, emb_target: torch.Tensor, x_target: torch.Tensor,
                     *, seed: int = 0, hidden: int = 64, steps: int = 400, lr: float = 0.02) -> float:
    """Model inversion by the party that receives embeddings: train a decoder embedding -> features on auxiliary
    rows whose features it knows (`emb_aux`, `x_aux`), then reconstruct the target rows' features.

    Returns the reconstruction R^2 on the targets, averaged over feature columns and floored at 0: 1.0 = the
    owner's features recovered exactly, 0.0 = no better than guessing each column's auxiliary mean."""
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    d_in, d_out = emb_aux[0].numel(), x_aux[0].numel()
    dec = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))
    with torch.no_grad():
        for p in dec.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(p.shape[-1], 1)) ** 0.5)
    e_aux, t_aux = emb_aux.reshape(len(emb_aux), -1).float(), x_aux.reshape(len(x_aux), -1).float()
    opt = torch.optim.Adam(dec.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = ((dec(e_aux) - t_aux) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        guess = dec(emb_target.reshape(len(emb_target), -1).float())
        truth = x_target.reshape(len(x_target), -1).float()
        sse = ((guess - truth) ** 2).sum(dim=0)
        sst = ((truth - t_aux.mean(dim=0)) ** 2).sum(dim=0)
        r2 = (1 - sse / sst.clamp_min(1e-12)).mean()
    return max(float(r2), 0.0)
