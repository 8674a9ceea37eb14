"""Atomic file writes: a checkpoint is either the old one or the new one, never half of each."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename over `path`."""
    atomic_write_parts(path, [data])


def atomic_write_parts(path: str | os.PathLike[str], parts: Sequence[bytes | memoryview]) -> None:
    """`atomic_write_bytes` of consecutive buffers, written one by one (never joined into one copy in memory)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for part in parts:
                fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_into(path: str | os.PathLike[str]) -> bytearray:
    """A file's bytes in a fresh writable buffer (one copy from disk; decoders may keep views into it)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = bytearray(size)
        if fh.readinto(buf) != size:
            raise OSError(f"{path} changed size while being read")
    return buf


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
