"""Mask expansion: a 32-byte seed -> a vector in Z_{2^bits} from the ChaCha20 keystream (a cryptographic PRG).

Never numpy's RandomState seeded by a folded secret: a 32-bit seed can be brute-forced from one masked vector.
Ring arithmetic runs on unsigned words (uint32 for bits <= 32, else uint64) whose wrap-around is reduction
modulo 2^32 / 2^64; since 2^bits divides both, a final AND with 2^bits - 1 gives the value in Z_{2^bits}.
"""

from __future__ import annotations

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from tessera.secagg.quantize import ring_mask

SEED_BYTES = 32
_NONCE = b"\x00" * 4 + b"tessera-mask"  # 4-byte block counter (starts at 0) + 12-byte nonce; keys are single-use


def word(bits: int) -> type[np.unsignedinteger]:
    """The unsigned machine word ring arithmetic for Z_{2^bits} runs on."""
    return np.uint32 if bits <= 32 else np.uint64


def keystream(seed: bytes, n: int, *, bits: int) -> np.ndarray:
    """n words of ChaCha20(seed) keystream (read-only; not yet reduced to Z_{2^bits})."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes")
    dtype = word(bits)
    enc = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(n * np.dtype(dtype).itemsize)), dtype=dtype)


def add_mask(acc: np.ndarray, seed: bytes, *, bits: int, sign: int = 1) -> None:
    """acc += sign * PRG(seed), in place, wrapping in the machine word."""
    ks = keystream(seed, acc.shape[0], bits=bits)
    if sign > 0:
        np.add(acc, ks, out=acc)
    else:
        np.subtract(acc, ks, out=acc)


def reduce(acc: np.ndarray, *, bits: int) -> np.ndarray:
    np.bitwise_and(acc, acc.dtype.type(ring_mask(bits)), out=acc)
    return acc


def expand(seed: bytes, n: int, *, bits: int) -> torch.Tensor:
    """n uniform values in [0, 2^bits) as int64, from ChaCha20(seed)."""
    ks = reduce(keystream(seed, n, bits=bits).copy(), bits=bits)
    return torch.from_numpy(ks.astype(np.int64) if bits <= 32 else ks.view(np.int64))


def to_words(t: torch.Tensor, *, bits: int) -> np.ndarray:
    """An int32/int64 tensor holding ring values (two's complement on the wire) -> a fresh unsigned word array."""
    a = t.detach().numpy()
    if bits <= 32:
        return a.astype(np.int64).astype(np.uint32) if a.dtype == np.int64 else a.view(np.uint32).copy()
    return a.astype(np.int64).view(np.uint64).copy()


def to_wire(acc: np.ndarray, *, bits: int) -> torch.Tensor:
    """Unsigned words -> the int32 (bits <= 32) or int64 tensor that travels."""
    return torch.from_numpy(acc.view(np.int32 if bits <= 32 else np.int64).copy())


def to_int64(acc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(acc.astype(np.int64))
