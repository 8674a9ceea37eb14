"""A data owner's side of split learning, as a message handler: `DataOwner.handle(party, msg) -> reply`.

The same object serves in-process simulation (`InProcessBackend(OwnerGroup(...))`) and a real deployment (the
gRPC party loop calls `handle` with each decoded request). It holds the owner's base model, its optimiser, its
data splits (rows already in the aligned order) and its own protections; nothing but embeddings leaves it.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from tessera.core import serde
from tessera.core.device import DeviceSpec, Placement
from tessera.core.errors import ConfigError, ProtocolError, SerdeError, ShapeMismatch
from tessera.core.io import atomic_write_bytes
from tessera.core.logging import get_logger
from tessera.core.types import get_params, set_params
from tessera.vertical.messages import (
    MODES,
    Backward,
    BackwardRes,
    Forward,
    ForwardIns,
    InfoIns,
    InfoRes,
    LoadIns,
    LoadRes,
    SaveIns,
    SaveRes,
)
from tessera.vertical.model import set_mode
from tessera.vertical.protections import Decorrelation, EmbeddingDP, distance_correlation, step_generator

log = get_logger(__name__)
OptimizerFn = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
_MODE_ID = {m: i for i, m in enumerate(MODES)}


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimiser's state_dict in serde-encodable form (integer keys become strings)."""
    sd = opt.state_dict()
    return {"state": {str(k): v for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state["param_groups"]]
    opt.load_state_dict({"state": {int(k): v for k, v in state["state"].items()}, "param_groups": groups})


def party_code(name: str) -> int:
    return zlib.crc32(name.encode())


class DataOwner:
    """One party's base model and data. `handle` answers the split-learning messages (see messages.py).

    >>> owner = DataOwner("bob", base_bob, lambda p: torch.optim.SGD(p, lr=0.1), data={"train": x_bob})
    >>> backend = InProcessBackend(OwnerGroup([owner]))
    """

    def __init__(self, name: str, base: nn.Module, optimizer_fn: OptimizerFn, *,
                 data: Mapping[str, torch.Tensor] | None = None, embedding_dp: EmbeddingDP | None = None,
                 seed: int = 0, state_dir: str | Path | None = None, ledger: Any = None,
                 decorrelation: Decorrelation | None = None, device: DeviceSpec = None) -> None:
        self.name = name
        # the base lives on this party's device (placed once); embeddings and gradients cross as CPU tensors
        self.placement = Placement.of(device, what=f"device of {name}")
        self.base = self.placement.place(base)
        self.optimizer = optimizer_fn(base.parameters())
        self.data: dict[str, torch.Tensor] = dict(data or {})
        self.embedding_dp = embedding_dp
        self.decorrelation = decorrelation
        self.seed = seed
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.ledger = ledger  # a tessera.privacy.PrivacyLedger: embedding DP releases are accounted in it
        self.step = 0  # optimiser steps taken
        self._pending: tuple[int, torch.Tensor, torch.Tensor] | None = None  # step, embedding, features
        self._snapshots: dict[str, bytes] = {}

    def add_split(self, split: str, x: torch.Tensor) -> None:
        """Register rows (aligned order) under a split name, e.g. "train", "valid" or "predict"."""
        self.data[split] = x

    # --------------------------------------------------------------------------------------------- dispatch
    def handle(self, party: str, msg: Any) -> Any:
        if party != self.name:
            raise ProtocolError(f"message for {party!r} reached data owner {self.name!r}; check the routing")
        if isinstance(msg, ForwardIns):
            return self._forward(msg)
        if isinstance(msg, Backward):
            return self._backward(msg)
        if isinstance(msg, InfoIns):
            return InfoRes(rows={s: (len(self.data[s]) if s in self.data else -1) for s in msg.splits})
        if isinstance(msg, SaveIns):
            return self._save(msg)
        if isinstance(msg, LoadIns):
            return self._load(msg)
        raise ProtocolError(f"data owner {self.name} cannot handle {type(msg).__name__}")

    def _rows(self, msg: ForwardIns) -> torch.Tensor:
        if msg.split not in self.data:
            raise ConfigError(f"data owner {self.name} holds no split {msg.split!r} (has {sorted(self.data)}); "
                              "add its rows with add_split before asking for them")
        if msg.mode not in _MODE_ID:
            raise ProtocolError(f"unknown forward mode {msg.mode!r}; expected one of {list(MODES)}")
        rows = msg.rows
        n = len(self.data[msg.split])
        if rows.dtype != torch.int64 or rows.dim() != 1 or (rows.numel() and (rows.min() < 0 or rows.max() >= n)):
            raise ProtocolError(f"rows for {self.name}/{msg.split} must be int64 positions in [0, {n})")
        return self.data[msg.split][rows]

    def _forward(self, msg: ForwardIns) -> Forward:
        x = self.placement.move(self._rows(msg))
        if msg.mode == "train":
            set_mode(self.base, True)
            emb = self.base(x)
            if self.embedding_dp is not None:
                emb = self.embedding_dp.apply(emb, generator=self._noise(msg))
                if self.ledger is not None:
                    self.ledger.step(self.name, noise_multiplier=self.embedding_dp.noise_multiplier,
                                     sample_rate=len(x) / len(self.data[msg.split]), steps=1)
            self._pending = (msg.step, emb, x)
            return Forward(step=msg.step, embedding=emb.detach().to("cpu"))
        set_mode(self.base, False)
        with torch.no_grad():
            emb = self.base(x)
            if self.embedding_dp is not None:
                emb = self.embedding_dp.apply(emb, generator=self._noise(msg))
        return Forward(step=msg.step, embedding=emb.to("cpu"))

    def _noise(self, msg: ForwardIns) -> torch.Generator:
        # from (seed, step, party, mode): the same noise on resume and on any backend
        return step_generator(self.seed, msg.step, party_code(self.name), _MODE_ID[msg.mode])

    def _backward(self, msg: Backward) -> BackwardRes:
        if self._pending is None or self._pending[0] != msg.step:
            have = None if self._pending is None else self._pending[0]
            raise ProtocolError(f"{self.name}: Backward for step {msg.step} but the pending forward is {have}")
        _, emb, x = self._pending
        grad = self.placement.move(msg.grad)
        if msg.grad.shape != emb.shape or msg.grad.dtype != emb.dtype:
            raise ShapeMismatch(f"{self.name}: gradient {msg.grad.dtype}{tuple(msg.grad.shape)} does not match the "
                                f"embedding {emb.dtype}{tuple(emb.shape)} it was sent for")
        if not bool(torch.isfinite(msg.grad).all()):
            raise ProtocolError(f"{self.name}: gradient for step {msg.step} contains NaN or Inf; refusing the step")
        self.optimizer.zero_grad(set_to_none=True)
        if self.decorrelation is not None and self.decorrelation.alpha > 0:
            penalty = self.decorrelation.alpha * distance_correlation(x, emb)
            torch.autograd.backward([emb, penalty], [grad, None])
        else:
            emb.backward(grad)  # type: ignore[no-untyped-call]
        self.optimizer.step()
        self._pending = None
        self.step += 1
        return BackwardRes(step=msg.step)

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"party": self.name, "step": self.step, "base": get_params(self.base),
                "optimizer": optimizer_state(self.optimizer)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("party") != self.name:
            raise ConfigError(f"state of {state.get('party')!r} cannot be loaded by data owner {self.name!r}")
        set_params(self.base, state["base"], who=f"{self.name}'s saved base")
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.step = int(state["step"])
        self._pending = None

    def _path(self, tag: str) -> Path | None:
        if self.state_dir is None:
            return None
        if not tag.replace("-", "").replace("_", "").isalnum():
            raise ProtocolError(f"snapshot tag {tag!r} must be alphanumeric (with - or _)")
        return self.state_dir / f"{tag}.tsr"

    def _save(self, msg: SaveIns) -> SaveRes:
        if msg.step != self.step:
            raise ProtocolError(f"{self.name}: asked to save at step {msg.step} but has taken {self.step} steps")
        blob = serde.dumps(self.state_dict())
        self._snapshots[msg.tag] = blob
        path = self._path(msg.tag)
        if path is not None:
            atomic_write_bytes(path, blob)
        return SaveRes(tag=msg.tag, sha256=hashlib.sha256(blob).hexdigest())

    def _load(self, msg: LoadIns) -> LoadRes:
        blob = self._snapshots.get(msg.tag)
        path = self._path(msg.tag)
        if blob is None and path is not None and path.exists():
            blob = path.read_bytes()
        if blob is None:
            raise ConfigError(f"{self.name} has no saved state {msg.tag!r}; resume needs every party's state_dir")
        if hashlib.sha256(blob).hexdigest() != msg.sha256:
            raise ConfigError(f"{self.name}'s saved state {msg.tag!r} is not the one the label party's checkpoint "
                              "recorded (another run or step); restore the matching files or start fresh")
        try:
            self.load_state_dict(serde.loads(blob))
        except SerdeError as exc:
            raise ConfigError(f"{self.name}'s saved state {msg.tag!r} is corrupt ({exc})") from None
        return LoadRes(tag=msg.tag, step=self.step)


class Party(Protocol):
    """A party's message handler that knows its own name (`DataOwner`, `LabelParty`)."""

    name: str

    def handle(self, party: str, msg: Any) -> Any: ...


class OwnerGroup:
    """Routes each message to the party it is addressed to: the handler of an in-process backend."""

    def __init__(self, owners: Iterable[Party]) -> None:
        self.owners = {o.name: o for o in owners}

    def handle(self, party: str, msg: Any) -> Any:
        if party not in self.owners:
            raise ProtocolError(f"no data owner named {party!r} here (have {sorted(self.owners)})")
        return self.owners[party].handle(party, msg)
