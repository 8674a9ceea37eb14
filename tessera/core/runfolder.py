"""Who may write into a run folder: a fresh folder is claimed, a run already there is continued (`--resume`) or
replaced (`--overwrite`), and never silently mixed with a new one or overwritten.

A folder "holds a run" when any of `RUN_FILES` is in it (a finished run, one stopped mid-way, or a run of another
job). Other files in the folder are never touched.
"""

from __future__ import annotations

import shutil
from enum import Enum
from pathlib import Path

from tessera.core.errors import ConfigError

CHECKPOINT = "checkpoint.tsr"
RUN_FILES = (CHECKPOINT, "metrics.jsonl", "transport.json")
SHARDS = "checkpoint-*.safetensors"
LOGGER_DIRS = ("tensorboard", "mlruns")  # written by the run's loggers; replaced with it


class Start(Enum):
    FRESH = "fresh"
    RESUME = "resume"
    OVERWRITE = "overwrite"


def run_files(out: Path) -> list[str]:
    """The run files present in `out` (empty for a fresh folder)."""
    return [name for name in RUN_FILES if (out / name).exists()]


def describe(out: Path) -> str:
    """'3 rounds recorded' (from metrics.jsonl, without reading the checkpoint) or the files present."""
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        with open(metrics, encoding="utf-8", errors="replace") as fh:
            n = sum(1 for line in fh if line.strip())
        return f"{n} round(s) recorded"
    return "files " + ", ".join(run_files(out))


def claim(out: str | Path, *, resume: bool, overwrite: bool, where: str = "output_dir") -> Start:
    """Decide how a run may start in `out`; raise a one-line ConfigError naming `--resume` and `--overwrite` when
    it may not. With `overwrite`, the previous run's files (and its logger folders) are removed first.

    `where` names the setting that chose the folder (`job.output_dir`, `--out`), for the message."""
    path = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: choose one (continue the run in the folder, or replace it)")
    if resume:
        if not (path / CHECKPOINT).is_file():
            raise ConfigError(f"--resume: no checkpoint in {path} ({where}); run without --resume to start fresh")
        return Start.RESUME
    present = run_files(path)
    if not present:
        return Start.FRESH
    if not overwrite:
        raise ConfigError(f"{path} ({where}) already holds a run ({describe(path)}); pass --resume to continue it "
                          "or --overwrite to replace it, or choose another folder")
    for name in present:
        (path / name).unlink()
    for shard in path.glob(SHARDS):  # a large model's checkpoint params (horizontal/checkpoint.py)
        shard.unlink()
    for name in LOGGER_DIRS:
        if (path / name).is_dir():
            shutil.rmtree(path / name)
    return Start.OVERWRITE
