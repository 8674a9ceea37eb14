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
