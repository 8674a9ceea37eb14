"""Mask expansion: a 32-byte seed -> a vector in Z_{2^bits} from a cryptographic PRG's keystream.

Two PRGs, both from `cryptography` (OpenSSL), chosen per round by the coordinator and written into `SetupIns.prg`
(every party of a round must expand the same stream; a client runs whichever the round names):
- "aes-128-ctr": AES-128 in counter mode keyed per mask by HKDF-SHA256(seed). The default where the CPU has AES
  instructions (the `aes` flag of /proc/cpuinfo, or any arm64 / Apple CPU): several times faster than ChaCha20.
- "chacha20": ChaCha20 keyed by the seed itself (the stream tessera used before; the default without AES-NI, where
  table-free AES is slow).
Never numpy's RandomState seeded by a folded secret: a 32-bit seed can be brute-forced from one masked vector.

A mask is expanded as one sequential stream per seed, in chunks of `CHUNK` words that stay in cache: the keystream
of each chunk is written into a reusable per-thread buffer (`update_into`) and added into the accumulator in place
(no int64 copies, no allocation per mask). Several masks are split over a thread pool, each thread summing its
share of the masks into its own accumulator. `cryptography` (50.x) holds the GIL while OpenSSL encrypts, so the
keystream itself runs on one core at a time (measured: 23.6 GB/s with one thread, 24.6 GB/s with two); what the
threads overlap with it is numpy's work (the additions, and the client's quantisation: `add_masks(fill=...)`).

Where the CPU has vector AES and carry-less multiply (x86 `vaes` + `vpclmulqdq`), OpenSSL's AES-GCM runs about twice
as fast as its AES-CTR (about 20 against 10 GB/s here): GCM encrypts with AES-CTR from counter block
nonce || 2 (32-bit increment), so with a zero 96-bit nonce its ciphertext of zeros IS this PRG's keystream from
counter block 2 on (for fewer than 2^32 blocks, 64 GiB). The first two blocks come from AES-ECB of counters 0 and 1;
the GHASH tag is computed and discarded. Same stream, same test vectors (`read_stream` is checked against AES-CTR).

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
from typing import TypeVar

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
T = TypeVar("T")
R = TypeVar("R")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def cpu_has_aes() -> bool:
    """Whether this CPU has AES instructions (x86 `aes` flag; arm64 cores that run this all have them)."""
    return platform.machine().lower() in ("arm64", "aarch64") or "aes" in _cpu_flags()


PRG_NAME = AES if cpu_has_aes() else CHACHA  # what this machine proposes when it coordinates a round
# Expand AES-128-CTR through OpenSSL's AES-GCM (the same keystream; twice as fast with VAES, see the docstring).
AES_VIA_GCM = {"vaes", "vpclmulqdq"} <= _cpu_flags()
_GCM_MAX_BYTES = (1 << 36) - 64  # GCM's 32-bit block counter: at most 2^32 - 2 blocks from one nonce
_HEAD = (0).to_bytes(16, "big") + (1).to_bytes(16, "big")  # counter blocks 0 and 1 (GCM starts at block 2)


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


_THREADS = max(1, min(8, os.cpu_count() or 1))


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_THREADS, thread_name_prefix="tessera-prg")


def parallel_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """[fn(x) for x in items], in order, the items split into one contiguous batch per pool thread (the first on
    this thread): for work that releases the GIL, such as OpenSSL's signature checks."""
    k = -(-len(items) // _THREADS)
    if len(items) < 2 or _THREADS == 1:
        return [fn(x) for x in items]
    def batch(start: int) -> list[R]:
        return [fn(x) for x in items[start : start + k]]

    futures = [_pool().submit(batch, i) for i in range(k, len(items), k)]
    out = batch(0)
    for f in futures:
        out += f.result()
    return out


def for_chunks(n: int, fn: Callable[[int, int], None], *, threads: bool = True) -> None:
    """fn(start, stop) for each chunk of CHUNK words of a length-n vector, on the thread pool (the chunks must be
    independent; numpy and OpenSSL release the GIL), or on this thread where `threads` is False."""
    bounds = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    if len(bounds) <= 1 or not threads:
        for a, b in bounds:
            fn(a, b)
        return
    for f in [_pool().submit(fn, a, b) for a, b in bounds]:
        f.result()


class _Stream:
    """PRG(seed) read sequentially from word 0, `fill`ing a buffer one chunk at a time (AES through GCM where
    `via_gcm`: two blocks of AES-ECB, then GCM's keystream from counter block 2)."""

    __slots__ = ("enc", "head")

    def __init__(self, seed: bytes, prg: str, *, via_gcm: bool) -> None:
        self.head = b""
        if prg == AES and via_gcm:
            if len(seed) != SEED_BYTES:
                raise ValueError(f"PRG seed must be {SEED_BYTES} bytes")
            key = _aes_key(seed)
            self.head = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(_HEAD)
            self.enc = Cipher(algorithms.AES(key), modes.GCM(bytes(12))).encryptor()
        else:
            self.enc = _encryptor(seed, prg, 0)

    def fill(self, out: bytearray, nbytes: int) -> None:
        """The next `nbytes` of the stream into out[:nbytes] (out has room for one more block)."""
        k = 0
        if self.head:
            k = min(len(self.head), nbytes)
            out[:k] = self.head[:k]
            self.head = self.head[k:]
        if nbytes > k:
            self.enc.update_into(memoryview(_ZEROS)[: nbytes - k], memoryview(out)[k:])


def read_stream(seed: bytes, n: int, *, bits: int, prg: str = AES, via_gcm: bool = AES_VIA_GCM) -> np.ndarray:
    """n words of PRG(seed) read through `_Stream` chunk by chunk, as `add_masks` reads them (equals `keystream`)."""
    dtype = word(bits)
    out = np.empty(n, dtype=dtype)
    stream = _Stream(seed, prg, via_gcm=via_gcm)
    for a in range(0, n, CHUNK):
        b = min(a + CHUNK, n)
        nbytes = (b - a) * out.itemsize
        buf = _buffer(nbytes)
        stream.fill(buf, nbytes)
        out[a:b] = np.frombuffer(buf, dtype=dtype, count=b - a)
    return out


def _sum_masks(acc: np.ndarray, masks: Sequence[tuple[bytes, int]], prg: str, via_gcm: bool) -> None:
    """acc += sum of sign * PRG(seed), chunk-major: every mask's keystream for one chunk of acc while it is in
    cache, each stream read on from where the previous chunk stopped."""
    n, size = acc.shape[0], acc.itemsize
    streams = [(_Stream(seed, prg, via_gcm=via_gcm), np.add if sign > 0 else np.subtract) for seed, sign in masks]
    for a in range(0, n, CHUNK):
        b = min(a + CHUNK, n)
        part, nbytes = acc[a:b], (b - a) * size
        buf = _buffer(nbytes)
        ks = np.frombuffer(buf, dtype=acc.dtype, count=b - a)
        for stream, op in streams:
            stream.fill(buf, nbytes)
            op(part, ks, out=part)


def add_masks(acc: np.ndarray, masks: Sequence[tuple[bytes, int]], *, bits: int, prg: str = CHACHA,
              via_gcm: bool | None = None, fill: Callable[[], object] | None = None) -> None:
    """acc += sum of sign * PRG(seed) over `masks` [(seed, +1 | -1)], in place, wrapping in the machine word.

    The masks are split into two batches per thread, taken in turn by the pool threads, each summing into its own
    accumulator (added into acc at the end), and by this thread, summing into acc (a batch is summed chunk-major, so
    each chunk of the accumulator is read once per batch: few, large batches; two per thread balance the threads
    when one of them starts late). `fill`: run first on this thread, while the pool threads
    already expand masks; it writes acc's starting value (the client's quantisation: numpy work, which releases the
    GIL, overlapping the keystream, whose OpenSSL calls hold it). `via_gcm`: expand AES through GCM (default: where
    it is faster)."""
    check_prg(prg)
    assert acc.dtype == word(bits) and acc.flags.c_contiguous
    gcm = (AES_VIA_GCM if via_gcm is None else via_gcm) and acc.nbytes <= _GCM_MAX_BYTES
    size = max(1, -(-len(masks) // (2 * _THREADS)))
    batches = [masks[i : i + size] for i in range(0, len(masks), size)]
    taken, lock = iter(range(len(batches))), threading.Lock()  # each batch goes to one thread
    stop = threading.Event()

    def drain(into: np.ndarray) -> bool:
        """Sum batches into `into` until none is left; whether it took any."""
        took = False
        while not stop.is_set():
            with lock:  # (not left to the GIL: a free-threaded Python runs next() on two threads at once)
                i = next(taken, None)
            if i is None:
                break
            _sum_masks(into, batches[i], prg, gcm)
            took = True
        return took

    helpers = min(_THREADS - 1, len(batches) - (fill is None))
    parts = [np.zeros_like(acc) for _ in range(max(helpers, 0))]
    futures = [_pool().submit(drain, part) for part in parts]
    try:
        if fill is not None:
            fill()
        drain(acc)
    finally:
        stop.set()  # (only matters when fill or this thread's share raised: the helpers stop after their batch)
        took = [f.result() for f in futures]
    for part, used in zip(parts, took, strict=True):
        if used:
            np.add(acc, part, out=acc)


def add_mask(acc: np.ndarray, seed: bytes, *, bits: int, sign: int = 1, prg: str = CHACHA) -> None:
    """acc += sign * PRG(seed), in place, wrapping in the machine word."""
    add_masks(acc, [(seed, sign)], bits=bits, prg=prg)


def reduce(acc: np.ndarray, *, bits: int) -> np.ndarray:
    if bits != acc.itemsize * 8:  # in Z_{2^32} on uint32 (Z_{2^64} on uint64) the words are already reduced
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


def add_words(acc: np.ndarray, t: torch.Tensor, *, bits: int) -> None:
    """acc += `t` (a wire tensor of ring values), in place; int32/int64 are read in place, not copied."""
    a = t.detach().numpy()
    if a.dtype.itemsize == acc.itemsize:
        np.add(acc, a.view(acc.dtype), out=acc)
    else:
        np.add(acc, to_words(t, bits=bits), out=acc)


def to_wire(acc: np.ndarray, *, bits: int) -> torch.Tensor:
    """Unsigned words -> the narrowest signed tensor that holds Z_{2^bits}: int8 (bits <= 8), int16 (<= 16), int32
    (<= 32, shares acc's memory) or int64 (shares acc's memory)."""
    if bits <= 16:
        narrow = acc.astype(np.uint8 if bits <= 8 else np.uint16)
        return torch.from_numpy(narrow.view(np.int8 if bits <= 8 else np.int16))
    return torch.from_numpy(acc.view(np.int32 if bits <= 32 else np.int64))


def to_int64(acc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(acc.astype(np.int64))
