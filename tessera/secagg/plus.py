"""SecAgg+ in the horizontal round: the `SecAggPlus` plugin, its client mod and its server `Aggregation`.

The Aggregation runs the four stages over `backend.exchange`, so it works unchanged over the in-process, Ray and
gRPC backends. Clients fold their FedAvg weight into the quantised update; the server unmasks sum_i w_i delta_i and
sum_i w_i, and hands the mean delta to the strategy's server update (`apply`): FedAvg, FedProx, FedAvgM, FedAdam,
FedYogi, FedAdagrad and client-level DP (distributed) all aggregate this way.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from tessera.core import serde
from tessera.core.config import PluginConfig
from tessera.core.errors import ConfigError, ProtocolError, RoundFailed
from tessera.core.logging import get_logger
from tessera.core.types import Params, check_compatible, is_finite
from tessera.horizontal.aggregation import FitOutcome, mean_strategy, require_quorum
from tessera.horizontal.job import Contribution, Extension, Plugin
from tessera.runtime.backend import Backend, ClientFailure
from tessera.runtime.messages import FitIns, FitRes
from tessera.secagg.client import step
from tessera.secagg.graph import default_degree, failure_probability, share_threshold
from tessera.secagg.messages import STAGES, ClientState, SetupIns, Stage
from tessera.secagg.pki import PKI, SimulatedPKI
from tessera.secagg.prg import PRG_NAME
from tessera.secagg.quantize import levels_for
from tessera.secagg.server import SecAggServer

if TYPE_CHECKING:
    from tessera.horizontal.client import CallNext, ClientContext
    from tessera.horizontal.job import JobParts
    from tessera.horizontal.strategies.base import Strategy

log = get_logger(__name__)
STATE_KEY = "secagg"


def flatten(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All tensors as one float64 vector, in key order."""
    return torch.cat([t.detach().double().reshape(-1) for t in params.values()])


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor]) -> Params:
    """Split a float64 vector back into tensors shaped like `like` (float64)."""
    out: Params = {}
    pos = 0
    for k, t in like.items():
        out[k] = vector[pos : pos + t.numel()].reshape(t.shape).clone()
        pos += t.numel()
    if pos != vector.numel():
        raise ValueError(f"vector has {vector.numel()} values, params need {pos}")
    return out


class SecAggPlusSettings(PluginConfig):
    """SecAgg+'s settings and their bounds: validates job.toml's `[secagg]` and `SecAggPlus(...)` alike."""

    SECTION: ClassVar[str] = "secagg"

    threshold: float = Field(0.6, gt=0.5, le=1.0, description="more than half, so two disjoint groups cannot "
                                                                "both unmask")
    clip: float = Field(8.0, gt=0, allow_inf_nan=False)
    bits: int = Field(32, ge=8, le=62, description="int64 arithmetic")
    max_weight: float = Field(10_000.0, gt=0)
    dropout: float = Field(0.3, ge=0, lt=1)
    degree: int | None = Field(None, ge=1)
    l2_clip: float | None = Field(None, gt=0)
    code_bits: int | None = Field(None, ge=2, le=16, description="compressed SecAgg+: b-bit codes per client; the "
                                                                  "ring is sized to their sum (overrides bits)")


def settings_of(plugin: Any) -> dict[str, Any]:
    """A plugin dataclass's settings (every field but the keys it signs with)."""
    return {f.name: getattr(plugin, f.name) for f in dataclasses.fields(plugin) if f.name != "pki"}


@dataclass(frozen=True)
class SecAggPlus(Plugin):
    """SecAgg+ secure aggregation (the server learns only the weighted sum of the round's updates).

    threshold: fraction of a client's share holders (itself + neighbours) needed to unmask it, in (0.5, 1];
    clip: per-coordinate range [-clip, clip] of an update delta before quantisation; bits: ring Z_{2^bits};
    max_weight: num_examples at which the FedAvg weight saturates (w = min(n, max_weight) / max_weight);
    dropout: fraction of clients the round is sized to survive (picks the neighbour degree); degree: override;
    l2_clip: if set, clients scale their update delta to at most this L2 norm before quantising;
    code_bits: compressed SecAgg+ (8 or 4 for Compression's q8/q4): each client stochastically rounds its update
    to 2^code_bits - 1 levels on [-clip, clip] (unbiased inside the range), and the ring is just large enough for
    the sum of n such codes, bits = ceil(log2(n (2^code_bits - 1) + 1)) <= code_bits + ceil(log2 n) (at least 8),
    replacing `bits`; masked words travel as int8/int16, so the upload shrinks with the ring;
    pki: the party keys clients sign their round keys and the survivor story with (default: a simulated PKI
    shared by every party of this in-process or Ray job; a deployment passes `PartyKeys` bound to its certificates).

    >>> simulate(parts, rounds=10, plugins=[SecAggPlus(threshold=0.6, clip=8.0, bits=32)])
    """

    name = "secagg+"

    threshold: float = 0.6
    clip: float = 8.0
    bits: int = 32
    max_weight: float = 10_000.0
    dropout: float = 0.3
    degree: int | None = None
    l2_clip: float | None = None
    code_bits: int | None = None
    pki: PKI = field(default_factory=SimulatedPKI, compare=False, repr=False)

    def __post_init__(self) -> None:
        SecAggPlusSettings(**settings_of(self))  # the one validation, shared with job.toml's [secagg]

    def setup(self, rnd: int, clients: list[str], *, dim: int, graph_seed: int,
              session: int | None = None) -> SetupIns:
        """The public config of a round: checks overflow headroom before any client trains."""
        n = len(clients)
        if n < 2:
            raise ConfigError("secure aggregation needs at least 2 clients per round (the sum of one update is the "
                              "update); raise strategy.min_fit_clients")
        degree = min(n - 1, self.degree) if self.degree else default_degree(n, threshold=self.threshold,
                                                                            dropout=self.dropout)
        if degree < n - 1 and degree % 2:
            degree += 1
        bits, levels = self.ring(n)
        return SetupIns(round=rnd, clients=tuple(clients), threshold=share_threshold(self.threshold, degree),
                        degree=min(degree, n - 1), graph_seed=graph_seed, bits=bits, clip=self.clip,
                        levels=levels, max_weight=float(self.max_weight), dim=dim,
                        session=secrets.randbits(62) if session is None else session,
                        l2_clip=float(self.l2_clip or 0.0), prg=PRG_NAME)

    def ring(self, clients: int) -> tuple[int, int]:
        """(ring bits, quantisation levels per client) for a round of `clients`: code_bits' codes and the smallest
        ring their sum cannot wrap, or `bits` and the levels that leave overflow headroom in it."""
        if self.code_bits is None:
            return self.bits, levels_for(clients=clients, bits=self.bits)
        levels = 2**self.code_bits - 1
        return max(8, (clients * levels).bit_length()), levels

    def contribute(self, parts: JobParts) -> Contribution:
        agg = SecAggPlusAggregation(self)
        # The masking mod runs outermost: it masks what every other mod produced (clipping, DP noise).
        return Contribution(plugin=self.name, roles=frozenset({"secure_aggregation"}), aggregation=agg,
                            outer_mods=(SecAggMod(self.pki),), extensions=(RoundInfo(agg),),
                            needs_mean_strategy=True)


def graph_seed(rnd: int, clients: list[str]) -> int:
    return int(np.random.SeedSequence([rnd, zlib.crc32("|".join(clients).encode())]).generate_state(1)[0])


def local_update(rnd: int, params: Params, config: Mapping[str, Any], ctx: ClientContext, call_next: CallNext,
                 *, protect: str) -> tuple[torch.Tensor, int, dict[str, float]]:
    """Train through the inner mods; the flat update delta, the example count and the metrics. An update of the
    wrong shape or with NaN/Inf is refused before it is masked or encrypted (`protect` names which)."""
    res = call_next(FitIns(round=rnd, params=params, config=dict(config)), ctx)
    if not isinstance(res, FitRes):
        raise ProtocolError(f"training returned {type(res).__name__}, not FitRes")
    check_compatible(params, res.params, who=f"update of {ctx.client}")
    if not is_finite(res.params):
        raise ProtocolError(f"the local update has NaN or Inf; not {protect} it")
    return flatten(res.params) - flatten(params), res.num_examples, dict(res.metrics)


def run_stage(msg: Any, ctx: ClientContext, call_next: CallNext, *, protocol: str, state_key: str,
              state_type: type, transition: Callable[..., tuple[Any, Any]], protect: str) -> Any:
    """The body of a secure-aggregation client mod: messages of `protocol` (a messages module) drive the client's
    stage machine (`transition(state, msg, me, train)`), whose state persists in `ctx.state[state_key]` as serde
    bytes; training runs through the inner mods; every other message passes through."""
    if type(msg).__module__ != protocol:
        return call_next(msg, ctx)
    raw = ctx.state.get(state_key)
    state = serde.decode_message(raw, expected=(state_type,)) if isinstance(raw, bytes) else None

    def train(m: Any) -> tuple[torch.Tensor, int, dict[str, float]]:
        return local_update(m.round, m.params, m.config, ctx, call_next, protect=protect)

    new, reply = transition(state, msg, ctx.client, train)
    ctx.state[state_key] = serde.encode_message(new)
    return reply


@dataclass(frozen=True)
class SecAggMod:
    """Client mod: runs the SecAgg+ stages; in the collect stage trains through the inner mods and masks."""

    pki: PKI
    __name__ = "secagg_mod"

    def __call__(self, msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
        return run_stage(msg, ctx, call_next, protocol="tessera.secagg.messages", state_key=STATE_KEY,
                         state_type=ClientState, transition=functools.partial(step, pki=self.pki),
                         protect="masking")


def run_stages(server: SecAggServer, backend: Backend, fit: Mapping[str, FitIns], *,
               timeout: float | None) -> None:
    """Drive the five stages over `backend.exchange`; raises RoundFailed before any unmasking when too few clients
    remain (a malformed reply is that client's dropout)."""
    for stage in STAGES:
        t0 = time.perf_counter()
        requests = server.requests(fit if stage == Stage.COLLECT else None)
        for client, reply in backend.exchange(requests, timeout=timeout).items():
            server.receive(client, reply)
        server.advance()
        server.seconds[stage.value] = time.perf_counter() - t0


class RoundInfo(Extension):
    """Extension: adds what the protocol did this round to the round's record (no secrets, no values)."""

    name = "secagg"

    def __init__(self, aggregation: SecAggPlusAggregation) -> None:
        self.aggregation = aggregation

    def on_round_end(self, rnd: int, record: dict[str, Any]) -> None:
        server = self.aggregation.last
        if server is None or server.result is None:
            return
        s = server.state.setup
        record["secagg"] = {"protocol": "secagg+", "clients": len(s.clients), "degree": s.degree,
                            "threshold": s.threshold, "bits": s.bits, "survivors": len(server.result.survivors),
                            "masks_rebuilt_for": len(server.revealed_sk), "prg": s.prg,
                            "dropout_sized_for": self.aggregation.config.dropout,
                            "failure_probability": failure_probability(degree=s.degree, threshold=s.threshold,
                                                                       dropout=self.aggregation.config.dropout)}


class SecAggPlusAggregation:
    """The fit phase of a round under SecAgg+: the server sees masked vectors and the unmasked sum only."""

    def __init__(self, config: SecAggPlus) -> None:
        self.config = config
        self.last: SecAggServer | None = None  # the last round's server state machine (for inspection)

    def run(self, rnd: int, plan: list[tuple[str, FitIns]], backend: Backend, strategy: Strategy,
            current: Params, *, timeout: float | None) -> FitOutcome:
        clients = [c for c, _ in plan]
        dim = sum(t.numel() for t in current.values()) + 1
        server = SecAggServer(self.config.setup(rnd, clients, dim=dim, graph_seed=graph_seed(rnd, clients)),
                              pki=self.config.pki, min_survivors=strategy.min_available)
        self.last = server
        run_stages(server, backend, dict(plan), timeout=timeout)
        res = server.result
        assert res is not None
        return mean_outcome(rnd, strategy, current, meta=server.meta, failures=server.state.failures,
                            values=res.values, weight=float(res.weight))


def mean_outcome(rnd: int, strategy: Strategy, current: Params, *, meta: Mapping[str, tuple[int, dict[str, float]]],
                 failures: Mapping[str, ClientFailure], values: torch.Tensor, weight: float) -> FitOutcome:
    """How every secure aggregation ends a round: the survivors' (clear) counts and metrics as results, the
    quorum check, and the strategy's server step from the unmasked or decrypted weighted sum."""
    results = [(c, FitRes(params={}, num_examples=n, metrics=m)) for c, (n, m) in meta.items()]
    failed = [f for c, f in failures.items() if c not in meta]
    require_quorum(rnd, len(results), failed, strategy)
    if not weight > 1e-12:  # fixed point or CKKS noise: a sum of zero weights is never exactly 0
        raise RoundFailed(f"round {rnd}: the surviving clients' weights sum to 0 (no training examples)")
    mean = unflatten(values / weight, current)
    return FitOutcome(mean_strategy(strategy).apply(rnd, current, mean), results, failed)
