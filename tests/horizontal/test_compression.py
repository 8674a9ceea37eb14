"""Update compression: unbiased stochastic quantisation, exact error feedback, bytes on the wire, refusals.

Oracles: the mean of many quantisation draws is within 6 standard errors (step / (2 sqrt N)) of the input; top-k's
residual is exactly what was not sent (sent + residual == delta + previous residual, entry for entry); fp16 and
q8 runs train like the uncompressed run (decoded params within the codec's rounding of the plain ones, by hand);
bytes up shrink by the codec's ratio; SecAgg+ next to compression is refused naming both.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tessera.core.errors import ConfigError
from tessera.horizontal.client import ClientContext
from tessera.horizontal.compression import RESIDUAL, Codec, Compression, decode, dequantize, quantize, top_k
from tessera.horizontal.simulation import JobParts, simulate
from tessera.horizontal.strategies import FedAvg
from tessera.runtime.messages import FitIns, FitRes

from .helpers import make_data, make_task


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_quantisation_is_unbiased(bits: int) -> None:
    x = torch.randn(200, generator=torch.Generator().manual_seed(1)).double()
    gen = torch.Generator().manual_seed(2)
    draws = 2000
    total = torch.zeros_like(x)
    step = 0.0
    for _ in range(draws):
        codes, meta = quantize(x, bits=bits, generator=gen)
        assert codes.dtype == torch.uint8 and codes.numel() == (x.numel() if bits == 8 else x.numel() // 2)
        total += dequantize(codes, meta, bits=bits, numel=x.numel())
        step = float(meta[1])
    bound = 6 * step / (2 * draws**0.5)  # |mean - x| <= 6 standard errors; a single draw is off by up to step
    assert float((total / draws - x).abs().max()) <= bound
    one = dequantize(*quantize(x, bits=bits, generator=gen), bits=bits, numel=x.numel())
    assert float((one - x).abs().max()) <= step + 1e-12


def test_top_k_error_feedback_keeps_exactly_what_was_not_sent() -> None:
    g = torch.Generator().manual_seed(0)
    residual = torch.zeros(50)
    sent_total = torch.zeros(50)
    delta_total = torch.zeros(50)
    for _ in range(5):
        d = torch.randn(50, generator=g)
        values, idx, new = top_k(d, residual, fraction=0.1)
        assert values.numel() == 5 and idx.dtype == torch.int32
        sent = torch.zeros(50)
        sent[idx.long()] = values
        assert torch.equal(sent + new, d + residual)  # nothing lost: sent + kept == what there was to send
        assert torch.equal(new[idx.long()], torch.zeros(5))
        assert float(values.abs().min()) >= float(new.abs().max())  # the largest were sent
        residual = new
        sent_total += sent
        delta_total += d
    assert torch.allclose(sent_total + residual, delta_total, atol=1e-5)


def _one_round(codec: Codec | None, **kw: Any) -> tuple[dict[str, torch.Tensor], Any]:
    data = make_data(num_clients=3, rows=64)
    parts = JobParts(task=make_task(data, hidden=(256, 256)), strategy=FedAvg(fraction_evaluate=0.0),
                     clients=list(data))
    plugins = [Compression(codec, **kw)] if codec is not None else []
    hist, params = simulate(parts, rounds=1, seed=1, plugins=plugins)
    return params, hist.records[0]


def test_compressed_rounds_train_like_plain_ones_and_send_fewer_bytes() -> None:
    plain, rec = _one_round(None)
    sizes = {None: rec["bytes_up"]}
    for codec, tol in ((Codec.FP16, 1e-3), (Codec.Q8, 0.02), (Codec.Q4, 0.3), (Codec.TOPK, 1.0)):
        params, r = _one_round(codec, fraction=0.01)
        sizes[codec] = r["bytes_up"]
        assert r["clients_succeeded"] == 3
        for k in plain:  # each codec's error bound per entry: fp16 rounding, one quantisation step
            assert float((params[k] - plain[k]).abs().max()) <= tol, (codec, k)
    ratio = {c.value: sizes[c] / sizes[None] for c in (Codec.FP16, Codec.Q8, Codec.Q4, Codec.TOPK)}
    assert 0.45 < ratio["fp16"] < 0.55 and ratio["q8"] < 0.30 and ratio["q4"] < 0.17 and ratio["topk"] < 0.05, ratio


def test_decoder_refuses_out_of_range_indices() -> None:
    current = {"w": torch.zeros(4)}
    bad = FitRes(params={"w": torch.ones(1)}, num_examples=1,
                 extras={"compression:index": {"w": torch.tensor([9], dtype=torch.int32)}})
    with pytest.raises(Exception, match="out-of-range"):
        decode(bad, current, Codec.TOPK)


def test_client_state_holds_the_residual_between_rounds() -> None:
    comp = Compression(Codec.TOPK, fraction=0.25)
    ctx = ClientContext("c0")
    x = {"w": torch.zeros(8)}
    y = {"w": torch.arange(8.0)}
    reply = comp.encode(FitIns(round=1, params=x, config={}), ctx,
                        lambda m, c: FitRes(params=y, num_examples=1))
    assert sorted(reply.params["w"].tolist()) == [6.0, 7.0]
    assert torch.equal(ctx.state[RESIDUAL]["w"], torch.tensor([0, 1, 2, 3, 4, 5, 0, 0.0]))


def test_compression_is_refused_next_to_secure_aggregation() -> None:
    from tessera.secagg.plus import SecAggPlus

    data = make_data(num_clients=3)
    parts = JobParts(task=make_task(data), strategy=FedAvg(), clients=list(data))
    with pytest.raises(ConfigError, match=r"compression\(topk\).*secagg"):
        simulate(parts, rounds=1, plugins=[Compression("topk"), SecAggPlus()])


@pytest.mark.parametrize(("code_bits", "ring_bits", "wire_share"), [(8, 10, 0.5), (4, 8, 0.25)])
def test_compressed_secagg_sum_equals_the_clear_sum_of_the_same_codes(code_bits: int, ring_bits: int,
                                                                     wire_share: float) -> None:
    # SecAggPlus(code_bits=b): each client's b-bit stochastic codes on [-clip, clip]; the ring holds their sum
    import numpy as np

    from tessera.secagg.client import encode_input
    from tessera.secagg.plus import flatten
    from tessera.secagg.quantize import step_size
    from tessera.secagg.simulate import run_round

    g = torch.Generator().manual_seed(5)
    updates = [{"w": torch.randn(20_000, generator=g) * 0.05} for _ in range(3)]
    clip = 0.25
    rep = run_round(updates, threshold=0.6, dropouts=set(), clip=clip, bits=32, seed=3, code_bits=code_bits)
    setup = rep.server.state.setup
    assert (setup.bits, setup.levels) == (ring_bits, 2**code_bits - 1)  # ceil(log2(3 (2^b - 1) + 1)), at least 8
    seeds = np.random.SeedSequence([3, 2]).generate_state(3).tolist()  # run_round's per-client rounding seeds
    codes = [encode_input(flatten(u), 1, setup, int(s)) for u, s in zip(updates, seeds, strict=True)]
    assert all(int(c.max()) <= setup.levels for c in codes)
    assert rep.server.result is not None
    assert torch.equal(rep.server.result.ring_sum, sum(codes))  # exact: the masked sum is the clear code sum
    true = sum(u["w"].double().clamp(-clip, clip) for u in updates)
    bound = 3 * step_size(clip=clip, levels=setup.levels)  # each client moves by less than one step
    assert float((rep.sum["w"] - true).abs().max()) < bound
    plain = run_round(updates, threshold=0.6, dropouts=set(), clip=clip, bits=32, seed=3)
    ratio = rep.bytes_up / plain.bytes_up  # masked words int16 / int8 instead of int32 (+ the same key traffic)
    assert wire_share <= ratio < wire_share + 0.02, ratio


def test_top_k_and_per_client_quantisation_stay_refused_next_to_secagg() -> None:
    from tessera.secagg.plus import SecAggPlus

    data = make_data(num_clients=3)
    parts = JobParts(task=make_task(data), strategy=FedAvg(), clients=list(data))
    for codec in ("topk", "q8"):  # q8 under SecAgg+ is SecAggPlus(code_bits=8): a grid shared by every client
        with pytest.raises(ConfigError, match=rf"compression\({codec}\).*secagg"):
            simulate(parts, rounds=1, plugins=[Compression(codec), SecAggPlus()])
