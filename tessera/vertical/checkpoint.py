"""Checkpoint/resume of a split run: the label party's state in one atomic file, each owner's in its own.

The label party never receives an owner's parameters: it asks each owner to save its state (`SaveIns`) and
records the sha256 each returns. On resume every owner must restore a state with exactly that hash (`LoadIns`),
so all parties continue from the same step. Owners save under two alternating tags, so a crash between an
owner's write and the label party's write leaves the previous, consistent pair intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tessera.core import serde
from tessera.core.errors import ConfigError, ProtocolError, SerdeError
from tessera.core.io import atomic_write_bytes
from tessera.core.types import check_compatible, get_params, set_params
from tessera.vertical.messages import LoadIns, LoadRes, SaveIns, SaveRes
from tessera.vertical.owner import load_optimizer_state, optimizer_state

if TYPE_CHECKING:
    from tessera.vertical.trainer import SplitTrainer

CHECKPOINT = "checkpoint.tsr"
FORMAT = "tessera-split-1"


def _label_state(t: SplitTrainer) -> dict[str, Any]:
    return {"format": FORMAT, "seed": t.seed, "label_party": t.label_party, "order": t.order, "epoch": t.epoch,
            "step": t.step, "fuse": get_params(t.fuse),
            "local_base": get_params(t.local_base) if t.local_base is not None else None,
            "optimizer": optimizer_state(t.optimizer) if t.optimizer is not None else None,
            "history": t.history.records,
            "best": {"value": t.best[0], "since": t.best[1]}}


def _load_label_state(t: SplitTrainer, s: dict[str, Any]) -> None:
    if s.get("format") != FORMAT or s.get("seed") != t.seed or s.get("order") != t.order:
        raise ConfigError("checkpoint was written by a different split job (format, seed or parties differ); "
                          "resume with the same setup or start a fresh output_dir")
    check_compatible(get_params(t.fuse), s["fuse"], who="checkpoint fuse params")
    set_params(t.fuse, s["fuse"], who="checkpoint fuse params")
    if t.local_base is not None:
        set_params(t.local_base, s["local_base"], who=f"checkpoint {t.label_party} base params")
    if t.optimizer is not None:
        load_optimizer_state(t.optimizer, s["optimizer"])
    t.epoch, t.step = int(s["epoch"]), int(s["step"])
    t.history.records = list(s["history"])
    t.best = (s["best"]["value"], int(s["best"]["since"]))


def _save_owners(t: SplitTrainer, tag: str) -> dict[str, str]:
    replies = t._exchange({o: SaveIns(tag=tag, step=t.step) for o in t.owners}, SaveRes)
    return {o: replies[o].sha256 for o in t.owners}


def _load_owners(t: SplitTrainer, tag: str, shas: dict[str, str], step: int) -> None:
    if sorted(shas) != sorted(t.owners):
        raise ConfigError(f"checkpoint lists owners {sorted(shas)} but this job has {sorted(t.owners)}")
    replies = t._exchange({o: LoadIns(tag=tag, sha256=shas[o]) for o in t.owners}, LoadRes)
    for o, rep in replies.items():
        if rep.step != step:
            raise ProtocolError(f"data owner {o} restored step {rep.step}, the label party is at step {step}")


def snapshot(t: SplitTrainer, tag: str) -> None:
    """Every party snapshots its state under `tag` (in memory, and on disk where a party has a folder)."""
    state = {"label": _label_state(t), "owners": _save_owners(t, tag), "tag": tag}
    blob = serde.dumps(state)
    t._snapshots[tag] = blob
    if t.out is not None:
        atomic_write_bytes(t.out / f"{tag}.tsr", blob)


def restore(t: SplitTrainer, tag: str) -> None:
    """Every party rolls back to the snapshot `tag` (history is kept: it records what happened)."""
    blob = t._snapshots.get(tag)
    if blob is None and t.out is not None and (t.out / f"{tag}.tsr").exists():
        blob = (t.out / f"{tag}.tsr").read_bytes()
    if blob is None:
        raise ConfigError(f"no snapshot {tag!r} to restore")
    state = serde.loads(blob)
    history = t.history.records
    _load_label_state(t, state["label"])
    _load_owners(t, tag, state["owners"], t.step)
    t.history.records = history


def save(t: SplitTrainer, out: Path) -> None:
    tag = f"ckpt-{t.epoch % 2}"
    state = {"label": _label_state(t), "owners": _save_owners(t, tag), "tag": tag}
    atomic_write_bytes(out / CHECKPOINT, serde.dumps(state))


def load_label(t: SplitTrainer, out: Path) -> dict[str, Any] | None:
    """Load only the label party's side of the checkpoint in `out`; returns the whole checkpoint (its `tag` and
    the owners' `sha256`s), or None when there is none."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    try:
        state: dict[str, Any] = serde.loads(path.read_bytes())
    except SerdeError as exc:
        raise ConfigError(f"{path} is not a valid split checkpoint ({exc}); move it away") from None
    _load_label_state(t, state["label"])
    return state


def load(t: SplitTrainer, out: Path) -> bool:
    state = load_label(t, out)
    if state is None:
        return False
    _load_owners(t, state["tag"], state["owners"], t.step)
    if t.writer is not None:
        t.writer.reset(t.history.records)
    return True
