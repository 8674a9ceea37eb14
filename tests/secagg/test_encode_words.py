"""The client's quantisation (`encode_words`) gives the very words of its previous implementation, kept here as the
oracle: whatever is done to make it faster, every input (float32 or float64, clipped or not, w != 1, L2 clip, the
clamp path, uint32 and uint64 words, chunk boundaries) must quantise to the same ring words bit for bit."""

import dataclasses
import hashlib
import math
import os

import numpy as np
import pytest
import torch

from tessera.core.errors import ProtocolError
from tessera.core.types import Scalar
from tessera.secagg.client import encode_words
from tessera.secagg.messages import SetupIns
from tessera.secagg.plus import SecAggPlus
from tessera.secagg.prg import CHUNK, PRG_NAME, SEED_BYTES, for_chunks, keystream_chunk, word


def _previous_encode_words(vector: torch.Tensor, num_examples: int, setup: SetupIns, seed: Scalar | None) -> np.ndarray:
    """encode_words as of commit e9109ca (issue 22, second pass), verbatim but for the logging."""
    if vector.numel() != setup.dim - 1:
        raise ProtocolError(f"update has {vector.numel()} values but the round expects {setup.dim - 1}")
    flat = vector.detach().reshape(-1)
    if flat.dtype != torch.float32 or setup.l2_clip > 0:
        flat = flat.double()
    v = flat.numpy()
    scale = 1.0
    if setup.l2_clip > 0:
        scale = min(1.0, setup.l2_clip / max(float(np.linalg.norm(v)), 1e-300))
    w = min(float(num_examples), setup.max_weight) / setup.max_weight
    key = (hashlib.sha256(b"tessera/secagg/rounding|%d" % int(seed)).digest() if isinstance(seed, int)
           else os.urandom(SEED_BYTES))
    out = np.empty(setup.dim, dtype=word(setup.bits))
    to_unit = setup.levels / (2.0 * setup.clip)
    clamp = ((setup.clip * w if w != 1.0 else setup.clip) + setup.clip) * to_unit > setup.levels
    top = out.dtype.type(setup.levels)

    def chunk(start: int, stop: int) -> None:
        if scale != 1.0:
            y = v[start:stop] * scale
            np.clip(y, -setup.clip, setup.clip, out=y)
        else:
            y = np.clip(v[start:stop], -setup.clip, setup.clip, dtype=np.float64)
        if w != 1.0:
            y *= w
        y += setup.clip
        y *= to_unit
        low = np.floor(y)
        y -= low
        y *= 2.0**32
        up = np.less(keystream_chunk(key, start, stop, np.uint32, prg=PRG_NAME), y)
        words = out[start:stop]
        words[...] = low
        np.add(words, up, out=words)
        if clamp:
            np.minimum(words, top, out=words)

    for_chunks(setup.dim - 1, chunk)
    last = keystream_chunk(key, setup.dim - 1, setup.dim, np.uint32, prg=PRG_NAME)[0]
    y = w * setup.levels
    out[-1] = min(math.floor(y) + (int(last) < (y - math.floor(y)) * 2.0**32), setup.levels)
    return out


def _update(n: int, clip: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Mostly inside the clip range, some far outside, and the edge values (bounds, signed zeros, infinities,
    subnormals, values that are not float32)."""
    v = (torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * clip).to(dtype)
    edges = [clip, -clip, 2 * clip, -2 * clip, 0.0, -0.0, math.inf, -math.inf, 1e-310, -1e-310, clip * (1 - 2**-30),
             -clip * (1 - 2**-30), 0.1, 1 / 3]
    v[: len(edges)] = torch.tensor(edges, dtype=torch.float64).to(dtype)
    return v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "case",  # (clip, l2_clip, examples, bits, levels)
    [
        (8.0, None, 1, 32, None),  # clip is a float32: the float32 clipping path
        (0.1, None, 1, 32, None),  # clip is not a float32
        (8.0, None, 3, 32, None),  # w = 0.3
        (0.3, None, 7, 16, None),
        (0.3, 2.0, 3, 32, None),  # L2 clip (widened to float64 first)
        (8.0, 50.0, 1, 32, None),  # L2 clip that does not bind (scale 1.0)
        (0.3, None, 1, 32, 1231),  # the clamp path: the largest value would round above levels
        (0.5, None, 1, 40, None),  # uint64 words
        (8.0, None, 1, 32, 2**32 - 1),  # one client's worth of levels: the whole uint32 range
    ],
)
def test_words_equal_the_previous_implementation(dtype: torch.dtype,
                                                 case: tuple[float, float | None, int, int, int | None]) -> None:
    clip, l2_clip, examples, bits, levels = case
    n = 2 * CHUNK + 13  # two full chunks and a short one
    setup = SecAggPlus(clip=clip, l2_clip=l2_clip, bits=bits, max_weight=10.0 if examples > 1 else 1.0).setup(
        1, ["a", "b", "c"], dim=n + 1, graph_seed=0, session=1)
    if levels is not None:
        setup = dataclasses.replace(setup, levels=levels)
    v = _update(n, clip, dtype, seed=examples + bits)
    if l2_clip is not None:
        v[6:8] = 0.0  # no infinities under an L2 clip (the norm would be inf)
    got = encode_words(v, examples, setup, 11)
    assert got.dtype == word(bits)
    assert np.array_equal(got, _previous_encode_words(v, examples, setup, 11))


@pytest.mark.parametrize("n", [1, 7, CHUNK - 1, CHUNK, CHUNK + 1])
def test_chunk_boundaries_give_the_previous_words(n: int) -> None:
    setup = SecAggPlus(clip=4.0, max_weight=1.0).setup(1, ["a", "b"], dim=n + 1, graph_seed=0, session=2)
    v = _update(max(n, 14), 4.0, torch.float32, seed=n)[:n]
    assert np.array_equal(encode_words(v, 1, setup, 3), _previous_encode_words(v, 1, setup, 3))
