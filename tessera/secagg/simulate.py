"""`simulate_round`: the whole SecAgg+ protocol among in-process parties, every message through the wire format.

Tests and benchmarks use it; dropouts are injected by making chosen clients vanish from a chosen stage on.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tessera.core import serde
from tessera.core.errors import ConfigError
from tessera.core.types import Params
from tessera.runtime.backend import InProcessBackend
from tessera.runtime.messages import FitIns
from tessera.secagg.client import step
from tessera.secagg.messages import REQUESTS, STAGES, ClientState, MaskedInputIns, Stage
from tessera.secagg.pki import PKI
from tessera.secagg.plus import SecAggPlus, run_stages, unflatten
from tessera.secagg.server import SecAggServer


def flat(params: Params) -> torch.Tensor:
    """The update as one vector in its own float dtype (a view where it is one tensor): the client quantises
    float32 chunk by chunk, without a float64 copy of the whole update."""
    parts = [t.detach().reshape(-1) for t in params.values()]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _Parties:
    """A Handler holding every client's SecAgg+ state; each client's 'training' returns its fixed update."""

    def __init__(self, updates: Sequence[Params], drop: Set[str], drop_stage: Stage, pki: PKI) -> None:
        self.updates = updates  # flattened only when a client trains (benchmarks pass a lazy sequence)
        self.pki = pki
        self.state: dict[str, bytes] = {}
        self.drop, self.first_dropped = drop, STAGES.index(drop_stage)

    def handle(self, client: str, msg: Any) -> Any:
        stage = next(s for s, t in REQUESTS.items() if isinstance(msg, t))
        if client in self.drop and STAGES.index(stage) >= self.first_dropped:
            raise ConnectionError("client went offline")
        raw = self.state.get(client)
        state = serde.decode_message(raw, expected=(ClientState,)) if raw is not None else None

        def train(m: MaskedInputIns) -> tuple[torch.Tensor, int, dict[str, float]]:
            return flat(self.updates[int(client.removeprefix("client"))]), 1, {}

        new, reply = step(state, msg, client, train, self.pki)
        self.state[client] = serde.encode_message(new)
        return reply


@dataclass(frozen=True)
class RoundReport:
    sum: Params  # float64, dequantised sum of the included clients' updates
    included: tuple[int, ...]  # indices of the clients whose updates are in the sum
    server: SecAggServer
    bytes_up: int
    bytes_down: int


def run_round(updates: Sequence[Params], *, threshold: float | int, dropouts: Set[int], clip: float, bits: int,
              seed: int, drop_stage: Stage = Stage.COLLECT, degree: int | None = None,
              dropout: float = 0.3, code_bits: int | None = None) -> RoundReport:
    """One SecAgg+ round among len(updates) in-process clients; clients in `dropouts` vanish at `drop_stage`."""
    n = len(updates)
    if n < 2:
        raise ConfigError("secure aggregation needs at least 2 clients")
    frac = float(threshold)
    if isinstance(threshold, int):
        degree = degree or n - 1
        frac = threshold / (degree + 1)
    cfg = SecAggPlus(threshold=frac, clip=clip, bits=bits, max_weight=1.0, degree=degree, dropout=dropout,
                     code_bits=code_bits)
    clients = [f"client{i}" for i in range(n)]
    setup = cfg.setup(1, clients, dim=sum(t.numel() for t in updates[0].values()) + 1,
                      graph_seed=int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]), session=seed)
    parties = _Parties(updates, {clients[i] for i in dropouts}, drop_stage, cfg.pki)
    backend = InProcessBackend(parties)
    seeds = np.random.SeedSequence([seed, 2]).generate_state(n).tolist()
    fit = {c: FitIns(round=1, params={}, config={"seed": int(s)}) for c, s in zip(clients, seeds, strict=True)}
    server = SecAggServer(setup, pki=cfg.pki)
    run_stages(server, backend, fit, timeout=None)
    assert server.result is not None
    included = tuple(clients.index(c) for c in server.result.survivors)
    return RoundReport(sum=unflatten(server.result.values, updates[0]), included=included, server=server,
                       bytes_up=backend.traffic.up, bytes_down=backend.traffic.down)


def simulate_round(updates: Sequence[Params], *, threshold: float | int, dropouts: Set[int], clip: float,
                   bits: int, seed: int) -> Params:
    """Run SecAgg+ among in-process parties and return the dequantised SUM (float64) of the updates of the
    clients not in `dropouts` (indices into `updates`), which vanish after the others masked against them.

    `threshold` is a fraction (0.5, 1] of each client's share holders, or an absolute share count (int).
    Raises RoundFailed (and reveals nothing) when too few clients remain to unmask.

    >>> total = simulate_round(updates, threshold=0.6, dropouts={3}, clip=8.0, bits=32, seed=0)
    """
    return run_round(updates, threshold=threshold, dropouts=dropouts, clip=clip, bits=bits, seed=seed).sum
