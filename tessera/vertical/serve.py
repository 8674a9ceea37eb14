"""Split inference: every data owner keeps its base and answers embedding requests for aligned rows; the label
(or compute) party fuses them into predictions. No base model is exported or moved.

    EmbedIns(request, rows)  ->  EmbedRes(request, embedding)       (one per owner per batch)

`rows` are positions in the aligned row order (the PSI output): raw IDs never travel. An owner refuses a position
outside its aligned set, and keeps a request log (who asked, which rows, when) in memory and, given a path, as
JSON lines. The predictions equal those of the exported composed model (`tessera.export.save_bundle`) on the same
batches. `run_owner` / `run_predictor` deploy both sides over gRPC + mTLS (`tessera party --split --serve`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tessera.core.errors import ConfigError, ProtocolError
from tessera.core.serde import message
from tessera.runtime.backend import Backend, ClientFailure
from tessera.vertical.messages import InfoIns, InfoRes
from tessera.vertical.model import set_mode
from tessera.vertical.owner import party_code
from tessera.vertical.protections import EmbeddingDP, step_generator

if TYPE_CHECKING:
    from tessera.runtime.grpc.config import FederationConfig
    from tessera.runtime.grpc.party import ClientStats

MAX_ROWS = 1 << 16  # rows per request an owner answers: a batch, not a dump of the table


@message
@dataclass(frozen=True)
class EmbedIns:
    """Fusing party -> owner: embed these aligned rows (int64 positions) with your base, no graph kept."""

    request: int
    rows: torch.Tensor


@message
@dataclass(frozen=True)
class EmbedRes:
    request: int
    embedding: torch.Tensor


@dataclass(frozen=True)
class Served:
    """One line of an owner's request log."""

    at: float  # unix time the request was answered
    by: str  # who asked (the fusing party)
    request: int
    rows: list[int]


class EmbeddingServer:
    """A data owner in serve mode: its base (eval mode, no gradients) and its rows in the aligned order.

    With `embedding_dp`, every served embedding is clipped and noised as in training (noise seeded by `seed` and
    the request number), so serving keeps the protection; predictions then differ from the exported model's."""

    def __init__(self, name: str, base: nn.Module, x: torch.Tensor, *, asker: str = "label party",
                 log_path: str | Path | None = None, clock: Callable[[], float] = time.time,
                 embedding_dp: EmbeddingDP | None = None, seed: int = 0) -> None:
        self.name, self.base, self.x, self.asker, self.clock = name, base, x, asker, clock
        self.embedding_dp, self.seed = embedding_dp, seed
        set_mode(base, False)
        self.log_path = Path(log_path) if log_path is not None else None
        self.log: list[Served] = []

    def handle(self, party: str, msg: Any) -> Any:
        if party != self.name:
            raise ProtocolError(f"embedding request for {party!r} reached {self.name!r}; check the routing")
        if isinstance(msg, InfoIns):  # how many aligned rows are served (under any split name asked)
            return InfoRes(rows={s: len(self.x) for s in msg.splits})
        if not isinstance(msg, EmbedIns):
            raise ProtocolError(f"data owner {self.name} serves embeddings only; got {type(msg).__name__}")
        rows, n = msg.rows, len(self.x)
        if rows.dtype != torch.int64 or rows.dim() != 1 or rows.numel() > MAX_ROWS:
            raise ProtocolError(f"{self.name}: rows must be a 1-D int64 tensor of at most {MAX_ROWS} positions")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
            raise ProtocolError(f"{self.name} refuses rows outside its {n} aligned rows; align with PSI first")
        entry = Served(at=self.clock(), by=self.asker, request=msg.request, rows=rows.tolist())
        self.log.append(entry)
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(json.dumps(asdict(entry)) + "\n")
        with torch.inference_mode():
            emb = self.base(self.x[rows])
            if self.embedding_dp is not None:
                noise = step_generator(self.seed, msg.request, party_code(self.name), 0x5E4E)
                emb = self.embedding_dp.apply(emb, generator=noise)
        return EmbedRes(request=msg.request, embedding=emb)


class SplitPredictor:
    """The fusing party in serve mode: asks every owner for its embeddings of a batch and applies the fuse."""

    def __init__(self, *, fuse: nn.Module, order: Sequence[str], backend: Backend, me: str = "label party",
                 local_base: nn.Module | None = None, local_x: torch.Tensor | None = None,
                 timeout: float | None = None) -> None:
        if (me in order) != (local_base is not None and local_x is not None):
            raise ConfigError(f"{me!r} must be in `order` exactly when it has a local base and its rows")
        self.fuse, self.order, self.backend, self.me = fuse, list(order), backend, me
        self.local_base, self.local_x, self.timeout = local_base, local_x, timeout
        self.owners = [p for p in self.order if p != me]
        self._request = 0
        self._started = False
        set_mode(fuse, False)
        if local_base is not None:
            set_mode(local_base, False)

    def start(self) -> None:
        """Start the backend (wait for the owners); done on the first request otherwise."""
        if not self._started:
            self.backend.start(self.owners)
            self._started = True

    def rows(self) -> int:
        """How many aligned rows every owner serves (they must agree)."""
        self.start()
        replies = self.backend.exchange({o: InfoIns(splits=["serve"]) for o in self.owners}, timeout=self.timeout)
        sizes = {p: (r.rows.get("serve", -1) if isinstance(r, InfoRes) else -1) for p, r in replies.items()}
        if self.local_x is not None:
            sizes[self.me] = len(self.local_x)
        if len(set(sizes.values())) != 1 or -1 in sizes.values():
            raise ConfigError(f"the parties serve different numbers of aligned rows {sizes}; align them with PSI")
        return next(iter(sizes.values()))

    def embed(self, rows: torch.Tensor) -> list[torch.Tensor]:
        self.start()
        self._request += 1
        replies = self.backend.exchange({o: EmbedIns(request=self._request, rows=rows) for o in self.owners},
                                        timeout=self.timeout)
        embs = []
        for p in self.order:
            if p == self.me:
                assert self.local_base is not None and self.local_x is not None
                with torch.inference_mode():
                    embs.append(self.local_base(self.local_x[rows]))
                continue
            r = replies[p]
            if isinstance(r, ClientFailure):
                raise ProtocolError(f"data owner {p} did not serve request {self._request}: {r.reason}")
            if not isinstance(r, EmbedRes) or r.request != self._request or r.embedding.shape[:1] != rows.shape:
                raise ProtocolError(f"data owner {p} answered request {self._request} with something else")
            embs.append(r.embedding)
        return embs

    def predict(self, rows: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
        """Predictions for aligned `rows`, `batch_size` rows per request to each owner."""
        if batch_size < 1:
            raise ConfigError("batch_size must be at least 1")
        outs = []
        for i in range(0, len(rows), batch_size):
            embs = self.embed(rows[i : i + batch_size])
            with torch.inference_mode():
                outs.append(self.fuse(embs))
        return torch.cat(outs) if outs else torch.zeros(0)

    def close(self) -> None:
        if self._started:
            self.backend.close()
            self._started = False


# ------------------------------------------------------------------------------------------- gRPC deployment
def run_owner(fed: FederationConfig, name: str, base: nn.Module, x: torch.Tensor, *, log_path: str | Path | None,
              notify: Callable[[str], None] | None = None) -> ClientStats:
    """A data owner serving embeddings of its aligned rows `x` until the fusing party (coordinator) says BYE."""
    from tessera.runtime.grpc.party import ClientParty
    from tessera.runtime.grpc.process import serve

    server = EmbeddingServer(name, base, x, asker=fed.coordinator.name, log_path=log_path)
    party = ClientParty(fed, name, server, expected_client_id=name)
    kw: dict[str, Any] = {"notify": notify} if notify is not None else {}
    return serve(party, f"data owner {name} serving embeddings to {fed.coordinator.address}", **kw)


def run_predictor(fed: FederationConfig, *, fuse: nn.Module, order: Sequence[str], rows: torch.Tensor,
                  batch_size: int = 1024, local: Mapping[str, Any] | None = None) -> torch.Tensor:
    """The coordinator fuses: predictions for aligned `rows` from every client party's served embeddings.
    `local` may hold {"base": module, "x": rows} when the coordinator also owns a base."""
    from tessera.runtime.grpc.backend import GrpcBackend

    owners = [p for p in order if p != fed.coordinator.name]
    if sorted(owners) != sorted(fed.client_names):
        raise ConfigError(f"{fed.source}: the fuse order {list(order)} must name the coordinator (if it owns a "
                          f"base) and exactly the client parties {fed.client_names}")
    backend = GrpcBackend(fed, {o: o for o in owners}, min_clients=len(owners))
    predictor = SplitPredictor(fuse=fuse, order=order, backend=backend, me=fed.coordinator.name,
                               local_base=(local or {}).get("base"), local_x=(local or {}).get("x"),
                               timeout=fed.settings.rpc_deadline_s)
    try:
        return predictor.predict(rows, batch_size=batch_size)
    finally:
        predictor.close()
