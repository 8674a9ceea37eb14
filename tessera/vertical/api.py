"""SLModel: the array API for vertical split learning, a thin layer over DataOwner / SplitTrainer / a Backend."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tessera.core.errors import ConfigError
from tessera.core.metrics import History
from tessera.core.types import as_tensor
from tessera.runtime.backend import Backend, Handler, InProcessBackend
from tessera.vertical.metrics import plot_split
from tessera.vertical.model import SplitModel
from tessera.vertical.owner import DataOwner, OptimizerFn, OwnerGroup
from tessera.vertical.protections import Protections
from tessera.vertical.trainer import EarlyStopping, LossFn, SplitTrainer

Arrays = Mapping[str, Any]


class SLModel:
    """Split learning over parties that hold different columns of the same (aligned) rows.

    Each party in `base_models` runs its base on its own columns; `label_party` holds the labels and `fuse_model`,
    whose forward receives the list of embeddings in the order of `base_models`. With no protections, training is
    numerically the same as training `SplitModel(base_models, fuse_model)` on the joined data.

    All parties live in this process (simulation): the owners' handlers are reached through `backend(handler)`,
    by default `InProcessBackend(handler)` (e.g. `backend=lambda h: InProcessBackend(h, max_workers=2)`). For
    parties in separate processes use `DataOwner` at each owner and `SplitTrainer` at the label party.

    >>> sl = SLModel(base_models={"alice": nn.Linear(10, 4), "bob": nn.Linear(20, 4)},
    ...              fuse_model=ConcatFuse(nn.Linear(8, 1)), label_party="alice",
    ...              loss_fn=nn.BCEWithLogitsLoss(), optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1))
    >>> history = sl.fit(x={"alice": xa, "bob": xb}, y=y, epochs=5, batch_size=32)
    """

    def __init__(self, *, base_models: Mapping[str, nn.Module], fuse_model: nn.Module, label_party: str,
                 loss_fn: LossFn, optimizer_fn: OptimizerFn, seed: int = 0, protections: Protections | None = None,
                 output_dir: str | Path | None = None, backend: Callable[[Handler], Backend] | None = None,
                 ledger: Any = None) -> None:
        self.model = SplitModel(base_models, fuse_model, label_party=label_party)
        self.protections = protections or Protections()
        self.seed = seed
        self.output_dir = Path(output_dir) if output_dir is not None else None
        dp = self.protections.embedding_dp
        self.owners = {p: DataOwner(p, self.model.bases[p], optimizer_fn, embedding_dp=dp, seed=seed, ledger=ledger,
                                    state_dir=self.output_dir / "parties" / p if self.output_dir else None)
                       for p in self.model.owners}
        handler = OwnerGroup(self.owners.values())
        self.backend = backend(handler) if backend is not None else InProcessBackend(handler)
        local = dict(self.model.bases.items()).get(label_party)
        self.trainer = SplitTrainer(fuse=self.model.fuse, loss_fn=loss_fn, optimizer_fn=optimizer_fn,
                                    label_party=label_party, order=list(self.model.bases), backend=self.backend,
                                    local_base=local, protections=self.protections, seed=seed,
                                    output_dir=self.output_dir, ledger=ledger)

    @property
    def base_models(self) -> dict[str, nn.Module]:
        return dict(self.model.bases.items())

    @property
    def fuse_model(self) -> nn.Module:
        return self.model.fuse

    @property
    def label_party(self) -> str:
        return self.model.label_party

    def _give(self, split: str, x: Arrays, y: Any | None) -> None:
        """Hand each party its columns of `split` (in simulation the arrays never leave their owner object)."""
        missing = [p for p in self.model.bases if p not in x]
        extra = [p for p in x if p not in self.model.bases]
        if missing or extra:
            raise ConfigError(f"x must hold one array per base owner {list(self.model.bases)}: missing party "
                              f"{missing}, unknown {extra}")
        for p in self.model.bases:
            xs = as_tensor(x[p], what=f"x[{p}]")
            if p in self.owners:
                self.owners[p].add_split(split, xs)
            else:
                self.trainer.add_split(split, x=xs)
        if y is not None:
            ys = as_tensor(y, what="y")
            self.trainer.add_split(split, y=ys)

    def fit(self, *, x: Arrays, y: Any, epochs: int, batch_size: int = 32, shuffle: bool = True,
            validation_data: tuple[Arrays, Any] | None = None, early_stopping: EarlyStopping | None = None,
            resume: bool = False, progress: Callable[[dict[str, Any]], None] | None = None) -> History:
        """Train `epochs` more epochs; with `resume=True` continue the checkpoint in output_dir up to `epochs` in
        total. Shapes are checked on one dry-run batch before any training."""
        if epochs < 1:
            raise ConfigError("epochs must be at least 1")
        self._give("train", x, y)
        if validation_data is not None:
            self._give("valid", *validation_data)
        target = epochs
        if resume:
            if self.output_dir is None:
                raise ConfigError("resume=True needs output_dir, where the checkpoint lives")
            self.trainer.resume()
        else:
            target = self.trainer.epoch + epochs
        history = self.trainer.fit(epochs=target, batch_size=batch_size, shuffle=shuffle,
                                   validation="valid" if validation_data is not None else None,
                                   early_stopping=early_stopping, progress=progress)
        if self.output_dir is not None:
            plot_split(history, self.output_dir)
        return history

    def evaluate(self, *, x: Arrays, y: Any, batch_size: int = 256) -> dict[str, float]:
        """Loss, accuracy (and AUC for binary tasks) on new aligned rows: owners embed, the label party fuses."""
        self._give("test", x, y)
        return self.trainer.evaluate("test", batch_size=batch_size)

    def predict(self, *, x: Arrays, batch_size: int = 256) -> torch.Tensor:
        """The composed model's outputs on new aligned rows (one array per base owner)."""
        self._give("predict", x, None)
        return self.trainer.outputs("predict", batch_size=batch_size)

    def close(self) -> None:
        """Release the backend (nothing to release in-process)."""
        self.trainer.close()
