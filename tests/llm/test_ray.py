"""Federated LoRA on the Ray backend: each actor process builds the base once and serves many virtual clients
with it, and the run equals the in-process run bit for bit."""

import os
from typing import Any

import pytest
import torch

from tessera.core.types import Params
from tessera.horizontal.aggregation import FitOutcome, PlainAggregation
from tessera.horizontal.client import CallNext, ClientContext
from tessera.horizontal.simulation import JobParts, simulate
from tessera.horizontal.strategies import FedAvg, Strategy
from tessera.llm import LOADS
from tessera.runtime.backend import Backend
from tessera.runtime.messages import FitIns, FitRes
from tests.llm.helpers import LLAMA, clients, llama_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_cluster: None) -> None:
    """Every test here runs on the session's Ray (tests/conftest.py)."""


def base_loads_mod(msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
    """Reports, with each FitRes, which process trained and how often that process has built the base."""
    reply = call_next(msg, ctx)
    if isinstance(reply, FitRes):
        extra = {"pid": float(os.getpid()), "base_loads": float(LOADS.get(LLAMA, 0))}
        return FitRes(params=reply.params, num_examples=reply.num_examples, metrics={**reply.metrics, **extra},
                      extras=reply.extras)
    return reply


class Capture(PlainAggregation):
    """The plain fit phase, keeping every round's accepted replies for the test to inspect."""

    def __init__(self) -> None:
        self.replies: list[FitRes] = []

    def run(self, rnd: int, plan: list[tuple[str, FitIns]], backend: Backend, strategy: Strategy,
            current: Params, *, timeout: float | None) -> FitOutcome:
        outcome = super().run(rnd, plan, backend, strategy, current, timeout=timeout)
        self.replies += [r for _, r in outcome.results]
        return outcome


def test_ray_actors_share_one_base_each_and_match_the_in_process_run() -> None:
    def parts() -> JobParts:
        return JobParts(task=llama_task(4, train_size=8, test_size=4), strategy=FedAvg(fraction_evaluate=0.0),
                        clients=clients(4), mods=[base_loads_mod])

    on_ray_parts = parts()
    capture = on_ray_parts.aggregation = Capture()
    _, on_ray = simulate(on_ray_parts, rounds=2, seed=4, backend="ray", backend_options={"num_actors": 2})
    _, in_process = simulate(parts(), rounds=2, seed=4)
    assert list(on_ray) == list(in_process)
    for k in on_ray:
        assert torch.equal(on_ray[k], in_process[k]), k
    # 4 clients x 2 rounds ran in at most 2 actor processes (not this one), each built the base exactly once
    assert len(capture.replies) == 8
    pids = {r.metrics["pid"] for r in capture.replies}
    assert 1 <= len(pids) <= 2 and float(os.getpid()) not in pids
    assert all(r.metrics["base_loads"] == 1.0 for r in capture.replies)
