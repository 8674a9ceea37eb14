"""The label party when the fuse model runs at a separate compute party: it holds the labels and the loss only.

Three roles: data owners (bases, `DataOwner`), the compute party (fuse model and the training loop,
`SplitTrainer(loss_party=...)`), and the label party (`LabelParty`, this handler). The compute party sends the
fused outputs of a batch (`LossIns`); the label party answers with the loss and d(loss)/d(outputs) (`LossRes`).
Labels never cross the wire; the output gradient does, and it carries label information (for BCE it is
sigmoid(output) - y): label DP (randomised response, applied here before any loss) bounds what it reveals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tessera.core.errors import ConfigError, ProtocolError
from tessera.vertical.messages import InfoIns, InfoRes, LossIns, LossRes
from tessera.vertical.metrics import classification_metrics
from tessera.vertical.protections import LabelDP, randomized_response, step_generator
from tessera.vertical.trainer import LossFn


class LabelParty:
    """Answers `InfoIns` (labels per split) and `LossIns` (loss and output gradient) for one party's labels."""

    def __init__(self, name: str, loss_fn: LossFn, *, labels: Mapping[str, torch.Tensor] | None = None,
                 label_dp: LabelDP | None = None, seed: int = 0) -> None:
        self.name, self.loss_fn, self.label_dp, self.seed = name, loss_fn, label_dp, seed
        self.labels: dict[str, torch.Tensor] = dict(labels or {})
        self.received: list[type] = []  # message types seen (the tests assert what crossed)

    def add_split(self, split: str, y: torch.Tensor) -> None:
        self.labels[split] = y

    def training_labels(self) -> torch.Tensor:
        """The true labels, or their randomised response under label DP (fixed per run, drawn from the seed)."""
        y = self.labels["train"]
        if self.label_dp is None:
            return y
        k = int(y.max()) + 1 if not y.is_floating_point() else 2
        return randomized_response(y, epsilon=self.label_dp.epsilon, num_classes=max(k, 2),
                                   generator=step_generator(self.seed, 0x1AB))

    def handle(self, party: str, msg: Any) -> Any:
        if party != self.name:
            raise ProtocolError(f"message for {party!r} reached label party {self.name!r}; check the routing")
        self.received.append(type(msg))
        if isinstance(msg, InfoIns):
            return InfoRes(rows={s: (len(self.labels[s]) if s in self.labels else -1) for s in msg.splits})
        if isinstance(msg, LossIns):
            return self._loss(msg)
        raise ProtocolError(f"label party {self.name} cannot handle {type(msg).__name__}")

    def _loss(self, msg: LossIns) -> LossRes:
        if msg.split not in self.labels:
            raise ConfigError(f"label party {self.name} holds no labels for split {msg.split!r}")
        y = self.training_labels() if msg.split == "train" and msg.mode == "train" else self.labels[msg.split]
        n = len(y)
        rows = msg.rows
        if rows.dtype != torch.int64 or rows.dim() != 1 or (rows.numel() and (rows.min() < 0 or rows.max() >= n)):
            raise ProtocolError(f"rows for {self.name}/{msg.split} must be int64 positions in [0, {n})")
        if not msg.output.is_floating_point() or msg.output.shape[:1] != rows.shape:
            raise ProtocolError(f"outputs {msg.output.dtype}{tuple(msg.output.shape)} do not match {len(rows)} rows")
        if msg.mode == "eval":
            with torch.no_grad():
                loss = self.loss_fn(msg.output, y[rows])
            return LossRes(step=msg.step, loss=float(loss), metrics=classification_metrics(msg.output, y[rows]))
        out = msg.output.detach().requires_grad_(True)
        loss = self.loss_fn(out, y[rows])
        (grad,) = torch.autograd.grad(loss, out)
        return LossRes(step=msg.step, loss=float(loss.detach()), grad=grad)
