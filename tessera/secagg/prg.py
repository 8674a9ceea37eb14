"""Mask expansion: a 32-byte seed -> a vector in Z_{2^bits} from the ChaCha20 keystream (a cryptographic PRG).

Never numpy's RandomState seeded by a folded secret: a 32-bit seed can be brute-forced from one masked vector.
"""

from __future__ import annotations

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from tessera.secagg.quantize import ring_mask

SEED_BYTES = 32
_NONCE = b"\x00" * 4 + b"tessera-mask"  # 4-byte block counter (starts at 0) + 12-byte nonce; keys are single-use


def expand(seed: bytes, n: int, *, bits: int) -> torch.Tensor:
    """n uniform values in [0, 2^bits) as int64, from ChaCha20(seed)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes")
    width = 4 if bits <= 32 else 8
    enc = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    stream = enc.update(bytes(n * width))
    arr = np.frombuffer(stream, dtype=np.uint32 if width == 4 else np.uint64)
    if width == 4:
        out = torch.from_numpy(arr.astype(np.int64))
    else:
        out = torch.from_numpy(arr.view(np.int64).copy())
    return out.bitwise_and_(ring_mask(bits))
