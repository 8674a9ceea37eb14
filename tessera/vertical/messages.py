"""The messages between the label party (coordinator) and the data owners in split learning.

All are frozen `@message` dataclasses, so every backend (in-process, Ray, gRPC) carries them unchanged. Rows are
always positions in the *aligned* row order both sides agreed on (PSI output): raw IDs never travel.

Exchange pattern of one training step (label party -> owner, owner -> label party)::

    ForwardIns(step, split, rows, mode="train")  ->  Forward(step, embedding)
    Backward(step, grad)                          ->  BackwardRes(step)

Evaluation/prediction uses `ForwardIns(mode="eval")` (no graph is kept, no Backward follows); the shape check
before training uses `mode="dry"`. `InfoIns` asks how many rows an owner holds per split; `SaveIns`/`LoadIns`
make each owner persist/restore its own state (base params + optimiser), so the label party never sees them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tessera.core.serde import message

MODES = ("train", "eval", "dry")


@message
@dataclass(frozen=True)
class InfoIns:
    """Label party -> owner: which splits (train/valid/predict...) do you hold, with how many rows?"""

    splits: list[str] = field(default_factory=list)


@message
@dataclass(frozen=True)
class InfoRes:
    """Owner -> label party: rows per split it was asked about (-1 when it does not hold that split)."""

    rows: dict[str, int]


@message
@dataclass(frozen=True)
class ForwardIns:
    """Label party -> owner: compute your base's embedding of `rows` (aligned positions) of `split`.

    `mode` is "train" (keep the graph for the Backward that follows), "eval" or "dry" (no graph).
    """

    step: int
    split: str
    rows: torch.Tensor  # int64, positions in the aligned row order
    mode: str = "train"


@message
@dataclass(frozen=True)
class Forward:
    """Owner -> label party: the embedding of the requested rows (after the owner's own protections)."""

    step: int
    embedding: torch.Tensor


@message
@dataclass(frozen=True)
class Backward:
    """Label party -> owner: d(loss)/d(embedding) for the rows of training step `step` (after label protections)."""

    step: int
    grad: torch.Tensor


@message
@dataclass(frozen=True)
class BackwardRes:
    """Owner -> label party: the base took its optimiser step for `step`."""

    step: int


@message
@dataclass(frozen=True)
class SaveIns:
    """Label party -> owner: snapshot your state (base params, optimiser, step) under `tag`."""

    tag: str
    step: int


@message
@dataclass(frozen=True)
class SaveRes:
    """Owner -> label party: sha256 of the snapshot, recorded in the label party's checkpoint."""

    tag: str
    sha256: str


@message
@dataclass(frozen=True)
class LoadIns:
    """Label party -> owner: restore the snapshot `tag`; it must hash to `sha256` (same run, same step)."""

    tag: str
    sha256: str


@message
@dataclass(frozen=True)
class LoadRes:
    tag: str
    step: int


SPLIT_MESSAGES = (InfoIns, InfoRes, ForwardIns, Forward, Backward, BackwardRes, SaveIns, SaveRes, LoadIns, LoadRes)


@message
@dataclass(frozen=True)
class LossIns:
    """Compute party -> label party: the fused outputs of `rows` (aligned positions) of `split`; the label party
    returns the loss and, for mode "train", d(loss)/d(outputs). Labels never leave the label party."""

    step: int
    split: str
    rows: torch.Tensor
    output: torch.Tensor
    mode: str = "train"


@message
@dataclass(frozen=True)
class LossRes:
    """Label party -> compute party: the loss, its gradient w.r.t. the outputs (train), metrics (eval)."""

    step: int
    loss: float
    grad: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


COMPUTE_MESSAGES = (LossIns, LossRes)
