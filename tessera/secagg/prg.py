"""Mask expansion: a 32-byte seed -> a vector in Z_{2^bits} from a cryptographic PRG's keystream.

Two PRGs, both from `cryptography` (OpenSSL), chosen per round by the coordinator and written into `SetupIns.prg`
(every party of a round must expand the same stream; a client runs whichever the round names):
- "aes-128-ctr": AES-128 in counter mode keyed per mask by HKDF-SHA256(seed). The default where the CPU has AES
  instructions (the `aes` flag of /proc/cpuinfo, or any arm64 / Apple CPU): several times faster than ChaCha20.
- "chacha20": ChaCha20 keyed by the seed itself (the stream tessera used before; the default without AES-NI, where
  table-free AES is slow).
Never numpy's RandomState seeded by a folded secret: a 32-bit seed can be brute-forced from one masked vector.

Both are seekable (the counter block gives the position), so a vector is expanded in chunks of `CHUNK` words that
stay in cache: the keystream of each chunk is written into a reusable buffer and added into the accumulator in
place (no int64 copies), and chunks run on a thread pool (OpenSSL and numpy release the GIL).

Ring arithmetic runs on unsigned words (uint32 for bits <= 32, else uint64) whose wrap-around is reduction
modulo 2^32 / 2^64; since 2^bits divides both, a final AND with 2^bits - 1 gives the value in Z_{2^bits}.
"""

from __future__ import annotations

import functools
import os
import platform
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tessera.core.errors import ProtocolError
from tessera.secagg.quantize import ring_mask

SEED_BYTES = 32
AES, CHACHA = "aes-128-ctr", "chacha20"
PRGS = (AES, CHACHA)
CHUNK = 1 << 17  # words per chunk: 512 KiB (uint32) / 1 MiB (uint64), a multiple of both ciphers' block sizes
_CHACHA_NONCE = b"tessera-mask"  # 12 bytes after ChaCha20's 4-byte little-endian block counter
_AES_INFO = b"tessera/secagg/prg/aes-128-ctr"
_ZEROS = bytes(CHUNK * 8)


def cpu_has_aes() -> bool:
    """Whether this CPU has AES instructions (x86 `aes` flag; arm64 cores that run this all have them)."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return True
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and " aes " in f" {line} " for line in text.splitlines())


PRG_NAME = AES if cpu_has_aes() else CHACHA  # what this machine proposes when it coordinates a round


def word(bits: int) -> type[np.unsignedinteger]:
    """The unsigned machine word ring arithmetic for Z_{2^bits} runs on."""
    return np.uint32 if bits <= 32 else np.uint64


def check_prg(prg: str) -> None:
    if prg not in PRGS:
        raise ProtocolError(f"unknown mask PRG {prg!r}; this client runs {' or '.join(PRGS)}")


@functools.lru_cache(maxsize=4096)
def _aes_key(seed: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=_AES_INFO).derive(seed)


def _encryptor(seed: bytes, prg: str, byte_offset: int):  # type: ignore[no-untyped-def]
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes")
    if prg == AES:
        return Cipher(algorithms.AES(_aes_key(seed)), modes.CTR((byte_offset // 16).to_bytes(16, "big"))).encryptor()
    check_prg(prg)
    nonce = (byte_offset // 64).to_bytes(4, "little") + _CHACHA_NONCE
    return Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()


def keystream(seed: bytes, n: int, *, bits: int, prg: str = CHACHA) -> np.ndarray:
    """n words of the PRG's keystream for `seed` (read-only; not yet reduced to Z_{2^bits})."""
    dtype = word(bits)
    return np.frombuffer(_encryptor(seed, prg, 0).update(bytes(n * np.dtype(dtype).itemsize)), dtype=dtype)


_local = threading.local()


def _buffer(nbytes: int) -> bytearray:
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None or len(buf) < nbytes + 64:
        buf = _local.buf = bytearray(nbytes + 64)  # update_into needs room for one more block
    return buf


def keystream_chunk(seed: bytes, start: int, stop: int, dtype: type[np.unsignedinteger], *,
                    prg: str = CHACHA) -> np.ndarray:
    """Words start..stop of PRG(seed) as a view of this thread's reusable buffer (valid until its next call)."""
    size = np.dtype(dtype).itemsize
    nbytes = (stop - start) * size
    out = _buffer(nbytes)
    _encryptor(seed, prg, start * size).update_into(memoryview(_ZEROS)[:nbytes], out)
    return np.frombuffer(out, dtype=dtype, count=stop - start)


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="tessera-prg")


def for_chunks(n: int, fn: Callable[[int, int], None]) -> None:
    """fn(start, stop) for each chunk of CHUNK words of a length-n vector, on the thread pool (the chunks must be
    independent; numpy and OpenSSL release the GIL)."""
    bounds = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    if len(bounds) <= 1:
        for a, b in bounds:
            fn(a, b)
        return
    for f in [_pool().submit(fn, a, b) for a, b in bounds]:
        f.result()


def add_masks(acc: np.ndarray, masks: Sequence[tuple[bytes, int]], *, bits: int, prg: str = CHACHA) -> None:
    """acc += sum of sign * PRG(seed) over `masks` [(seed, +1 | -1)], in place, wrapping in the machine word;
    chunks of the vector are expanded on a thread pool."""
    check_prg(prg)
    assert acc.dtype == word(bits) and acc.flags.c_contiguous

    def chunk(start: int, stop: int) -> None:
        part = acc[start:stop]
        for seed, sign in masks:
            ks = keystream_chunk(seed, start, stop, acc.dtype.type, prg=prg)
            (np.add if sign > 0 else np.subtract)(part, ks, out=part)

    if masks:
        for_chunks(acc.shape[0], chunk)


def add_mask(acc: np.ndarray, seed: bytes, *, bits: int, sign: int = 1, prg: str = CHACHA) -> None:
    """acc += sign * PRG(seed), in place, wrapping in the machine word."""
    add_masks(acc, [(seed, sign)], bits=bits, prg=prg)


def reduce(acc: np.ndarray, *, bits: int) -> np.ndarray:
    np.bitwise_and(acc, acc.dtype.type(ring_mask(bits)), out=acc)
    return acc


def expand(seed: bytes, n: int, *, bits: int, prg: str = CHACHA) -> torch.Tensor:
    """n uniform values in [0, 2^bits) as int64, from PRG(seed)."""
    acc = np.zeros(n, dtype=word(bits))
    add_mask(acc, seed, bits=bits, prg=prg)
    ks = reduce(acc, bits=bits)
    return torch.from_numpy(ks.astype(np.int64) if bits <= 32 else ks.view(np.int64))


def to_words(t: torch.Tensor, *, bits: int) -> np.ndarray:
    """An int32/int64 tensor holding ring values (two's complement on the wire) -> a fresh unsigned word array."""
    a = t.detach().numpy()
    if a.dtype in (np.int8, np.int16):  # a narrow ring (compressed SecAgg+): widen to the arithmetic word
        return a.view(np.uint8 if a.dtype == np.int8 else np.uint16).astype(word(bits))
    if bits <= 32:
        return a.astype(np.uint32) if a.dtype == np.int64 else a.view(np.uint32).copy()
    return a.astype(np.int64).view(np.uint64).copy()


def to_wire(acc: np.ndarray, *, bits: int) -> torch.Tensor:
    """Unsigned words -> the narrowest signed tensor that holds Z_{2^bits}: int8 (bits <= 8), int16 (<= 16), int32
    (<= 32, shares acc's memory) or int64 (shares acc's memory)."""
    if bits <= 16:
        narrow = acc.astype(np.uint8 if bits <= 8 else np.uint16)
        return torch.from_numpy(narrow.view(np.int8 if bits <= 8 else np.int16))
    return torch.from_numpy(acc.view(np.int32 if bits <= 32 else np.int64))


def to_int64(acc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(acc.astype(np.int64))
