"""Builders shared by the secure-aggregation tests: random updates and a backend that records every reply."""

from collections.abc import Mapping, Sequence, Set
from typing import Any

import numpy as np
import torch

from tessera.core.types import Params
from tessera.runtime.backend import InProcessBackend
from tessera.runtime.messages import FitIns
from tessera.secagg.messages import SetupIns, Stage
from tessera.secagg.plus import SecAggPlus, run_stages
from tessera.secagg.server import SecAggServer
from tessera.secagg.simulate import _Parties


def make_updates(n: int, *, seed: int = 0, scale: float = 2.0) -> list[Params]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(6, 5, generator=g) * scale, "b": torch.randn(3, generator=g) * scale}
            for _ in range(n)]


class Recorder:
    """Wraps a backend; keeps every (request, reply) pair that crossed it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.traffic = inner.traffic
        self.log: list[tuple[str, Any, Any]] = []

    def start(self, clients: list[str]) -> None:
        self.inner.start(clients)

    def exchange(self, requests: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        replies: dict[str, Any] = self.inner.exchange(requests, timeout=timeout)
        self.log.extend((c, requests[c], r) for c, r in replies.items())
        return replies

    def close(self) -> None:
        self.inner.close()


def spied_round(updates: Sequence[Params], *, dropouts: Set[int] = frozenset(), stage: Stage = Stage.COLLECT,
                threshold: float = 0.6, bits: int = 32, seed: int = 0,
                degree: int | None = None,
                l2_clip: float | None = None) -> tuple[SecAggServer, Recorder, SetupIns, dict[str, FitIns]]:
    """A SecAgg+ round like simulate_round's, with the backend's traffic recorded (may raise RoundFailed)."""
    n = len(updates)
    clients = [f"client{i}" for i in range(n)]
    cfg = SecAggPlus(threshold=threshold, clip=8.0, bits=bits, max_weight=1.0, degree=degree, l2_clip=l2_clip)
    setup = cfg.setup(1, clients, dim=sum(t.numel() for t in updates[0].values()) + 1, graph_seed=seed)
    rec = Recorder(InProcessBackend(_Parties(updates, {clients[i] for i in dropouts}, stage, cfg.pki)))
    seeds = np.random.SeedSequence([seed, 2]).generate_state(n).tolist()
    fit = {c: FitIns(round=1, params={}, config={"seed": int(s)}) for c, s in zip(clients, seeds, strict=True)}
    server = SecAggServer(setup, pki=cfg.pki)
    try:
        run_stages(server, rec, fit, timeout=None)
    finally:
        server.recorder = rec  # type: ignore[attr-defined]
    return server, rec, setup, fit
