"""Replies spooled to disk, for a coordinator whose memory must not hold a whole reply beside its model.

A coordinator folding replies as they come holds the global params, its running sum and the reply being folded:
three model sizes with a float32 sum. A reply is validated whole (its shapes, every value finite) before any of it
is folded, so a reply that breaks off half-way or turns out to hold a NaN is refused without touching the sum; it
must therefore wait somewhere until its last byte has arrived. With `reply_spool_dir` set in federation.toml, a
reply larger than `reply_buffer_bytes` waits on disk instead of in memory:

- its frames are written to an unlinked temporary file as they arrive (the page cache holds them until they are
  written back; no process memory);
- when complete, the file is mapped privately (copy-on-write: the reply's tensors are writable views, and a write
  never reaches the file) and decoded in place with every serde check;
- the validation and the fold read one tensor at a time and hand its pages back after the last read
  (`MappedParams.release`), so the coordinator's memory holds one tensor of the reply, not the reply.

Nothing is unpickled and nothing is kept: the file has no name from the moment it is created and disappears when
the last tensor viewing it does. Disk use is at most one reply per client (each within the transport's ceiling).
"""

from __future__ import annotations

import mmap
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.core.errors import ConfigError, TransportError
from tessera.core.types import OwnedParams

PAGE = mmap.PAGESIZE
_DONTNEED: int | None = getattr(mmap, "MADV_DONTNEED", None)


class SpoolError(TransportError):
    """The coordinator could not write a reply to its spool (disk full, folder gone): its own fault, not the
    sender's."""


def check_spool_dir(folder: Path, source: str) -> None:
    """Refuse a spool folder that cannot take a file now, before any round depends on it."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix="tessera-reply-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{source}: federation.reply_spool_dir: cannot create a file in {folder} ({exc.strerror});"
                          " create the folder, make it writable by the coordinator, or remove the setting") from None


class SpoolFile:
    """One reply being written to an unlinked temporary file in order, then mapped for decoding."""

    def __init__(self, folder: Path, total: int) -> None:
        try:
            self._file: Any = tempfile.TemporaryFile(dir=folder, prefix="tessera-reply-", buffering=0)  # noqa: SIM115 (held until mapped)
        except OSError as exc:
            raise SpoolError(f"cannot spool a reply to {folder} ({exc.strerror}); free space there or change "
                             "reply_spool_dir in federation.toml") from None
        self.total = total

    def __len__(self) -> int:
        return self.total

    def write(self, payload: bytes | memoryview) -> None:
        view = memoryview(payload)
        try:
            while view:
                view = view[self._file.write(view) :]
        except OSError as exc:
            self.close()
            raise SpoolError(f"cannot spool a reply of {self.total} bytes ({exc.strerror}); free space in the "
                             "reply_spool_dir folder or remove the setting") from None

    def mapped(self) -> mmap.mmap:
        """The whole file as a private, copy-on-write mapping; the file itself is closed (the mapping keeps it)."""
        try:
            return mmap.mmap(self._file.fileno(), self.total, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise SpoolError(f"cannot map a spooled reply of {self.total} bytes: {exc}") from None
        finally:
            self.close()

    def close(self) -> None:
        self._file.close()


class MappedParams(OwnedParams):
    """OwnedParams whose tensors view a private mapping of a spooled reply.

    `release(key)` hands the pages of that tensor back to the kernel: a later read faults them in again from the
    file, so it is for a tensor read but never written (a write made before the release is lost). The validation
    (`core.types.is_finite`) and the fold (`RunningMean.add`) release each tensor after reading it, so a reply
    never becomes resident as a whole. Pages shared with a neighbouring tensor are kept."""

    resident = False

    def __init__(self, params: dict[str, torch.Tensor], mapping: mmap.mmap) -> None:
        super().__init__(params)
        self._map = mapping
        self._base = int(np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data) if len(mapping) else 0

    def release(self, key: str) -> None:
        t = self[key]
        start = t.data_ptr() - self._base
        if start < 0 or start + t.nbytes > len(self._map):
            return  # not a view of the mapping (a copy the decoder made for alignment)
        lo, hi = -(-start // PAGE) * PAGE, (start + t.nbytes) // PAGE * PAGE
        if hi > lo and _DONTNEED is not None:  # (Windows has no madvise: the pages stay until the reply goes)
            self._map.madvise(_DONTNEED, lo, hi - lo)
