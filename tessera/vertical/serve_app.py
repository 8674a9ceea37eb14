"""`tessera party --split APP --serve`: split inference with the parties of a trained split app over gRPC + mTLS.

The coordinator (the app's label party) loads its checkpoint (fuse model, its own base if any) and asks every
owner to load the snapshot that checkpoint names (`LoadIns`, hash-checked as on resume). Each owner then serves
embeddings of its rows of split `split` (`EmbeddingServer`: refuses rows outside them, logs every request to
`out/requests.jsonl`); the coordinator predicts every row in batches and writes `out/predictions.tsr`
({"predictions": tensor}). No base model leaves its owner.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tessera.core import serde
from tessera.core.errors import ConfigError, ProtocolError
from tessera.core.io import atomic_write_bytes
from tessera.vertical import checkpoint as ckpt
from tessera.vertical.messages import LoadIns, LoadRes
from tessera.vertical.owner import DataOwner
from tessera.vertical.serve import EmbeddingServer, SplitPredictor

if TYPE_CHECKING:
    from collections.abc import Callable

    from tessera.runtime.grpc.config import FederationConfig
    from tessera.runtime.grpc.party import ClientStats

PREDICTIONS = "predictions.tsr"


class ServingOwner:
    """An owner in serve mode: loads the trained snapshot it is told to (hash-checked), then serves embeddings."""

    def __init__(self, owner: DataOwner, split: str, *, asker: str, log_path: Path | None) -> None:
        if split not in owner.data:
            raise ConfigError(f"data owner {owner.name} has no split {split!r} to serve (has {sorted(owner.data)})")
        self.owner, self.split, self.asker, self.log_path = owner, split, asker, log_path
        self.server: EmbeddingServer | None = None

    def handle(self, party: str, msg: Any) -> Any:
        if isinstance(msg, LoadIns):
            reply = self.owner.handle(party, msg)
            self.server = EmbeddingServer(self.owner.name, self.owner.base, self.owner.data[self.split],
                                          asker=self.asker, log_path=self.log_path,
                                          embedding_dp=self.owner.embedding_dp, seed=self.owner.seed)
            return reply
        if self.server is None:
            raise ProtocolError(f"{self.owner.name}: load the trained snapshot (LoadIns) before asking for embeddings")
        return self.server.handle(party, msg)


def serve_split_owner(fed: FederationConfig, name: str, app: Any, out: Path, *, split: str = "predict",
                      notify: Callable[[str], None] | None = None) -> ClientStats:
    """A data owner serving embeddings of its `split` rows with its trained base until the coordinator says BYE."""
    from tessera.runtime.grpc.party import ClientParty
    from tessera.runtime.grpc.process import serve

    handler = ServingOwner(app.owner(name, out), split, asker=fed.coordinator.name, log_path=out / "requests.jsonl")
    party = ClientParty(fed, name, handler, expected_client_id=name)
    kw: dict[str, Any] = {"notify": notify} if notify is not None else {}
    return serve(party, f"data owner {name} serving {split!r} embeddings to {fed.coordinator.address}", **kw)


def serve_split_label(fed: FederationConfig, app: Any, out: Path, *, split: str = "predict", batch_size: int = 1024,
                      notify: Callable[[str], None] | None = None) -> torch.Tensor:
    """The coordinator: load the trained split model, predict every served row, write out/predictions.tsr."""
    from tessera.runtime.grpc.backend import GrpcBackend

    owners = fed.client_names
    backend = GrpcBackend(fed, {o: o for o in owners}, min_clients=len(owners))
    trainer = app.label_party(fed.coordinator.name, backend, out)
    state = ckpt.load_label(trainer, out)
    if state is None:
        raise ConfigError(f"no split checkpoint in {out}: train first (tessera party --split APP), then --serve")
    local_x = trainer.local_x.get(split) if trainer.local_base is not None else None
    predictor = SplitPredictor(fuse=trainer.fuse, order=trainer.order, backend=backend, me=trainer.label_party,
                               local_base=trainer.local_base, local_x=local_x, timeout=fed.settings.rpc_deadline_s)
    if notify is not None:
        notify(f"label party {fed.coordinator.name} listening on port {backend.listen()}; serving with {owners}")
    try:
        predictor.start()
        loaded = backend.exchange({o: LoadIns(tag=state["tag"], sha256=state["owners"][o]) for o in owners},
                                  timeout=fed.settings.rpc_deadline_s)
        bad = {o: r for o, r in loaded.items() if not isinstance(r, LoadRes)}
        if bad:
            raise ProtocolError(f"owners could not load the trained snapshot: {bad}")
        predictions = predictor.predict(torch.arange(predictor.rows()), batch_size=batch_size)
    finally:
        predictor.close()
    atomic_write_bytes(out / PREDICTIONS, serde.dumps({"predictions": predictions}))
    if notify is not None:
        notify(f"{len(predictions)} predictions written to {out / PREDICTIONS}")
    return predictions

