"""SplitTrainer: the label party's loop. Owners compute embeddings, the label party fuses, computes the loss,
steps its own optimiser and sends each owner d(loss)/d(embedding); owners step theirs.

Every message goes through a `Backend` (`exchange({owner: msg})`), so the loop is the same in-process and over
gRPC. Batch order, label randomisation and noise derive from (seed, epoch/step): a resumed run continues
bit-identically and, with no protections, the run equals centralised training of the composed model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tessera.core.device import DeviceSpec, Placement
from tessera.core.errors import ConfigError, ProtocolError
from tessera.core.logging import get_logger
from tessera.core.metrics import History, MetricsWriter
from tessera.runtime.backend import Backend, ClientFailure
from tessera.vertical import checkpoint as ckpt
from tessera.vertical.messages import Backward, BackwardRes, Forward, ForwardIns, InfoIns, InfoRes, LossIns, LossRes
from tessera.vertical.metrics import classification_metrics
from tessera.vertical.model import check_fuse_shapes, check_output_shape, set_mode
from tessera.vertical.owner import OptimizerFn, party_code
from tessera.vertical.protections import Protections, randomized_response, step_generator

log = get_logger(__name__)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when `monitor` (a key of the epoch record, dotted for nested) has not improved by `min_delta` for
    `patience` epochs; with `restore_best`, every party rolls back to the best epoch's state."""

    patience: int = 3
    monitor: str = "eval_loss"
    mode: str = "min"
    min_delta: float = 0.0
    restore_best: bool = True

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta


def batch_order(*, seed: int, epoch: int, n: int, shuffle: bool) -> torch.Tensor:
    """The row order of an epoch: a permutation drawn from (seed, epoch), or 0..n-1 without shuffling."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=step_generator(seed, epoch, 0x5EED))


class SplitTrainer:
    """The party holding the fuse model and running the loop: the label party, or a compute party when
    `loss_party` names the label party (which then holds only labels and loss: `tessera.vertical.label`).
    `order` lists every base owner in the order the fuse receives their embeddings; this party's own base (if
    any) is `local_base`, all other owners are reached through `backend`."""

    def __init__(self, *, fuse: nn.Module, loss_fn: LossFn | None, optimizer_fn: OptimizerFn, label_party: str,
                 order: Sequence[str], backend: Backend, local_base: nn.Module | None = None,
                 protections: Protections | None = None, seed: int = 0, output_dir: str | Path | None = None,
                 timeout: float | None = None, ledger: Any = None, loss_party: str | None = None,
                 device: DeviceSpec = None) -> None:
        if (label_party in order) != (local_base is not None):
            raise ConfigError(f"label party {label_party!r} must be in `order` exactly when it has a local base")
        if (loss_fn is None) == (loss_party is None):
            raise ConfigError("give loss_fn (the labels are here) or loss_party (the party holding labels and loss)")
        if loss_party is not None and (loss_party in order or loss_party == label_party):
            raise ConfigError(f"the label party {loss_party!r} holds only labels and loss when a compute party runs "
                              "the fuse model: give it no base and a name of its own")
        # fuse (and local base) placed once on this party's device; what crosses the wire stays on the CPU
        self.placement = Placement.of(device, what=f"device of {label_party}")
        fuse = self.placement.place(fuse)
        local_base = self.placement.place(local_base) if local_base is not None else None
        self.fuse, self.loss_fn, self.label_party, self.loss_party = fuse, loss_fn, label_party, loss_party
        self.order = list(order)
        self.owners = [p for p in self.order if p != label_party]
        self.backend, self.local_base, self.seed, self.timeout = backend, local_base, seed, timeout
        self.protections = protections or Protections()
        self.ledger = ledger  # a PrivacyLedger the owners account embedding DP in: epsilons go into each record
        params: list[nn.Parameter] = list(fuse.parameters())
        if local_base is not None:
            params += list(local_base.parameters())
        # a parameter-free fuse (SumFuse() with no head) at a label party without a base has nothing to train
        self.optimizer = optimizer_fn(params) if params else None
        self.labels: dict[str, torch.Tensor] = {}
        self.local_x: dict[str, torch.Tensor] = {}
        self.history = History()
        self.epoch = 0
        self.step = 0
        self.best: tuple[float | None, int] = (None, 0)  # (best monitored value, epochs since it)
        self.out = Path(output_dir) if output_dir is not None else None
        self.writer = MetricsWriter(self.out / "metrics.jsonl") if self.out else None
        self._snapshots: dict[str, bytes] = {}  # label-party side of early-stopping snapshots
        self._started = False

    # ------------------------------------------------------------------------------------------------ data
    def add_split(self, split: str, *, y: torch.Tensor | None = None, x: torch.Tensor | None = None) -> None:
        """Labels and (if the label party owns a base) its own features for a split, in the aligned row order."""
        if y is not None:
            self.labels[split] = y
        if x is not None:
            if self.local_base is None:
                raise ConfigError(f"{self.label_party} owns no base model; do not give it features")
            self.local_x[split] = x

    def _exchange(self, requests: Mapping[str, Any], want: type) -> dict[str, Any]:
        if not self._started:
            self.backend.start(self.owners + ([self.loss_party] if self.loss_party else []))
            self._started = True
        replies = self.backend.exchange(requests, timeout=self.timeout)
        for party, rep in replies.items():
            if isinstance(rep, ClientFailure):
                raise ProtocolError(f"data owner {party} failed ({rep.reason}); split learning needs every owner: "
                                    "fix it and resume from the last checkpoint")
            if not isinstance(rep, want):
                raise ProtocolError(f"data owner {party} replied {type(rep).__name__}, expected {want.__name__}")
        return dict(replies)

    def check(self, split: str, *, batch_size: int) -> int:
        """Before the first batch of `split`: every party holds the same number of rows (as many as there are
        labels), and one dry-run batch fits the fuse model and the loss. Raises ConfigError / ShapeMismatch naming
        the party. Returns the number of rows."""
        asked = self.owners + ([self.loss_party] if self.loss_party else [])
        info = self._exchange({o: InfoIns(splits=[split]) for o in asked}, InfoRes)
        sizes = {o: info[o].rows.get(split, -1) for o in self.owners}
        if self.local_base is not None:
            sizes[self.label_party] = len(self.local_x[split]) if split in self.local_x else -1
        labelled = self.loss_party is not None and info[self.loss_party].rows.get(split, -1) >= 0
        if labelled:
            assert self.loss_party is not None
            n = int(info[self.loss_party].rows[split])
        else:
            n = len(self.labels[split]) if split in self.labels else next(iter(sizes.values()))
        for party, rows in sizes.items():
            if rows < 0:
                raise ConfigError(f"party {party} holds no {split!r} rows; every base owner must provide them")
            if rows != n:
                has = f"the label party {self.loss_party or self.label_party} has {n} labels" if (
                    labelled or split in self.labels) else f"{next(iter(sizes))} holds {n}"
                raise ConfigError(f"party {party} holds {rows} {split!r} rows but {has}; align the rows first "
                                  "(tessera.vertical.psi.intersect)")
        if n == 0:
            raise ConfigError(f"split {split!r} has no rows")
        rows = torch.arange(min(batch_size, n, 4))
        embs = self._embed(split, rows, mode="dry", step=0, grad=False)
        out = check_fuse_shapes(embs, self.fuse, label_party=self.label_party)
        if split in self.labels and self.loss_fn is not None:
            check_output_shape(out, self.placement.move(self.labels[split][rows]), self.loss_fn,
                               label_party=self.label_party)
        return n

    def _embed(self, split: str, rows: torch.Tensor, *, mode: str, step: int, grad: bool) -> dict[str, torch.Tensor]:
        """Every party's embedding of `rows`, keyed in fuse order (remote ones as leaves when `grad`)."""
        replies = self._exchange({o: ForwardIns(step=step, split=split, rows=rows, mode=mode) for o in self.owners},
                                 Forward)
        embs: dict[str, torch.Tensor] = {}
        for p in self.order:
            if p == self.label_party:
                assert self.local_base is not None
                set_mode(self.local_base, grad)
                with torch.set_grad_enabled(grad):
                    embs[p] = self.local_base(self.placement.move(self.local_x[split][rows]))
                continue
            e = replies[p].embedding
            if replies[p].step != step or e.dim() < 1 or e.shape[0] != len(rows) or not e.is_floating_point():
                raise ProtocolError(f"data owner {p} sent an embedding {e.dtype}{tuple(e.shape)} for step "
                                    f"{replies[p].step}; expected {len(rows)} float rows for step {step}")
            if not bool(torch.isfinite(e).all()):
                raise ProtocolError(f"data owner {p} sent an embedding with NaN or Inf at step {step}; check its "
                                    "inputs and learning rate, then resume from the last checkpoint")
            e = self.placement.move(e)
            embs[p] = e.requires_grad_(True) if grad else e
        return embs

    # ------------------------------------------------------------------------------------------------ train
    def train_step(self, rows: torch.Tensor, y: torch.Tensor | None) -> float:
        step = self.step
        embs = self._embed("train", rows, mode="train", step=step, grad=True)
        set_mode(self.fuse, True)
        out = self.fuse(list(embs.values()))
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if self.loss_party is not None:  # the label party computes the loss and d(loss)/d(out)
            res = self._remote_loss(LossIns(step=step, split="train", rows=rows, output=out.detach().to("cpu")))
            if res.grad is None or res.grad.shape != out.shape or not bool(torch.isfinite(res.grad).all()):
                raise ProtocolError(f"label party {self.loss_party} sent no usable output gradient at step {step}")
            out.backward(self.placement.move(res.grad))
            loss = torch.tensor(res.loss)
        else:
            assert self.loss_fn is not None and y is not None
            loss = self.loss_fn(out, self.placement.move(y))
            loss.backward()  # type: ignore[no-untyped-call]
        if self.optimizer is not None:
            self.optimizer.step()
        grads = {}
        for o in self.owners:
            g = embs[o].grad
            assert g is not None
            if self.protections.gradient is not None:
                g = self.protections.gradient.apply(g, generator=step_generator(self.seed, step, party_code(o), 7))
            grads[o] = Backward(step=step, grad=g.to("cpu"))
        self._exchange(grads, BackwardRes)
        self.step += 1
        return float(loss.detach())

    def training_labels(self) -> torch.Tensor:
        """The labels training uses: the true ones, or their randomised response under label DP (fixed per run)."""
        y = self.labels["train"]
        dp = self.protections.label_dp
        if dp is None:
            return y
        k = int(y.max()) + 1 if not y.is_floating_point() else 2
        return randomized_response(y, epsilon=dp.epsilon, num_classes=max(k, 2),
                                   generator=step_generator(self.seed, 0x1AB))

    def fit(self, *, epochs: int, batch_size: int = 32, shuffle: bool = True, validation: str | None = None,
            early_stopping: EarlyStopping | None = None, progress: Callable[[dict[str, Any]], None] | None = None
            ) -> History:
        """Train until `epochs` epochs in total have run (continuing from `self.epoch`)."""
        if batch_size < 1:
            raise ConfigError("batch_size must be at least 1")
        if early_stopping is not None and validation is None:
            raise ConfigError("early stopping monitors validation metrics; give validation data")
        n = self.check("train", batch_size=batch_size)
        if validation is not None:
            self.check(validation, batch_size=batch_size)
        y = self.training_labels() if self.loss_party is None else None
        while self.epoch < epochs:
            start, t0 = time.perf_counter(), (self.backend.traffic.up, self.backend.traffic.down)
            perm = batch_order(seed=self.seed, epoch=self.epoch, n=n, shuffle=shuffle)
            total = 0.0
            for i in range(0, n, batch_size):
                rows = perm[i : i + batch_size]
                total += self.train_step(rows, y[rows] if y is not None else None) * len(rows)
            self.epoch += 1
            record: dict[str, Any] = {"round": self.epoch, "epoch": self.epoch, "steps": self.step,
                                      "train_loss": total / n}
            if validation is not None:
                ev = self.evaluate(validation, batch_size=max(batch_size, 256))
                record.update(eval_loss=ev.pop("loss"), eval_metrics=ev)
            if self.ledger is not None:
                record["epsilon"] = self.ledger.epsilons()
            record.update(bytes_up=self.backend.traffic.up - t0[0], bytes_down=self.backend.traffic.down - t0[1],
                          seconds=round(time.perf_counter() - start, 4))
            stop = self._early_stop(early_stopping, record)
            self.history.append(record)
            if self.writer is not None:
                self.writer.write(record)
            self.save_checkpoint()
            if progress is not None:
                progress(record)
            if stop:
                log.info("early stopping after epoch %d", self.epoch)
                break
        if early_stopping is not None and early_stopping.restore_best and self.best[0] is not None:
            ckpt.restore(self, "best")
        return self.history

    def _early_stop(self, es: EarlyStopping | None, record: dict[str, Any]) -> bool:
        if es is None:
            return False
        value: Any = record
        for part in es.monitor.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, (int, float)):
            raise ConfigError(f"early stopping monitors {es.monitor!r}, which epoch records do not hold")
        if np.isfinite(value) and es.improved(float(value), self.best[0]):  # NaN never counts as improvement
            self.best = (float(value), 0)
            if es.restore_best:
                ckpt.snapshot(self, "best")
            return False
        self.best = (self.best[0], self.best[1] + 1)
        record["epochs_without_improvement"] = self.best[1]
        return self.best[1] >= es.patience

    # ------------------------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def outputs(self, split: str, *, batch_size: int = 256) -> torch.Tensor:
        """The fused model's outputs on every row of `split` (owners embed, the label party fuses)."""
        n = self.check(split, batch_size=batch_size)
        set_mode(self.fuse, False)
        outs = []
        for b, i in enumerate(range(0, n, batch_size)):
            rows = torch.arange(i, min(i + batch_size, n))
            outs.append(self.fuse(list(self._embed(split, rows, mode="eval", step=b, grad=False).values())))
        return torch.cat(outs).to("cpu")

    def _remote_loss(self, msg: LossIns) -> LossRes:
        assert self.loss_party is not None
        res: LossRes = self._exchange({self.loss_party: msg}, LossRes)[self.loss_party]
        if res.step != msg.step:
            raise ProtocolError(f"label party {self.loss_party} answered step {res.step} for step {msg.step}")
        return res

    def evaluate(self, split: str, *, batch_size: int = 256) -> dict[str, float]:
        """Loss and metrics (accuracy, AUC for binary tasks) on the labelled split `split`."""
        if self.loss_party is not None:
            out = self.outputs(split, batch_size=batch_size)
            res = self._remote_loss(LossIns(step=self.step, split=split, rows=torch.arange(len(out)), output=out,
                                            mode="eval"))
            return {"loss": res.loss, **res.metrics}
        if split not in self.labels or self.loss_fn is None:
            raise ConfigError(f"the label party has no labels for split {split!r}")
        out, y = self.outputs(split, batch_size=batch_size), self.labels[split]
        return {"loss": float(self.loss_fn(out, y)), **classification_metrics(out, y)}

    # ------------------------------------------------------------------------------------------------ state
    def save_checkpoint(self) -> None:
        if self.out is not None:
            ckpt.save(self, self.out)

    def resume(self) -> bool:
        """Load the checkpoint in output_dir (and every owner's matching state); returns whether there was one."""
        return self.out is not None and ckpt.load(self, self.out)

    def close(self) -> None:
        """Release the backend (a gRPC backend's server and streams); the trainer can start it again."""
        if self._started:
            self.backend.close()
            self._started = False
