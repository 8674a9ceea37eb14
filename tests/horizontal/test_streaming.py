"""Streaming aggregation: each reply folded into a running sum as it arrives equals the batch aggregate."""

import itertools
import threading
from typing import Any

import pytest
import torch

from tessera.horizontal.aggregation import PlainAggregation
from tessera.horizontal.strategies import FedAdam, FedAvg, FedMedian
from tessera.privacy.client_dp import ClientDPStrategy
from tessera.privacy.ledger import PrivacyLedger
from tessera.runtime.backend import ClientFailure, FailureKind, InProcessBackend, exchange_each
from tessera.runtime.messages import FitIns, FitRes
from tests.horizontal.helpers import params_equal


def _round(n: int = 5, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[tuple[str, FitRes]]]:
    g = torch.Generator().manual_seed(seed)
    current = {"w": torch.randn(4, 7, generator=g), "b": torch.randn(7, generator=g),
               "steps": torch.tensor(10, dtype=torch.int64)}
    replies = []
    for i in range(n):
        params = {"w": current["w"] + 0.1 * torch.randn(4, 7, generator=g),
                  "b": current["b"] + 0.1 * torch.randn(7, generator=g),
                  "steps": torch.tensor(10 + i, dtype=torch.int64)}
        replies.append((f"c{i}", FitRes(params=params, num_examples=3 + 5 * i)))
    return current, replies


def _reference_delta(current: dict[str, torch.Tensor], replies: list[tuple[str, FitRes]]) -> dict[str, torch.Tensor]:
    """The float64 example-weighted mean of the deltas, written out by hand."""
    total = sum(r.num_examples for _, r in replies)
    return {k: sum((r.params[k].double() - c.double()) * r.num_examples for _, r in replies) / total  # type: ignore[misc]
            for k, c in current.items()}


def _streamed(strategy: Any, current: dict[str, torch.Tensor], replies: list[tuple[str, FitRes]]) -> Any:
    acc = strategy.accumulator(1, current)
    for cid, res in replies:
        acc.fold(cid, res)
    return acc.finish()


@pytest.mark.parametrize("make", [FedAvg, lambda: FedAvg(server_lr=0.5), FedAdam])
def test_streamed_equals_batch_weighted_mean_in_any_reply_order(make: Any) -> None:
    current, replies = _round()
    batch = make().aggregate_fit(1, replies, current)
    delta = _reference_delta(current, replies)
    reference = make().apply(1, current, delta)  # the server step from the float64 reference mean
    assert params_equal(batch, reference)
    for order in itertools.islice(itertools.permutations(replies), 0, None, 17):  # 8 of the 120 orders
        assert params_equal(_streamed(make(), current, list(order)), batch)


def test_the_streamed_mean_delta_is_the_float64_reference() -> None:
    from tessera.horizontal.strategies.fedavg import MeanDelta

    current, replies = _round()
    fold = MeanDelta(FedAvg(), 1, current)
    for cid, res in reversed(replies):
        fold.fold(cid, res)
    got, want = fold.delta(), _reference_delta(current, replies)
    for k in want:
        assert got[k].dtype == torch.float64
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-15)


def test_client_level_dp_streams_the_same_noisy_mean_as_the_batch() -> None:
    current, replies = _round()
    for mode in ("central", "distributed"):
        def dp(mode: str = mode) -> ClientDPStrategy:
            return ClientDPStrategy(FedAvg(), clip=0.5, noise_multiplier=1.0, mode=mode, ledger=PrivacyLedger(),
                                    seed=7)
        assert params_equal(_streamed(dp(), current, replies[::-1]), dp().aggregate_fit(1, replies, current))


def test_robust_aggregators_say_they_need_every_update() -> None:
    assert FedMedian().accumulator(1, {}) is None


class _Replies:
    def __init__(self, replies: dict[str, FitRes]) -> None:
        self.replies = replies

    def handle(self, client: str, msg: Any) -> Any:
        return self.replies[client]


def test_the_coordinator_keeps_counts_and_metrics_of_folded_replies_not_their_tensors() -> None:
    current, replies = _round(3)
    bad = FitRes(params={**replies[0][1].params, "w": torch.full((4, 7), float("nan"))}, num_examples=1)
    backend = InProcessBackend(_Replies({**dict(replies), "nan": bad}))
    plan = [(c, FitIns(round=1, params=current)) for c in [*dict(replies), "nan"]]
    out = PlainAggregation().run(1, plan, backend, FedAvg(), current, timeout=None)
    assert params_equal(out.params, FedAvg().aggregate_fit(1, replies, current))
    assert [c for c, _ in out.results] == [c for c, _ in replies]
    assert all(r.params == {} and r.num_examples == dict(replies)[c].num_examples for c, r in out.results)
    assert [(f.client, f.kind) for f in out.failures] == [("nan", FailureKind.REJECTED)]


class _Gate:
    """Client 'slow' answers only once the test lets it, after the exchange has timed out."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.done = threading.Event()

    def handle(self, client: str, msg: Any) -> Any:
        if client == "slow":
            self.release.wait(timeout=30)
            self.done.set()
        return FitRes(params={}, num_examples=1)


def test_a_reply_arriving_after_the_deadline_is_never_folded() -> None:
    gate = _Gate()
    backend = InProcessBackend(gate, max_workers=2)
    backend.start(["fast", "slow"])
    folded: list[str] = []

    def on_reply(cid: str, rep: Any) -> Any:
        folded.append(cid)
        return rep

    try:
        out = exchange_each(backend, {"fast": FitIns(round=1, params={}), "slow": FitIns(round=1, params={})},
                            on_reply, timeout=1.0)
        gate.release.set()
        assert gate.done.wait(timeout=30)
    finally:
        backend.close()
    assert folded == ["fast"]
    assert isinstance(out["slow"], ClientFailure) and out["slow"].kind is FailureKind.TIMEOUT
    assert isinstance(out["fast"], FitRes)


def test_float32_accumulation_is_close_to_the_float64_reference_and_refuses_unknown_dtypes() -> None:
    from tessera.core.errors import ConfigError

    current, replies = _round(n=8)
    exact = FedAvg().aggregate_fit(1, replies, current)
    wide = _streamed(FedAvg(), current, replies)
    narrow = _streamed(FedAvg(accumulate="float32"), current, list(reversed(replies)))
    assert params_equal(wide, exact)
    for k, x in exact.items():
        assert narrow[k].dtype == x.dtype
        if x.is_floating_point():  # error bound: about clients * 2**-24 relative, per coordinate
            torch.testing.assert_close(narrow[k], x, rtol=8 * 2**-24, atol=8 * 2**-24 * x.abs().max().item())
        else:
            assert torch.equal(narrow[k], x)  # integer counters are still summed in float64
    with pytest.raises(ConfigError, match=r"accumulate.*float32"):
        FedAvg(accumulate="float16")


def test_float32_accumulation_reuses_an_owned_reply_and_never_writes_a_shared_one() -> None:
    """A transport's own buffers (OwnedParams) become the running sum and then the new params: no extra model
    copy. Replies shared with anyone else (in-process hand-over) are never written."""
    from tessera.core.types import OwnedParams

    current, replies = _round(n=3)
    kept = {k: v.clone() for k, v in replies[0][1].params.items()}
    shared = _streamed(FedAvg(accumulate="float32"), current, replies)
    assert all(torch.equal(replies[0][1].params[k], v) for k, v in kept.items())  # plain dict: untouched

    owned = [(c, FitRes(params=OwnedParams({k: v.clone() for k, v in r.params.items()}),
                        num_examples=r.num_examples)) for c, r in replies]
    first = owned[0][1].params["w"].data_ptr()
    out = _streamed(FedAvg(accumulate="float32"), current, owned)
    assert out["w"].data_ptr() == first  # the first reply's memory is the new global params
    assert params_equal(out, shared)  # the same bits as accumulating into fresh zeros
