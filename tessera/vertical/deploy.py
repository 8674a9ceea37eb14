"""Split learning deployed as one process per party over gRPC + mTLS (what `tessera party --split` runs), and the
same app in one process (the oracle of the deployed run, and `tessera split-simulate`).

A split app (a module or a .py file, optionally `:attr`) defines `owner(name, out) -> DataOwner`,
`label_party(name, backend, out) -> SplitTrainer` and `FIT` (the keyword arguments of `SplitTrainer.fit`). The
coordinator is the label party; every client party is a data owner.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tessera.core.errors import ConfigError, ProtocolError, RoundFailed, TransportError
from tessera.core.logging import get_logger

if TYPE_CHECKING:
    from tessera.core.metrics import History
    from tessera.runtime.grpc.config import FederationConfig
    from tessera.runtime.grpc.party import ClientStats
    from tessera.runtime.grpc.process import Notify
    from tessera.vertical.trainer import SplitTrainer

log = get_logger(__name__)


def load_split_app(ref: str) -> Any:
    """`pkg.module`, `pkg.module:attr`, `path/app.py` or `path/app.py:attr` -> the object with owner/label_party/FIT."""
    where, _, attr = ref.rpartition(":") if ":" in ref else (ref, "", "")
    try:
        if where.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            if spec is None or spec.loader is None or not Path(where).is_file():
                raise ImportError(where)
            mod: Any = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(where)
        app = getattr(mod, attr) if attr else mod
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--split: cannot load {ref!r} ({type(exc).__name__}: {exc}); give a module or .py file "
                          "defining owner(name, out), label_party(name, backend, out) and FIT") from None
    missing = [n for n in ("owner", "label_party", "FIT") if not hasattr(app, n)]
    if missing:
        raise ConfigError(f"--split {ref}: missing {missing}; a split app defines owner(name, out) -> DataOwner, "
                          "label_party(name, backend, out) -> SplitTrainer and FIT (SplitTrainer.fit arguments)")
    return app


class _StopAfterEpoch(Exception):
    """Raised from the epoch callback once a shutdown was requested (the epoch's checkpoint is already written)."""


def run_split_label(fed: FederationConfig, app: Any, out: Path, *, resume: bool = False, overwrite: bool = False,
                    plots: bool = True, notify: Notify = log.info) -> History:
    """The coordinator of a split job: the label party, driving every data owner over gRPC. SIGTERM/SIGINT once:
    finish the epoch in flight and stop; a lost owner fails with the epoch the checkpoint holds. A folder that
    already holds a run is refused unless `resume` or `overwrite`; loss/score PNGs are written at the end."""
    from tessera.core.runfolder import claim
    from tessera.runtime.grpc.backend import GrpcBackend
    from tessera.runtime.grpc.process import Stopper, check_identity, write_transport
    from tessera.vertical.metrics import plot_split

    check_identity(fed.coordinator)
    claim(out, resume=resume, overwrite=overwrite, where="--out")
    owners = fed.client_names
    backend = GrpcBackend(fed, {o: o for o in owners}, min_clients=len(owners))
    trainer = app.label_party(fed.coordinator.name, backend, out)
    if trainer.label_party != fed.coordinator.name or sorted(trainer.owners) != sorted(owners):
        raise ConfigError(f"{fed.source}: the split app's label party {trainer.label_party!r} and owners "
                          f"{trainer.owners} must be the coordinator {fed.coordinator.name!r} and the client "
                          f"parties {owners}")
    if trainer.timeout is None:
        trainer.timeout = fed.settings.rpc_deadline_s
    stopper = Stopper(backend)

    def after_epoch(record: dict[str, Any]) -> None:
        notify(f"epoch {record['epoch']} done: train_loss {record['train_loss']:.4f}")
        if stopper.requested:
            raise _StopAfterEpoch

    notify(f"label party {fed.coordinator.name} listening on port {backend.listen()}; waiting for owners {owners}")
    first = trainer.epoch
    try:
        if resume:
            trainer.resume()
            first = trainer.epoch
            notify(f"resumed from epoch {trainer.epoch} (checkpoint in {out})")
        trainer.fit(**app.FIT, progress=after_epoch)
    except _StopAfterEpoch:
        notify(f"stopped on signal after epoch {trainer.epoch}; resume with --resume")
    except (ProtocolError, TransportError) as exc:
        if not stopper.requested:
            raise RoundFailed(f"split step {trainer.step} failed: {exc}. The checkpoint holds epoch "
                              f"{_checkpoint_epoch(out)}; restart the missing party and run again with --resume") \
                from None
        notify(f"epoch abandoned on shutdown; the checkpoint holds epoch {_checkpoint_epoch(out)}")
    finally:
        backend.close()
        if trainer.epoch > first or backend.refused or backend.traffic.up or backend.traffic.down:
            write_transport(out, backend, label={"epochs": [first + 1, trainer.epoch]})
    history: History = trainer.history
    if plots and len(history):
        plot_split(history, out)
    return history


def _checkpoint_epoch(out: Path) -> int:
    from tessera.core import serde
    from tessera.vertical.checkpoint import CHECKPOINT

    path = out / CHECKPOINT
    return int(serde.loads(path.read_bytes())["label"]["epoch"]) if path.exists() else 0


def run_split_owner(fed: FederationConfig, name: str, app: Any, out: Path, *,
                    notify: Notify = log.info) -> ClientStats:
    """A data owner: serve embeddings and take gradient steps until the label party says BYE."""
    from tessera.runtime.grpc.party import ClientParty
    from tessera.runtime.grpc.process import serve

    party = ClientParty(fed, name, app.owner(name, out), expected_client_id=name)
    return serve(party, f"data owner {name} dialling {fed.coordinator.address}", notify=notify)


def run_split_inprocess(app: Any, *, label: str, owners: list[str], out: Path, resume: bool = False) -> SplitTrainer:
    """The same split app in one process (`out/<party>` per party): the oracle a deployed run must equal.
    With `resume`, continue from the label party's checkpoint when there is one. Returns the trained SplitTrainer;
    the owners are reachable as `trainer.backend.handler.owners`."""
    from tessera.runtime.backend import InProcessBackend
    from tessera.vertical.owner import OwnerGroup

    backend = InProcessBackend(OwnerGroup([app.owner(o, out / o) for o in owners]))
    trainer: SplitTrainer = app.label_party(label, backend, out / label)
    if resume and not trainer.resume():
        log.warning("no checkpoint to resume from in %s; starting fresh", out / label)
    trainer.fit(**app.FIT)
    return trainer
