"""Update compression for slow uplinks: a client mod that sends a compressed delta, a server decoder that restores it.

Each client sends `delta = y - x` (its trained params minus the model it was sent) in one of four codecs:
- `fp16`: the delta as float16 (half the bytes; deterministic rounding).
- `q8` / `q4`: stochastic uniform quantisation to 2^b - 1 levels between the tensor's min and max: code
  q = floor((d - lo) / step + u), u ~ U[0, 1) from a generator seeded per client and round, so E[lo + q step] = d
  (unbiased; variance <= step^2 / 4 per entry). Codes travel as uint8 (q4: two per byte) with (lo, step) per tensor.
- `topk`: the `fraction` largest-magnitude entries of delta + residual, as float32 values and int32 indices; the
  residual (what was not sent) stays in the client's state and is added before the next selection (error
  feedback), so nothing is lost, only delayed.
Integer buffers (counters) travel uncompressed. Bytes on the wire are those of the compressed tensors: backends
count the message they carry.

The server side wraps the job's aggregation: replies are decoded (x + decoded delta) as they arrive, before
validation, so every strategy aggregates ordinary params. Secure aggregation hides single replies, so this plugin
is refused next to it (the decoder must read each reply). Quantisation composes with SecAgg+ as
`SecAggPlus(code_bits=8 | 4, clip=...)`: masked codes must sum, so every client rounds (stochastically, unbiased)
on one shared grid [-clip, clip] instead of its own (lo, step), and the ring shrinks to the sum of n codes
(ceil(log2(n (2^b - 1) + 1)) bits, masked words as int16 / int8). Top-k cannot compose: each client picks its own
indices, and a masked sum of vectors with different supports would reveal which coordinates each client sent
(or need dense masks, which sends every coordinate and saves nothing).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any

import torch

from tessera.core.errors import ConfigError, ProtocolError
from tessera.core.types import Params
from tessera.horizontal.aggregation import Aggregation, FitOutcome
from tessera.horizontal.client import CallNext, ClientContext
from tessera.horizontal.job import Contribution, JobParts, Plugin
from tessera.horizontal.strategies.base import Strategy
from tessera.runtime.backend import Backend, ClientFailure, FailureKind, OnReply, Reply, Traffic, exchange_each
from tessera.runtime.messages import FitIns, FitRes

META, INDEX = "compression:meta", "compression:index"  # FitRes.extras keys
RESIDUAL = "compression:residual"  # ClientContext.state key (top-k error feedback)


class Codec(enum.Enum):
    FP16 = "fp16"
    Q8 = "q8"
    Q4 = "q4"
    TOPK = "topk"


# ------------------------------------------------------------------------------------------------- pure maths
def quantize(d: torch.Tensor, *, bits: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic uniform quantisation of `d` to `bits` (4 or 8): (uint8 codes, float64 [lo, step])."""
    flat = d.detach().reshape(-1).double()
    levels = 2**bits - 1
    lo = float(flat.min()) if flat.numel() else 0.0
    hi = float(flat.max()) if flat.numel() else 0.0
    step = (hi - lo) / levels if hi > lo else 1.0
    u = torch.rand(flat.shape, generator=generator, dtype=torch.float64)
    codes = torch.floor((flat - lo) / step + u).clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        codes = _pack4(codes)
    return codes, torch.tensor([lo, step], dtype=torch.float64)


def dequantize(codes: torch.Tensor, meta: torch.Tensor, *, bits: int, numel: int) -> torch.Tensor:
    """The float64 values lo + q * step (flat, `numel` long)."""
    q = _unpack4(codes, numel) if bits == 4 else codes
    if q.numel() != numel or meta.shape != (2,):
        raise ProtocolError(f"compressed tensor has {q.numel()} codes for {numel} entries; refusing it")
    return float(meta[0]) + q.double() * float(meta[1])


def top_k(d: torch.Tensor, residual: torch.Tensor, *, fraction: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """(values, int32 indices, new residual) of the largest |d + residual| entries; new residual = the rest."""
    acc = (d.detach().reshape(-1).float() + residual.reshape(-1))
    k = max(1, math.ceil(fraction * acc.numel())) if acc.numel() else 0
    idx = torch.topk(acc.abs(), k, sorted=False).indices if k else torch.zeros(0, dtype=torch.long)
    values = acc[idx].clone()
    rest = acc.clone()
    rest[idx] = 0.0
    return values, idx.to(torch.int32), rest.reshape(d.shape)


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def _unpack4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    both = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return both[:numel]


# ------------------------------------------------------------------------------------------------- the plugin
class Compression(Plugin):
    """Compress every client's update with `codec` (see the module docstring); `fraction` is top-k's share."""

    name = "compression"

    def __init__(self, codec: Codec | str, *, fraction: float = 0.01) -> None:
        self.codec = Codec(codec)
        if not 0 < fraction <= 1:
            raise ConfigError(f"Compression: fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def contribute(self, parts: JobParts) -> Contribution:
        # needs_single_updates: the decoder reads each reply, so compose() refuses a secure aggregation with it
        return Contribution(plugin=f"compression({self.codec.value})", roles=frozenset({"compression"}),
                            mods=(self.encode,), wrap_aggregation=lambda agg: Decoding(agg, self.codec),
                            needs_single_updates=True)

    def encode(self, msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
        reply = call_next(msg, ctx)
        if not isinstance(msg, FitIns) or not isinstance(reply, FitRes):
            return reply
        gen = torch.Generator().manual_seed(int(msg.config.get("seed", 0)) ^ 0xC0DEC)
        params: Params = {}
        meta: Params = {}
        index: Params = {}
        residual: dict[str, torch.Tensor] = dict(ctx.state.get(RESIDUAL, {}))
        for k, x in msg.params.items():
            y = reply.params[k]
            if not x.is_floating_point():
                params[k] = y
                continue
            d = y.double() - x.double()
            if self.codec is Codec.FP16:
                params[k] = d.half()
            elif self.codec is Codec.TOPK:
                r = residual.get(k, torch.zeros(d.shape, dtype=torch.float32))
                params[k], index[k], residual[k] = top_k(d, r, fraction=self.fraction)
            else:
                params[k], meta[k] = quantize(d, bits=8 if self.codec is Codec.Q8 else 4, generator=gen)
        if self.codec is Codec.TOPK:
            ctx.state[RESIDUAL] = residual
        extras = {**reply.extras, META: meta, INDEX: index}
        return FitRes(params=params, num_examples=reply.num_examples, metrics=reply.metrics, extras=extras)


def decode(res: FitRes, current: Params, codec: Codec) -> FitRes:
    """A compressed reply as ordinary params: current + decoded delta (integer buffers as sent)."""
    meta, index = res.extras.get(META, {}), res.extras.get(INDEX, {})
    params: Params = {}
    for k, x in current.items():
        if k not in res.params:
            raise ProtocolError(f"compressed update lacks tensor {k!r}")
        v = res.params[k]
        if not x.is_floating_point():
            params[k] = v
            continue
        if codec is Codec.FP16:
            d = v.double().reshape(x.shape)
        elif codec is Codec.TOPK:
            i = index.get(k)
            if i is None or i.shape != v.shape or (i.numel() and (int(i.min()) < 0 or int(i.max()) >= x.numel())):
                raise ProtocolError(f"top-k update for {k!r} has missing or out-of-range indices")
            d = torch.zeros(x.numel(), dtype=torch.float64)
            d[i.long()] = v.double()
            d = d.reshape(x.shape)
        else:
            if k not in meta:
                raise ProtocolError(f"quantised update for {k!r} lacks its range")
            bits = 8 if codec is Codec.Q8 else 4
            d = dequantize(v, meta[k], bits=bits, numel=x.numel()).reshape(x.shape)
        params[k] = (x.double() + d).to(x.dtype)
    extras = {n: e for n, e in res.extras.items() if n not in (META, INDEX)}
    return FitRes(params=params, num_examples=res.num_examples, metrics=res.metrics, extras=extras)


class _Decoding:
    """A backend as the aggregation sees it: every FitRes decoded as it arrives (bytes are the real backend's)."""

    def __init__(self, backend: Backend, current: Params, codec: Codec) -> None:
        self.backend, self.current, self.codec = backend, current, codec
        self.traffic: Traffic = backend.traffic  # the same counter object: bytes are the real backend's

    def start(self, clients: list[str]) -> None:
        self.backend.start(clients)

    def close(self) -> None:
        self.backend.close()

    def _decode(self, client: str, reply: Reply) -> Reply:
        if not isinstance(reply, FitRes):
            return reply
        try:
            return decode(reply, self.current, self.codec)
        except (ProtocolError, RuntimeError, ValueError) as exc:  # a malformed reply is that client's failure
            return ClientFailure(client, f"rejected: undecodable compressed update ({exc})", FailureKind.MALFORMED)

    def exchange(self, requests: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Reply]:
        return {c: self._decode(c, r) for c, r in self.backend.exchange(requests, timeout=timeout).items()}

    def exchange_each(self, requests: Mapping[str, Any], on_reply: OnReply, *,
                      timeout: float | None = None) -> dict[str, Reply]:
        return exchange_each(self.backend, requests, lambda c, r: on_reply(c, self._decode(c, r)), timeout=timeout)


class Decoding:
    """Wraps an aggregation so that it receives decoded replies (see `_Decoding`)."""

    def __init__(self, inner: Aggregation, codec: Codec) -> None:
        self.inner, self.codec = inner, codec

    def run(self, rnd: int, plan: list[tuple[str, FitIns]], backend: Backend, strategy: Strategy,
            current: Params, *, timeout: float | None) -> FitOutcome:
        return self.inner.run(rnd, plan, _Decoding(backend, current, self.codec), strategy, current,
                              timeout=timeout)
