"""SecAgg+ against a malicious coordinator (issue 16, item 1): the two attacks recover a victim's exact update when
the client-side checks are switched off (the unprotected path) and recover nothing when they are on; honest runs
still give the exact sum with dropouts at every stage, on the sparse graph too.

The coordinator here is written out by hand: it drives the clients' stage machines (`step`) directly, so it can
withhold shares, tell each client its own survivor story and forward whatever signatures it likes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from tessera.core.errors import ProtocolError
from tessera.runtime.backend import ClientFailure
from tessera.secagg import Stage, client, crypto, run_round, shamir
from tessera.secagg.client import encode_input, step
from tessera.secagg.graph import neighbours
from tessera.secagg.messages import (
    ClientState,
    ConsistencyIns,
    ConsistencyRes,
    KeysRes,
    MaskedInputIns,
    MaskedInputRes,
    SetupIns,
    ShareKeysIns,
    UnmaskIns,
    UnmaskRes,
)
from tessera.secagg.pki import SimulatedPKI
from tessera.secagg.plus import SecAggPlus, flatten
from tessera.secagg.prg import add_mask, reduce, to_int64, to_words
from tessera.secagg.quantize import ring_mask, sum_error_bound
from tessera.secagg.server import SecAggServer

from .helpers import make_updates

PKI = SimulatedPKI()


@pytest.fixture
def unprotected(monkeypatch: pytest.MonkeyPatch) -> None:
    """The protocol before issue 16: no |U2| >= t check, no neighbourhood count, no signed-story confirmation."""
    monkeypatch.setattr(client, "check_enough_shares", lambda received, threshold: None)
    monkeypatch.setattr(client, "check_neighbourhood", lambda setup, me, survivors: None)
    monkeypatch.setattr(client, "check_confirmations", lambda st, msg, me, pki: None)


@dataclass
class Coordinator:
    """A hostile coordinator holding everything a real one sees: keys, sealed shares, masked inputs, replies."""

    setup: SetupIns
    updates: list[Any]
    states: dict[str, ClientState] = field(default_factory=dict)
    keys: dict[str, KeysRes] = field(default_factory=dict)
    masked: dict[str, torch.Tensor] = field(default_factory=dict)
    partners: dict[str, set[str]] = field(default_factory=dict)  # whose shares each client was given
    refused: dict[str, str] = field(default_factory=dict)
    unmask: dict[str, UnmaskRes] = field(default_factory=dict)

    @property
    def graph(self) -> dict[str, tuple[str, ...]]:
        s = self.setup
        return neighbours(s.clients, degree=s.degree, graph_seed=s.graph_seed)

    def send(self, c: str, msg: Any) -> Any:
        def train(m: MaskedInputIns) -> tuple[torch.Tensor, int, dict[str, float]]:
            return flatten(self.updates[self.setup.clients.index(c)]), 1, {}

        try:
            self.states[c], reply = step(self.states.get(c), msg, c, train, PKI)
        except ProtocolError as exc:
            self.refused[c] = str(exc)
            return None
        return reply

    def run_until_masked(self, withhold_from: str | None = None) -> None:
        """Honest setup and key sharing; in the collect stage `withhold_from` gets none of its shares."""
        s = self.setup
        self.keys = {c: self.send(c, s) for c in s.clients}
        inbox: dict[str, dict[str, bytes]] = {c: {} for c in s.clients}
        for u in s.clients:
            near = (u, *self.graph[u])
            ins = ShareKeysIns(round=s.round, c_pks={v: self.keys[v].c_pk for v in near},
                               s_pks={v: self.keys[v].s_pk for v in near},
                               sigs={v: self.keys[v].sig for v in near if v != u})
            for v, blob in self.send(u, ins).shares.items():
                inbox[v][u] = blob
        for u in s.clients:
            shares = {} if u == withhold_from else inbox[u]
            reply = self.send(u, MaskedInputIns(round=s.round, params={}, config={"seed": 17}, shares=shares))
            if isinstance(reply, MaskedInputRes):
                self.masked[u] = reply.masked
                self.partners[u] = set(shares)

    def tell(self, story: Callable[[str], tuple[tuple[str, ...], tuple[str, ...]]], *,
             forward_all: bool = True) -> None:
        """Each client gets its own survivor story; the coordinator then forwards every neighbour's signature
        (`forward_all`) or only those over the story that client was told (hiding the conflicting ones)."""
        s = self.setup
        sigs: dict[str, tuple[tuple[Any, ...], bytes]] = {}
        for u in self.masked:
            surv, drop = story(u)
            reply = self.send(u, ConsistencyIns(round=s.round, survivors=surv, dropped=drop))
            if isinstance(reply, ConsistencyRes):
                sigs[u] = ((surv, drop), reply.sig)
        for u, (told, _) in sigs.items():
            fwd = {v: sig for v, (theirs, sig) in sigs.items()
                   if v in self.graph[u] and (forward_all or theirs == told)}
            reply = self.send(u, UnmaskIns(round=s.round, survivors=told[0], dropped=told[1], sigs=fwd))
            if isinstance(reply, UnmaskRes):
                self.unmask[u] = reply

    def secret(self, owner: str, kind: str) -> bytes | None:
        """The owner's b_u ('b') or s_u^SK ('sk') if t shares of it were revealed, else None."""
        got = {self.setup.clients.index(v) + 1: (r.b_shares if kind == "b" else r.sk_shares)[owner]
               for v, r in self.unmask.items() if owner in (r.b_shares if kind == "b" else r.sk_shares)}
        if len(got) < self.setup.threshold:
            return None
        return shamir.combine(got, threshold=self.setup.threshold)

    def recover(self, victim: str) -> torch.Tensor | None:
        """The victim's quantised input, alone, from its masked vector and the revealed secrets (None if some
        mask cannot be removed)."""
        s, index = self.setup, self.setup.clients.index
        b = self.secret(victim, "b")
        if victim not in self.masked or b is None:
            return None
        acc = to_words(self.masked[victim], bits=s.bits)
        add_mask(acc, b, bits=s.bits, sign=-1, prg=s.prg)
        for w in self.partners[victim]:
            sk_w, sk_v = self.secret(w, "sk"), self.secret(victim, "sk")
            if sk_w is not None:
                seed = crypto.agree(sk_w, self.keys[victim].s_pk, info=crypto.MASK_INFO)
            elif sk_v is not None:
                seed = crypto.agree(sk_v, self.keys[w].s_pk, info=crypto.MASK_INFO)
            else:
                return None
            add_mask(acc, seed, bits=s.bits, sign=-1 if index(victim) < index(w) else 1, prg=s.prg)
        return to_int64(reduce(acc, bits=s.bits))

    def truth(self, victim: str) -> torch.Tensor:
        return encode_input(flatten(self.updates[self.setup.clients.index(victim)]), 1, self.setup, 17)


def coordinator(n: int, *, threshold: float, degree: int | None = None) -> Coordinator:
    cfg = SecAggPlus(threshold=threshold, clip=8.0, max_weight=1.0, degree=degree, pki=PKI)
    clients = [f"client{i}" for i in range(n)]
    return Coordinator(cfg.setup(1, clients, dim=34, graph_seed=5, session=1), make_updates(n, seed=9))


# ---------------------------------------------------------------------- (a) withholding the victim's shares
def attack_a() -> Coordinator:
    """10 clients, default settings: the victim gets no encrypted shares, then everyone gets the honest unmask
    request (every client survived), so the victim's self-mask seed b_v is reconstructed."""
    co = coordinator(10, threshold=0.6)
    co.run_until_masked(withhold_from="client3")
    everyone = tuple(co.masked)
    co.tell(lambda u: (everyone, ()))
    return co


def test_withheld_shares_reveal_the_victims_update_on_the_unprotected_path(unprotected: None) -> None:
    co = attack_a()
    assert co.partners["client3"] == set()  # masked by b_v alone
    assert torch.equal(co.recover("client3"), co.truth("client3"))  # the exact quantised update


def test_withheld_shares_make_the_victim_leave_before_masking() -> None:
    co = attack_a()
    assert "client3" not in co.masked and "shares arrived" in co.refused["client3"]
    assert co.recover("client3") is None  # it never sent anything to recover


# ---------------------------------------------------------------------- (b) different survivor stories
VICTIM = "client7"


def attack_b(*, forward_all: bool) -> Coordinator:
    """20 clients, degree 6, t = 5. Everyone masks honestly; then each neighbour w of the victim is told 'the
    victim survived, the victim's other neighbours dropped': the victim's holders reveal b_v and each w's holders
    reveal s_w^SK, which removes every pairwise mask of the victim."""
    co = coordinator(20, threshold=5 / 7, degree=6)
    assert co.setup.threshold == 5 and co.setup.degree == 6
    co.run_until_masked()
    near = set(co.graph[VICTIM])

    def story(u: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        dropped = tuple(c for c in co.setup.clients if c in near and c != u)
        return tuple(c for c in co.setup.clients if c not in dropped), dropped

    co.tell(story, forward_all=forward_all)
    return co


def test_different_stories_reveal_the_victims_update_on_the_unprotected_path(unprotected: None) -> None:
    co = attack_b(forward_all=True)
    assert not co.refused and co.partners[VICTIM] == set(co.graph[VICTIM])
    assert torch.equal(co.recover(VICTIM), co.truth(VICTIM))


@pytest.mark.parametrize("forward_all", [True, False], ids=["forward-all-signatures", "hide-conflicting-ones"])
def test_different_stories_are_refused(forward_all: bool) -> None:
    co = attack_b(forward_all=forward_all)
    assert co.recover(VICTIM) is None
    # The victim's neighbours see too few survivors among their own share holders, or a neighbour's signature
    # over another story (or too few confirmations once the conflicting ones are hidden).
    assert set(co.graph[VICTIM]) <= set(co.refused)
    assert all(("share holders survived" in why or "survivor story" in why) for why in co.refused.values())
    assert all(co.secret(w, "sk") is None for w in co.graph[VICTIM])  # no neighbour's mask key was revealed


def test_padding_the_survivor_list_with_far_clients_is_refused() -> None:
    """The old check counted survivors over the whole round; now each client counts its own neighbourhood."""
    co = coordinator(20, threshold=5 / 7, degree=6)
    co.run_until_masked()
    near = set(co.graph[VICTIM])
    far = tuple(c for c in co.setup.clients if c not in near)  # 14 'survivors': the victim and far-away clients
    co.send(VICTIM, ConsistencyIns(round=1, survivors=far, dropped=tuple(sorted(near))))
    assert "1 of this client's share holders survived" in co.refused[VICTIM]


def test_a_story_that_leaves_out_a_neighbour_it_masked_with_is_refused() -> None:
    co = coordinator(6, threshold=0.6)
    co.run_until_masked()
    others = tuple(c for c in co.setup.clients if c != "client1")  # client1 vanishes from the story altogether
    co.send("client0", ConsistencyIns(round=1, survivors=others, dropped=()))
    assert "names neither as survivor nor as dropped 'client1'" in co.refused["client0"]


def test_keys_not_signed_by_their_party_are_refused() -> None:
    """A coordinator that substitutes its own X25519 keys for a neighbour's (to open the shares) is caught."""
    co = coordinator(4, threshold=0.6)
    s = co.setup
    keys = {c: co.send(c, s) for c in s.clients}
    mitm_c, mitm_s = crypto.keypair()[1], crypto.keypair()[1]
    forged = {**{c: k.c_pk for c, k in keys.items()}, "client1": mitm_c}
    ins = ShareKeysIns(round=1, c_pks=forged, s_pks={c: k.s_pk for c, k in keys.items()} | {"client1": mitm_s},
                       sigs={c: k.sig for c, k in keys.items() if c != "client0"})
    assert co.send("client0", ins) is None and "not signed by 'client1'" in co.refused["client0"]


# ---------------------------------------------------------------------- honest runs, sparse graph
@pytest.mark.parametrize("stage", [Stage.SHARE_KEYS, Stage.COLLECT, Stage.CONSISTENCY, Stage.UNMASK])
def test_honest_sparse_round_gives_the_exact_sum_with_dropouts_at_each_stage(stage: Stage) -> None:
    updates = make_updates(20, seed=11)
    drops = {4, 13}
    rep = run_round(updates, threshold=5, degree=6, dropouts=drops, clip=8.0, bits=32, seed=2, drop_stage=stage)
    s = rep.server.state.setup
    assert s.degree == 6 and s.threshold == 5
    alive = list(range(20)) if stage in (Stage.CONSISTENCY, Stage.UNMASK) else [i for i in range(20) if i not in drops]
    assert rep.included == tuple(alive)
    exact = sum(flatten(updates[i]) for i in alive)
    got = torch.cat([t.reshape(-1) for t in rep.sum.values()])
    assert float((got - exact).abs().max()) < sum_error_bound(clients=len(alive), clip=8.0, levels=s.levels)


def test_the_server_drops_a_client_whose_survivor_signature_is_forged() -> None:
    """The consistency stage: a reply signed over another story is that client's failure, not the round's end."""
    cfg = SecAggPlus(threshold=0.6, max_weight=1.0, pki=PKI)
    setup = cfg.setup(1, [f"c{i}" for i in range(5)], dim=3, graph_seed=0)
    server = SecAggServer(setup, pki=PKI)
    states: dict[str, ClientState] = {}

    def train(m: MaskedInputIns) -> tuple[torch.Tensor, int, dict[str, float]]:
        return torch.ones(2, dtype=torch.float64), 1, {}

    def exchange(fit: Mapping[str, Any] | None = None) -> None:
        for c, msg in server.requests(fit).items():
            states[c], reply = step(states.get(c), msg, c, train, PKI)
            if isinstance(reply, ConsistencyRes) and c == "c2":
                reply = ConsistencyRes(round=1, sig=PKI.sign("c2", b"another story"))
            server.receive(c, reply)
        server.advance()

    from tessera.runtime.messages import FitIns

    exchange()
    exchange()
    exchange({c: FitIns(round=1, params={}, config={"seed": 1}) for c in setup.clients})
    exchange()
    assert set(server.state.signed) == {"c0", "c1", "c3", "c4"} and isinstance(server.state.failures["c2"],
                                                                                   ClientFailure)
    exchange()
    assert server.result is not None
    expect = sum(encode_input(torch.ones(2, dtype=torch.float64), 1, setup, 1) for _ in range(5))
    assert torch.equal(server.result.ring_sum, expect & ring_mask(setup.bits))  # c2's input is still in the sum
