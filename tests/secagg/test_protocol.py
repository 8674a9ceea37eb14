"""The SecAgg+ protocol: exact sums under dropouts at every stage, refusals, and what the server gets to see."""

import dataclasses
import math

import pytest
import torch

from tessera.core import serde
from tessera.core.errors import ProtocolError, RoundFailed
from tessera.runtime.backend import FailureKind
from tessera.runtime.messages import FitIns
from tessera.secagg import Stage, run_round, simulate_round
from tessera.secagg.client import encode_input, step
from tessera.secagg.messages import (
    ConsistencyIns,
    KeysRes,
    MaskedInputIns,
    MaskedInputRes,
    ShareKeysIns,
    ShareKeysRes,
    UnmaskRes,
)
from tessera.secagg.pki import SimulatedPKI
from tessera.secagg.plus import flatten
from tessera.secagg.quantize import ring_mask, sum_error_bound
from tessera.secagg.server import SecAggServer

from .helpers import make_updates, spied_round

N = 10


def plain_sum(updates: list, idx: tuple[int, ...] | list[int]) -> dict:
    return {k: sum(updates[i][k].double() for i in idx) for k in updates[0]}


def max_err(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT, Stage.CONSISTENCY, Stage.UNMASK])
def test_a_drop_at_each_stage_still_gives_the_survivors_sum(stage: Stage) -> None:
    updates = make_updates(N)
    rep = run_round(updates, threshold=0.6, dropouts={1, 4}, clip=8.0, bits=32, seed=3, drop_stage=stage)
    # Dropped before masking (or before sending the input): left out; dropped after it (consistency, unmasking):
    # already in.
    late = stage in (Stage.CONSISTENCY, Stage.UNMASK)
    expected = tuple(range(N)) if late else tuple(i for i in range(N) if i not in {1, 4})
    assert rep.included == expected
    bound = sum_error_bound(clients=len(expected), clip=8.0, levels=rep.server.state.setup.levels)
    assert max_err(rep.sum, plain_sum(updates, expected)) < bound
    # Pairwise masks of a client are rebuilt from shares only if it vanished after others masked with it.
    assert rep.server.revealed_sk == ({"client1", "client4"} if stage == Stage.COLLECT else set())


@pytest.mark.parametrize("dropped", [set(), {7}, {0, 3, 8}])  # 0%, 10%, 30% after masking
def test_unmasked_ring_sum_is_exactly_the_sum_of_quantised_inputs(dropped: set[int]) -> None:
    updates = make_updates(N, seed=1)
    server, _, setup, fit = spied_round(updates, dropouts=dropped)
    alive = [i for i in range(N) if i not in dropped]
    q = [encode_input(flatten(updates[i]), 1, setup, fit[f"client{i}"].config["seed"]) for i in alive]
    assert server.result is not None
    assert torch.equal(server.result.ring_sum, sum(q).bitwise_and(ring_mask(setup.bits)))  # integers, exact
    # Dequantised mean vs float mean: within the quantisation bound divided by the count.
    m = len(alive)
    mean = server.result.values / m
    exact = flatten(plain_sum(updates, alive)) / m
    assert float((mean - exact).abs().max()) < sum_error_bound(clients=m, clip=8.0, levels=setup.levels) / m
    assert math.isclose(server.result.weight, m, abs_tol=m / setup.levels)


def test_simulate_round_matches_plain_sum_with_30_percent_dropout() -> None:
    updates = make_updates(20, seed=2)
    drops = {2, 5, 6, 11, 15, 19}
    total = simulate_round(updates, threshold=0.6, dropouts=drops, clip=8.0, bits=32, seed=0)
    alive = [i for i in range(20) if i not in drops]
    assert max_err(total, plain_sum(updates, alive)) < sum_error_bound(clients=14, clip=8.0, levels=2**32 // 20)


@pytest.fixture
def servers(monkeypatch: pytest.MonkeyPatch) -> list[SecAggServer]:
    """Every SecAggServer built during the test, to inspect after a failed round."""
    seen: list[SecAggServer] = []
    orig = SecAggServer.__init__

    def track(self: SecAggServer, setup: object, **kw: object) -> None:
        orig(self, setup, **kw)  # type: ignore[arg-type]
        seen.append(self)

    monkeypatch.setattr(SecAggServer, "__init__", track)
    return seen


def test_below_threshold_after_masking_aborts_and_reveals_nothing(servers: list[SecAggServer]) -> None:
    with pytest.raises(RoundFailed, match="no sum is revealed"):
        run_round(make_updates(N), threshold=0.6, dropouts={0, 1, 2, 3, 4, 5}, clip=8.0, bits=32, seed=0)
    assert servers[0].result is None and not servers[0].revealed_b and not servers[0].revealed_sk
    assert servers[0].state.stage == Stage.COLLECT  # it never reached unmasking


def test_too_few_shares_while_unmasking_aborts_before_removing_any_mask(servers: list[SecAggServer]) -> None:
    with pytest.raises(RoundFailed, match="no sum is revealed"):
        run_round(make_updates(N), threshold=0.9, dropouts={0, 1, 2}, clip=8.0, bits=32, seed=0,
                  drop_stage=Stage.UNMASK)
    assert servers[0].result is None and not servers[0].revealed_b and not servers[0].revealed_sk


def test_masked_inputs_look_uniform_and_differ_from_the_clear_update() -> None:
    updates = [{"w": torch.zeros(4000)} for _ in range(5)]  # all-zero updates: any structure would show
    _server, rec, setup, fit = spied_round(updates)
    masked = [r.masked for _, _, r in rec.log if isinstance(r, MaskedInputRes)]
    assert len(masked) == 5
    clear = encode_input(torch.zeros(4000), 1, setup, fit["client0"].config["seed"])
    for m in masked:
        assert not torch.equal(m.long() & ring_mask(32), clear)
        counts = torch.bincount(m.reshape(-1).view(torch.uint8).long(), minlength=256).double()
        chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
        assert chi2 < 340  # 255 dof; the clear quantised zeros would give ~10^5


def test_server_never_holds_both_secrets_of_a_survivor() -> None:
    server, rec, _, _ = spied_round(make_updates(N), dropouts={2, 6, 9})
    assert server.revealed_b == {f"client{i}" for i in range(N) if i not in {2, 6, 9}}
    assert server.revealed_sk == {"client2", "client6", "client9"}
    assert not server.revealed_b & server.revealed_sk
    for _, _, r in rec.log:  # and no client ever handed over both kinds of share for one owner
        if isinstance(r, UnmaskRes):
            assert not set(r.b_shares) & set(r.sk_shares)


# ------------------------------------------------------------------------------------------------ refusals
def _setup_msg(n: int = 4, rnd: int = 1):  # type: ignore[no-untyped-def]
    from tessera.secagg.plus import SecAggPlus

    return SecAggPlus().setup(rnd, [f"c{i}" for i in range(n)], dim=3, graph_seed=0)


def _no_train(m: MaskedInputIns):  # type: ignore[no-untyped-def]
    return torch.zeros(2, dtype=torch.float64), 1, {}


PKI = SimulatedPKI()


def test_client_refuses_out_of_stage_replayed_and_wrong_round_messages() -> None:
    setup = _setup_msg()
    with pytest.raises(ProtocolError, match="before SetupIns"):
        step(None, ShareKeysIns(round=1, c_pks={}, s_pks={}), "c0", _no_train, PKI)
    st, _keys = step(None, setup, "c0", _no_train, PKI)
    with pytest.raises(ProtocolError, match="replayed or stale"):
        step(st, setup, "c0", _no_train, PKI)
    with pytest.raises(ProtocolError, match="out of stage or replayed"):
        step(st, MaskedInputIns(round=1, params={}), "c0", _no_train, PKI)
    with pytest.raises(ProtocolError, match="round 2"):
        step(st, ShareKeysIns(round=2, c_pks={}, s_pks={}), "c0", _no_train, PKI)
    # A coordinator that restarts the unfinished round (new session) is served with fresh keys.
    restarted, keys2 = step(st, dataclasses.replace(setup, session=setup.session + 1), "c0", _no_train, PKI)
    assert keys2.c_pk != _keys.c_pk and restarted.stage == Stage.SHARE_KEYS.value
    weak = dataclasses.replace(setup, round=5, threshold=2)  # 2 of 4 holders: two halves could unmask both secrets
    with pytest.raises(ProtocolError, match="must exceed half"):
        step(st, weak, "c0", _no_train, PKI)


def _three_clients(rnd: int):  # type: ignore[no-untyped-def]
    setup = _setup_msg(3, rnd)
    states, keys = {}, {}
    for c in setup.clients:
        states[c], keys[c] = step(None, setup, c, _no_train, PKI)
    c_pks = {c: k.c_pk for c, k in keys.items()}
    s_pks = {c: k.s_pk for c, k in keys.items()}
    sigs = {c: k.sig for c, k in keys.items()}
    shares = {}
    for c in setup.clients:
        ins = ShareKeysIns(round=rnd, c_pks=c_pks, s_pks=s_pks, sigs=sigs)
        states[c], shares[c] = step(states[c], ins, c, _no_train, PKI)
    return states, shares


def test_share_for_the_wrong_round_is_refused() -> None:
    _, old = _three_clients(1)
    states, new = _three_clients(2)
    replayed = MaskedInputIns(round=2, params={}, shares={"c1": old["c1"].shares["c0"], "c2": new["c2"].shares["c0"]})
    with pytest.raises(ProtocolError):
        step(states["c0"], replayed, "c0", _no_train, PKI)
    ok = MaskedInputIns(round=2, params={}, shares={"c1": new["c1"].shares["c0"], "c2": new["c2"].shares["c0"]})
    st, _res = step(states["c0"], ok, "c0", _no_train, PKI)
    with pytest.raises(ProtocolError, match="out of stage or replayed"):
        step(st, ok, "c0", _no_train, PKI)  # a replayed collect request
    with pytest.raises(ProtocolError, match="both survivor and dropout"):
        step(st, ConsistencyIns(round=2, survivors=("c0", "c1"), dropped=("c1",)), "c0", _no_train, PKI)


def test_server_counts_wrong_stage_wrong_round_and_forged_replies_as_that_clients_failure() -> None:
    setup = _setup_msg(4)
    server = SecAggServer(setup, pki=PKI)
    requests = server.requests()
    _, key = step(None, requests["c0"], "c0", _no_train, PKI)
    server.receive("c0", key)
    with pytest.raises(ProtocolError, match="duplicate or replay"):
        server.receive("c0", key)  # the backend gives one reply per client: a second one is the caller's bug
    with pytest.raises(ProtocolError, match="not asked"):
        server.receive("mallory", key)
    server.receive("c1", ShareKeysRes(round=1, shares={}))  # out of stage
    server.receive("c2", dataclasses.replace(key, round=7))  # another round
    server.receive("c3", key)  # c0's keys and signature replayed as c3's: not signed by c3
    assert set(server.state.failures) == {"c1", "c2", "c3"}
    assert {f.kind for f in server.state.failures.values()} == {FailureKind.MALFORMED}
    assert "not signed" in server.state.failures["c3"].reason
    with pytest.raises(ProtocolError, match="duplicate or replay"):
        server.receive("c3", key)


def test_messages_survive_the_wire_format() -> None:
    setup = _setup_msg()
    assert serde.decode_message(serde.encode_message(setup)) == setup


def test_shares_not_addressed_to_exactly_the_neighbours_make_that_client_a_dropout() -> None:
    setup = _setup_msg(4)
    server = SecAggServer(setup, pki=PKI)
    states = {}
    for c, msg in server.requests().items():
        states[c], reply = step(None, msg, c, _no_train, PKI)
        server.receive(c, reply)
    server.advance()
    for c, msg in server.requests().items():
        states[c], reply = step(states[c], msg, c, _no_train, PKI)
        if c == "c0":  # c0 withholds its share for c2: c2 would never mask with c0, c0 would with c2
            reply = ShareKeysRes(round=1, shares={k: v for k, v in reply.shares.items() if k != "c2"})
        server.receive(c, reply)
    server.advance()
    assert server.state.shared == ("c1", "c2", "c3") and "exactly its neighbours" in server.state.failures["c0"].reason
    assert all("c0" not in ins.shares for ins in server.requests({c: FitIns(round=1, params={}) for c in
                                                                   setup.clients}).values())


def test_a_finished_round_cannot_be_run_again() -> None:
    """Re-running a round whose sum was revealed, with other survivors, would let the server difference sums."""
    _, rec, setup, _ = spied_round(make_updates(4))
    parties = rec.inner.handler
    with pytest.raises(ProtocolError, match="replayed or stale"):
        parties.handle("client0", dataclasses.replace(setup, session=setup.session + 1))
    nxt = parties.handle("client0", dataclasses.replace(setup, round=2))  # the next round is fine
    assert isinstance(nxt, KeysRes)


def test_l2_clip_bounds_each_clients_contribution() -> None:
    updates = make_updates(6, seed=8)  # norms around 11
    server, _, setup, _ = spied_round(updates, dropouts={2}, l2_clip=1.0)
    clipped = [flatten(u) / max(1.0, float(flatten(u).norm())) for u in updates]
    exact = sum(clipped[i] for i in range(6) if i != 2)
    assert server.result is not None
    assert float((server.result.values - exact).abs().max()) < sum_error_bound(clients=5, clip=8.0,
                                                                               levels=setup.levels)
