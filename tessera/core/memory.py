"""Process memory for parties that move whole models: freed tensor memory goes back to the operating system.

glibc serves an allocation from its heap unless it is larger than the mmap threshold, and it raises that threshold
to the size of any mmap'd block that is freed (up to 32 MiB). A process that frees a model's worth of tensors
(16 MiB each for a 4096 x 1024 layer) therefore serves the next round's tensors from its heap, where freed blocks
stay resident between rounds: a coordinator's RSS climbs by model sizes that no tensor uses. Fixing the threshold
stops the adjustment, so every large tensor is its own mapping and is returned when it is freed. It is fixed above
the transport's frames (2 MiB for 1 MiB chunks): at 1 MiB every frame was a map, fault-in and unmap of its own, and
the deployed 50M round took 1.74-1.95 s instead of 1.41-1.46 s, with the same peak memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from tessera.core.logging import get_logger

log = get_logger(__name__)
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 2 * 1024**2
_applied = False


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have allocations of `threshold` bytes or more mapped on their own, so freeing one returns it to the OS.

    Process-wide and idempotent; called by a horizontal coordinator's `GrpcBackend` when it starts listening
    (`return_memory=True`, which `tessera coordinator` sets). Not by parties that train, nor by a split-learning
    label party (its coordinator trains the fuse model): there a fixed threshold would map (and fault in)
    every gradient buffer of a megabyte or more at every step, where glibc's adaptive threshold keeps buffers up
    to 32 MiB in the heap (larger ones, such as Opacus' per-sample gradients, are mapped per step either way:
    docs/privacy.md shows the environment settings that keep them). Returns whether it is in effect (False where
    the C library is not glibc: other allocators need no fix, or expose none).
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    if _applied:
        log.debug("allocations of %d bytes or more are mapped on their own (freed memory returns to the OS)",
                  threshold)
    return _applied
