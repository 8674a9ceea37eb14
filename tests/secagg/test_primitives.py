"""Property tests for the SecAgg+ building blocks: Shamir, quantisation, PRG masks, AEAD, neighbour graph."""

import dataclasses
import hashlib
import math
import os
import random

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.core.errors import ConfigError, ProtocolError
from tessera.secagg import crypto, shamir
from tessera.secagg.graph import default_degree, neighbours, neighbours_of, share_threshold
from tessera.secagg.messages import SetupIns
from tessera.secagg.prg import CHUNK, PRG_NAME, add_masks, cpu_has_aes, expand, keystream, read_stream, word
from tessera.secagg.quantize import (
    dequantize_sum,
    levels_for,
    quantize,
    ring_mask,
    step_size,
    sum_error_bound,
)

FAST = settings(max_examples=25, deadline=None)


@FAST
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(2, 9), data=st.data())
def test_shamir_any_t_shares_recover_the_secret(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(2, n))
    xs = data.draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, xs=xs, threshold=t, rng=random.Random(data.draw(st.integers(0, 99))))
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=t, unique=True))
    assert shamir.combine({x: shares[x] for x in subset}, threshold=t) == secret


def test_shamir_shares_equal_horner_reduced_at_every_step() -> None:
    secret, xs = bytes(range(32)), [*range(1, 96), 2**600 % shamir.PRIME]
    rng = random.Random(3)
    coeffs = [int.from_bytes(secret, "big")] + [rng.randrange(shamir.PRIME) for _ in range(59)]
    want = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % shamir.PRIME
        want[x] = y.to_bytes(shamir.SHARE_BYTES, "big")
    assert shamir.split(secret, xs=xs, threshold=60, rng=random.Random(3)) == want


def test_shamir_fewer_than_t_shares_do_not_recover() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, xs=[1, 2, 3, 4], threshold=3)
    with pytest.raises(ValueError, match="need 3 shares"):
        shamir.combine({1: shares[1], 2: shares[2]}, threshold=3)
    # Interpolating t - 1 shares as if the threshold were t - 1 yields garbage, not the secret.
    with pytest.raises(ValueError, match="inconsistent"):
        shamir.combine({1: shares[1], 2: shares[2]}, threshold=2)


@FAST
@given(values=st.lists(st.floats(-8.0, 8.0), min_size=1, max_size=40), bits=st.integers(16, 48),
       clients=st.integers(1, 50), seed=st.integers(0, 2**31))
def test_quantisation_round_trip_is_within_one_step(values: list[float], bits: int, clients: int, seed: int) -> None:
    levels = levels_for(clients=clients, bits=bits)
    x = torch.tensor(values, dtype=torch.float64)
    q = quantize(x, clip=8.0, levels=levels, gen=torch.Generator().manual_seed(seed))
    assert int(q.min()) >= 0 and int(q.max()) <= levels
    back = dequantize_sum(q, count=1, clip=8.0, levels=levels)
    assert float((back - x).abs().max()) < step_size(clip=8.0, levels=levels) + 1e-12


@FAST
@given(n=st.integers(1, 30), bits=st.integers(16, 40), seed=st.integers(0, 2**31))
def test_quantised_sum_never_wraps_and_stays_within_the_bound(n: int, bits: int, seed: int) -> None:
    levels = levels_for(clients=n, bits=bits)
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.rand(16, generator=g, dtype=torch.float64) * 2 - 1) * 8.0 for _ in range(n)]
    qs = [quantize(x, clip=8.0, levels=levels, gen=g) for x in xs]
    ring = sum(qs).bitwise_and(ring_mask(bits))  # type: ignore[union-attr]
    assert torch.equal(ring, sum(qs))  # headroom: the ring sum is the integer sum
    err = dequantize_sum(ring, count=n, clip=8.0, levels=levels) - sum(xs)
    assert float(err.abs().max()) < sum_error_bound(clients=n, clip=8.0, levels=levels)


def test_stochastic_rounding_is_unbiased() -> None:
    levels = 1000
    x = torch.full((200_000,), 0.123456, dtype=torch.float64)
    q = quantize(x, clip=1.0, levels=levels, gen=torch.Generator().manual_seed(0))
    mean = float(dequantize_sum(q.double().mean().reshape(1), count=1, clip=1.0, levels=levels)[0])
    assert abs(mean - 0.123456) < 3 * step_size(clip=1.0, levels=levels) / math.sqrt(200_000)


def test_headroom_is_checked_up_front() -> None:
    with pytest.raises(ConfigError, match=r"raise secagg\.bits to at least 15"):
        levels_for(clients=100, bits=12)
    assert levels_for(clients=100, bits=32) * 100 < 2**32


@FAST
@given(seed=st.binary(min_size=32, max_size=32), bits=st.integers(8, 62), n=st.integers(1, 64))
def test_prg_is_deterministic_and_in_range(seed: bytes, bits: int, n: int) -> None:
    a, b = expand(seed, n, bits=bits), expand(seed, n, bits=bits)
    assert torch.equal(a, b) and int(a.min()) >= 0 and int(a.max()) <= ring_mask(bits)


@FAST
@given(bits=st.integers(8, 62), x=st.lists(st.integers(0, 2**8 - 1), min_size=4, max_size=4))
def test_pairwise_masks_cancel_in_the_ring(bits: int, x: list[int]) -> None:
    sk_u, pk_u = crypto.keypair()
    sk_v, pk_v = crypto.keypair()
    s_uv = crypto.agree(sk_u, pk_v, info=crypto.MASK_INFO)
    assert s_uv == crypto.agree(sk_v, pk_u, info=crypto.MASK_INFO)  # both sides derive the same seed
    mask = expand(s_uv, 4, bits=bits)
    xu, xv = torch.tensor(x), torch.tensor(x[::-1])
    yu, yv = (xu + mask) & ring_mask(bits), (xv - mask) & ring_mask(bits)
    assert torch.equal((yu + yv) & ring_mask(bits), (xu + xv) & ring_mask(bits))


def test_prg_output_is_uniform_bytes() -> None:
    raw = expand(bytes(32), 50_000, bits=32).to(torch.int64)
    counts = torch.bincount((raw & 0xFF).reshape(-1), minlength=256).double()
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 330  # 255 degrees of freedom: p ~ 0.001 at 330


def test_aead_binds_round_sender_and_receiver() -> None:
    key = bytes(range(32))
    blob = crypto.seal(key, b"share", aad=b"round 1|a|b")
    assert crypto.open_sealed(key, blob, aad=b"round 1|a|b") == b"share"
    with pytest.raises(ProtocolError, match="another round"):
        crypto.open_sealed(key, blob, aad=b"round 2|a|b")
    with pytest.raises(ProtocolError):
        crypto.open_sealed(key, blob[:-1] + bytes([blob[-1] ^ 1]), aad=b"round 1|a|b")


@pytest.mark.parametrize("n", [20, 100, 1000])
def test_neighbour_graph_is_symmetric_and_logarithmic(n: int) -> None:
    clients = [f"c{i}" for i in range(n)]
    k = default_degree(n, threshold=0.6, dropout=0.05)
    graph = neighbours(clients, degree=k, graph_seed=7)
    assert all(c not in graph[c] and all(c in graph[v] for v in graph[c]) for c in clients)
    assert {len(v) for v in graph.values()} == {min(k, n - 1)}
    if n >= 100:
        assert k <= 8 * math.ceil(math.log2(n))  # O(log n), not n
        assert k < n - 1
    assert share_threshold(0.6, k) > (k + 1) / 2


# Pinned keystreams: a change of PRG, key derivation or counter layout cannot pass silently.
PINNED = {
    "aes-128-ctr": ([987096055, 1313577791, 210535645, 3050287173, 2660834953, 1097601499, 2237650598, 3302729584],
                    "ce075b12d2b08814"),
    "chacha20": ([4053392263, 3856428543, 460952469, 2014925794, 1111904371, 2864931498, 3744176890, 3759004777],
                 "2aea822d2cc3baea"),
}


@pytest.mark.parametrize("prg", list(PINNED))
def test_prg_keystream_is_pinned(prg: str) -> None:
    seed = bytes(range(32))
    head, digest = PINNED[prg]
    assert expand(seed, 8, bits=32, prg=prg).tolist() == head
    long = expand(seed, 300_000, bits=62, prg=prg)  # crosses chunk boundaries (chunks are expanded in parallel)
    assert hashlib.sha256(long.numpy().tobytes()).hexdigest()[:16] == digest


def test_prg_constructions_match_their_definitions() -> None:
    """AES-128-CTR keyed by HKDF-SHA256(seed), counter blocks 0, 1, ...; ChaCha20 keyed by the seed (the stream
    tessera used before, so ChaCha20 rounds are unchanged)."""
    seed = bytes(range(32))
    key = HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=b"tessera/secagg/prg/aes-128-ctr").derive(seed)
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    blocks = ecb.update((0).to_bytes(16, "big") + (1).to_bytes(16, "big"))
    assert keystream(seed, 8, bits=32, prg="aes-128-ctr").tobytes() == blocks
    old = Cipher(algorithms.ChaCha20(seed, b"\x00" * 4 + b"tessera-mask"), mode=None).encryptor().update(bytes(4096))
    assert keystream(seed, 1024, bits=32, prg="chacha20").tobytes() == old


@pytest.mark.parametrize("bits", [32, 62])
@pytest.mark.parametrize("prg", list(PINNED))
def test_chunked_masks_equal_the_whole_keystream(prg: str, bits: int) -> None:
    n = 2 * CHUNK + 1234
    a, b = os.urandom(32), os.urandom(32)
    acc = np.zeros(n, dtype=word(bits))
    add_masks(acc, [(a, 1), (b, -1)], bits=bits, prg=prg)
    want = keystream(a, n, bits=bits, prg=prg) - keystream(b, n, bits=bits, prg=prg)  # wraps in the word
    assert np.array_equal(acc, want)


@pytest.mark.parametrize("n", [1, 7, 8, 9, CHUNK - 1, CHUNK + 9])
@pytest.mark.parametrize("bits", [32, 62])
def test_aes_through_gcm_is_the_aes_ctr_keystream(n: int, bits: int) -> None:
    """GCM's keystream from counter block 2, after two ECB blocks, is AES-CTR's (the fast path where the CPU has
    VAES); checked with and without it whatever this CPU has, across the 32-byte head and chunk boundaries."""
    seed = os.urandom(32)
    want = keystream(seed, n, bits=bits, prg="aes-128-ctr")
    for via_gcm in (True, False):
        assert np.array_equal(read_stream(seed, n, bits=bits, prg="aes-128-ctr", via_gcm=via_gcm), want)
    assert np.array_equal(read_stream(seed, n, bits=bits, prg="chacha20"), keystream(seed, n, bits=bits))


@pytest.mark.parametrize("count", [1, 2, 5])
def test_masks_summed_on_threads_equal_one_by_one(count: int) -> None:
    n = CHUNK + 77
    masks = [(os.urandom(32), 1 if i % 3 else -1) for i in range(count)]
    want = np.arange(n, dtype=np.uint32)
    for seed, sign in masks:
        ks = keystream(seed, n, bits=32, prg="aes-128-ctr")
        want = want + ks if sign > 0 else want - ks
    for via_gcm in (True, False):
        acc = np.arange(n, dtype=np.uint32)
        add_masks(acc, masks, bits=32, prg="aes-128-ctr", via_gcm=via_gcm)
        assert np.array_equal(acc, want)


def test_aes_prg_output_is_uniform_bytes() -> None:
    raw = expand(bytes(32), 50_000, bits=32, prg="aes-128-ctr").to(torch.int64)
    counts = torch.bincount((raw & 0xFF).reshape(-1), minlength=256).double()
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 330  # 255 degrees of freedom: p ~ 0.001 at 330


def test_the_round_names_its_prg_and_clients_refuse_an_unknown_one() -> None:
    from tessera.secagg.client import step
    from tessera.secagg.pki import SimulatedPKI
    from tessera.secagg.plus import SecAggPlus

    setup = SecAggPlus().setup(1, ["a", "b", "c"], dim=3, graph_seed=0)
    assert setup.prg == PRG_NAME == ("aes-128-ctr" if cpu_has_aes() else "chacha20")
    with pytest.raises(ProtocolError, match="unknown mask PRG"):
        step(None, dataclasses.replace(setup, prg="rc4"), "a", lambda m: (torch.zeros(2), 1, {}), SimulatedPKI())


def test_encoded_input_is_in_range_within_one_step_and_unbiased() -> None:
    from tessera.secagg.client import encode_words
    from tessera.secagg.plus import SecAggPlus

    n = 3 * CHUNK + 7  # several chunks, quantised in parallel
    setup = SecAggPlus(clip=1.0, bits=16, max_weight=1.0).setup(1, ["a", "b"], dim=n + 1, graph_seed=0)
    x = torch.full((n,), 0.123456, dtype=torch.float64)
    x[:10] = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.25, 0.999, 1.0, 3.0, 1e-9, -1e-9], dtype=torch.float64)
    q = encode_words(x, 1, setup, 7)
    assert np.array_equal(q, encode_words(x, 1, setup, 7)) and not np.array_equal(q, encode_words(x, 1, setup, 8))
    assert int(q.max()) <= setup.levels and int(q[-1]) == setup.levels  # weight 1 travels exactly
    back = dequantize_sum(torch.from_numpy(q[:-1].astype(np.int64)), count=1, clip=1.0, levels=setup.levels)
    step = step_size(clip=1.0, levels=setup.levels)
    assert float((back - x.clamp(-1.0, 1.0)).abs().max()) < step + 1e-12
    assert abs(float(back[10:].mean()) - 0.123456) < 3 * step / math.sqrt(n - 10)


def test_failure_probability_of_the_chosen_degree() -> None:
    from tessera.secagg.graph import failure_probability

    for n, dropout in ((100, 0.05), (1000, 0.05), (100, 0.3)):
        k = default_degree(n, threshold=0.6, dropout=dropout)
        p = failure_probability(degree=k, threshold=share_threshold(0.6, k), dropout=dropout)
        assert p <= 1e-6 or k == n - 1  # the rule default_degree follows (else the complete graph)
    # Binomial oracle: 4 neighbours, threshold 4 holders (all four must stay), each drops with 0.1: 1 - 0.9^4.
    assert math.isclose(failure_probability(degree=4, threshold=4, dropout=0.1), 1 - 0.9**4)


@pytest.mark.parametrize("n,degree", [(9, 8), (30, 6), (101, 14)])
def test_one_clients_neighbours_equal_its_row_of_the_graph(n: int, degree: int) -> None:
    clients = [f"c{i}" for i in range(n)][::-1]
    graph = neighbours(clients, degree=degree, graph_seed=11)
    assert all(neighbours_of(clients, c, degree=degree, graph_seed=11) == graph[c] for c in clients)


@pytest.mark.parametrize("clip,l2_clip,examples", [(8.0, None, 1), (0.1, None, 7), (0.3, 2.0, 3)])
def test_a_float32_update_is_quantised_as_its_float64_widening(clip: float, l2_clip: float | None,
                                                               examples: int) -> None:
    """The client widens float32 chunk by chunk (no float64 copy of the update): the same words as widening first,
    whatever the clip (0.1 is not a float32), weight and L2 clip."""
    from tessera.secagg.client import encode_words
    from tessera.secagg.plus import SecAggPlus

    setup = SecAggPlus(clip=clip, l2_clip=l2_clip, max_weight=10.0).setup(1, ["a", "b", "c"], dim=CHUNK + 11,
                                                                         graph_seed=0, session=1)
    v = torch.randn(CHUNK + 10, generator=torch.Generator().manual_seed(0)) * 2 * clip
    assert np.array_equal(encode_words(v, examples, setup, 5), encode_words(v.double(), examples, setup, 5))


@pytest.mark.parametrize("n", [0, 1, 2, 5, 99])
def test_parallel_map_keeps_order_and_raises(n: int) -> None:
    from tessera.secagg.prg import parallel_map

    assert parallel_map(lambda x: x * x, list(range(n))) == [x * x for x in range(n)]
    if n >= 2:
        with pytest.raises(ZeroDivisionError):
            parallel_map(lambda x: 1 // (x - n + 1), list(range(n)))  # fails on the last item (another thread's batch)


def _reference_words(v: torch.Tensor, n: int, setup: SetupIns, seed: int) -> np.ndarray:
    """The client's quantisation written out whole in float64, as it was before it went chunk by chunk."""
    from tessera.secagg.prg import keystream_chunk

    x = v.double().numpy()
    scale = min(1.0, setup.l2_clip / max(float(np.linalg.norm(x)), 1e-300)) if setup.l2_clip > 0 else 1.0
    w = min(float(n), setup.max_weight) / setup.max_weight
    y = np.clip(x * scale, -setup.clip, setup.clip) * w
    y = (y + setup.clip) * (setup.levels / (2.0 * setup.clip))
    low = np.floor(y)
    key = hashlib.sha256(b"tessera/secagg/rounding|%d" % seed).digest()
    ks = np.concatenate([keystream_chunk(key, a, min(a + CHUNK, setup.dim), np.uint32, prg=PRG_NAME).copy()
                         for a in range(0, setup.dim, CHUNK)])
    q = np.minimum(low + (ks[:-1] < (y - low) * 2.0**32), setup.levels)
    last = w * setup.levels
    tail = min(math.floor(last) + (int(ks[-1]) < (last - math.floor(last)) * 2.0**32), setup.levels)
    return np.append(q, tail).astype(word(setup.bits))


@pytest.mark.parametrize("clip,levels,examples", [(8.0, None, 1), (0.3, 1231, 1), (0.3, 1231, 3), (0.1, None, 7)])
def test_quantised_words_equal_the_whole_vector_reference(clip: float, levels: int | None, examples: int) -> None:
    """Chunked quantisation (in place, clamped only where the largest value could exceed `levels`: levels=1231
    at clip 0.3 is such a case) gives the words of the plain whole-vector formula."""
    from tessera.secagg.client import encode_words
    from tessera.secagg.plus import SecAggPlus

    setup = SecAggPlus(clip=clip, max_weight=10.0).setup(1, ["a", "b", "c"], dim=CHUNK + 11, graph_seed=0, session=1)
    if levels is not None:
        setup = dataclasses.replace(setup, levels=levels)
    v = torch.randn(CHUNK + 10, generator=torch.Generator().manual_seed(1)) * 3 * clip
    v[:5] = torch.tensor([clip, -clip, 2 * clip, 0.0, -0.0])
    assert np.array_equal(encode_words(v, examples, setup, 9), _reference_words(v, examples, setup, 9))


@pytest.mark.parametrize("bits", [8, 16, 31, 32, 40, 64 - 2])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_masked_inputs_are_added_in_place_as_their_words(bits: int, dtype: torch.dtype) -> None:
    from tessera.secagg.prg import add_words, reduce, to_words

    t = torch.randint(-(2**7), 2**7, (1000,), generator=torch.Generator().manual_seed(bits)).to(dtype)
    start = np.arange(1000, dtype=word(bits)) * 7919
    acc = start.copy()
    add_words(acc, t, bits=bits)
    assert np.array_equal(reduce(acc, bits=bits), reduce(start + to_words(t, bits=bits), bits=bits))
    assert not np.array_equal(acc, start)
