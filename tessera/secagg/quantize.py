"""Fixed-point quantisation of float updates into Z_{2^bits}, and back.

A client's value x is clipped to [-clip, clip], mapped to [0, levels] and stochastically rounded (unbiased:
E[q] = exact). `levels` is chosen so that the sum of `clients` quantised vectors cannot wrap around the ring:
clients * levels < 2^bits. That headroom is checked before any client trains (`levels_for`), not discovered as a
silently wrong sum. The FedAvg weight w in [0, 1] travels as one more coordinate, quantised over [0, 1].

Error bound (per coordinate of the dequantised SUM of m clients whose values lie inside the clip range):
stochastic rounding moves each client's value by less than one step, so |sum_hat - sum| < m * step, with
step = 2 * clip / levels (`sum_error_bound`).
"""

from __future__ import annotations

import math

import torch

from tessera.core.errors import ConfigError

MIN_LEVELS = 256  # fewer than 8 bits of resolution per client makes the sum useless


def ring_mask(bits: int) -> int:
    """2^bits - 1: AND with it reduces an int64 (two's complement) modulo 2^bits."""
    return (1 << bits) - 1


def check_bits(bits: int) -> None:
    if not 8 <= bits <= 62:
        raise ConfigError(f"secagg.bits: must be between 8 and 62 (int64 arithmetic), got {bits}")


def levels_for(*, clients: int, bits: int) -> int:
    """Quantisation levels per client such that `clients` summed values never overflow Z_{2^bits}."""
    check_bits(bits)
    if clients < 1:
        raise ConfigError("secure aggregation needs at least one client")
    levels = ring_mask(bits) // clients
    if levels < MIN_LEVELS:
        need = math.ceil(math.log2(clients * MIN_LEVELS + 1))
        raise ConfigError(
            f"secagg.bits={bits} leaves {levels} levels per client for {clients} clients (overflow headroom); "
            f"raise secagg.bits to at least {need} or sample fewer clients per round"
        )
    return levels


def step_size(*, clip: float, levels: int) -> float:
    return 2.0 * clip / levels


def sum_error_bound(*, clients: int, clip: float, levels: int) -> float:
    """Largest |dequantised sum - true sum| per coordinate for in-range values of `clients` clients."""
    return clients * step_size(clip=clip, levels=levels)


def _stochastic_round(y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """floor(y) + [u < y - floor(y)], u ~ U[0, 1) from `gen`; overwrites y (two temporaries, not five)."""
    low = torch.floor(y)
    frac = y.sub_(low)
    up = torch.rand(y.shape, dtype=torch.float64, generator=gen).lt_(frac)  # 1.0 where rounded up
    return low.add_(up).to(torch.int64)  # exact: integers below 2^53


def quantize(x: torch.Tensor, *, clip: float, levels: int, gen: torch.Generator) -> torch.Tensor:
    """float values -> int64 in [0, levels]: clip to [-clip, clip], scale, stochastic rounding."""
    if not clip > 0:
        raise ConfigError(f"secagg.clip: must be positive, got {clip}")
    y = x.to(torch.float64, copy=True).clamp_(-clip, clip).add_(clip).mul_(levels / (2.0 * clip))
    return _stochastic_round(y, gen).clamp_(0, levels)


def quantize_unit(w: float, *, levels: int, gen: torch.Generator) -> torch.Tensor:
    """A weight in [0, 1] -> int64 in [0, levels] (one-element tensor)."""
    y = torch.tensor([min(max(w, 0.0), 1.0) * levels], dtype=torch.float64)
    return _stochastic_round(y, gen).clamp_(0, levels)


def dequantize_sum(total: torch.Tensor, *, count: int, clip: float, levels: int) -> torch.Tensor:
    """The float sum of `count` clients' values from the ring sum of their quantised values."""
    return total.double() * step_size(clip=clip, levels=levels) - count * clip


def dequantize_unit_sum(total: torch.Tensor, *, levels: int) -> torch.Tensor:
    return total.double() / levels
