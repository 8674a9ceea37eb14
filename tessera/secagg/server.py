"""The server side of SecAgg+ as an explicit stage machine over a frozen `ServerState`.

Per stage: `requests()` -> one message per client, `receive(client, reply)` for each reply (a ClientFailure is a
dropout), `advance()` checks the survivors against the threshold and moves on. The server adds masked inputs into
a running sum as they arrive; it never holds an unmasked update, and it reconstructs the self-mask seed b_u only
for clients whose input arrived and the mask key s_u^SK only for clients whose input did not, never both for one
client. Below the threshold it raises before anything is unmasked.

A malformed reply (wrong type or round, wrong shape, garbage keys, a bad signature, shares not addressed to exactly
the client's neighbours) is that client's failure (FailureKind.MALFORMED), handled as a dropout at that stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tessera.core.errors import ProtocolError, RoundFailed
from tessera.runtime.backend import ClientFailure, FailureKind
from tessera.runtime.messages import FitIns
from tessera.secagg import crypto, shamir
from tessera.secagg.graph import neighbours
from tessera.secagg.messages import (
    REPLIES,
    ConsistencyIns,
    ConsistencyRes,
    KeysRes,
    MaskedInputIns,
    MaskedInputRes,
    SetupIns,
    ShareKeysIns,
    ShareKeysRes,
    Stage,
    UnmaskIns,
    UnmaskRes,
    keys_statement,
    survivors_statement,
)
from tessera.secagg.pki import PKI
from tessera.secagg.prg import add_masks, add_words, reduce, to_int64, to_words
from tessera.secagg.quantize import dequantize_sum, dequantize_unit_sum


@dataclass(frozen=True)
class ServerState:
    stage: Stage
    setup: SetupIns
    asked: tuple[str, ...] = ()  # who was sent this stage's request
    pending: Mapping[str, Any] = field(default_factory=dict)  # this stage's replies so far
    keys: Mapping[str, KeysRes] = field(default_factory=dict)  # U1: advertised keys
    inbox: Mapping[str, Mapping[str, bytes]] = field(default_factory=dict)  # receiver -> sender -> sealed share
    shared: tuple[str, ...] = ()  # U2: sent shares
    survivors: tuple[str, ...] = ()  # U3: sent a masked input
    signed: Mapping[str, bytes] = field(default_factory=dict)  # U4: signed the survivor story (client -> sig)
    masked_sum: np.ndarray | None = None  # running sum of masked inputs (unsigned words)
    failures: Mapping[str, ClientFailure] = field(default_factory=dict)


@dataclass(frozen=True)
class SumResult:
    """The unmasked ring sum and its dequantisation: sum_i w_i x_i and sum_i w_i over the survivors."""

    ring_sum: torch.Tensor
    values: torch.Tensor
    weight: float
    survivors: tuple[str, ...]


class SecAggServer:
    def __init__(self, setup: SetupIns, *, pki: PKI, min_survivors: int = 1) -> None:
        self.state = ServerState(stage=Stage.SETUP, setup=setup)
        self.pki = pki  # checks clients' signatures (it signs nothing)
        self.min_survivors = min_survivors  # e.g. the strategy's min_available, checked before unmasking
        self.graph = neighbours(setup.clients, degree=setup.degree, graph_seed=setup.graph_seed)
        self.index = {c: i for i, c in enumerate(setup.clients)}
        self.revealed_b: set[str] = set()  # clients whose self-mask seed the server reconstructed
        self.revealed_sk: set[str] = set()  # clients whose mask key the server reconstructed
        self.result: SumResult | None = None
        self.meta: dict[str, tuple[int, dict[str, float]]] = {}  # survivor -> (num_examples, metrics)
        self.seconds: dict[str, float] = {}  # wall time of each stage (exchange + server work), by stage name

    # ----------------------------------------------------------------------------------------------- requests
    def requests(self, fit: Mapping[str, FitIns] | None = None) -> dict[str, Any]:
        st, s = self.state, self.state.setup
        out: dict[str, Any]
        if st.stage == Stage.SETUP:
            out = {c: s for c in s.clients}
        elif st.stage == Stage.SHARE_KEYS:
            out = {}
            for u in st.keys:
                near = [v for v in (u, *self.graph[u]) if v in st.keys]
                out[u] = ShareKeysIns(round=s.round, c_pks={v: st.keys[v].c_pk for v in near},
                                      s_pks={v: st.keys[v].s_pk for v in near},
                                      sigs={v: st.keys[v].sig for v in near if v != u},
                                      certs={v: st.keys[v].cert for v in near if v != u})
        elif st.stage == Stage.COLLECT:
            if fit is None:
                raise ValueError("the collect stage needs each client's FitIns")
            out = {u: MaskedInputIns(round=s.round, params=fit[u].params, config=dict(fit[u].config),
                                     shares=dict(st.inbox.get(u, {}))) for u in st.shared}
        elif st.stage == Stage.CONSISTENCY:
            story = ConsistencyIns(round=s.round, survivors=st.survivors, dropped=self.dropped)
            out = {u: story for u in st.survivors}
        elif st.stage == Stage.UNMASK:
            out = {u: UnmaskIns(round=s.round, survivors=st.survivors, dropped=self.dropped,
                                sigs={v: st.signed[v] for v in self.graph[u] if v in st.signed}) for u in st.signed}
        else:
            raise ProtocolError(f"the round is over (stage {st.stage.value}); start a new SecAggServer")
        self.state = dataclasses.replace(st, asked=tuple(out), pending={})
        return out

    # ---------------------------------------------------------------------------------------------- replies
    def receive(self, client: str, reply: Any) -> None:
        st = self.state
        if client not in st.asked:
            raise ProtocolError(f"a reply from {client!r}, who was not asked in stage {st.stage.value}")
        if client in st.pending or client in st.failures:
            raise ProtocolError(f"a second reply from {client!r} in stage {st.stage.value}: duplicate or replay")
        if isinstance(reply, ClientFailure):
            self.state = dataclasses.replace(st, failures={**st.failures, client: reply})
            return
        problem = self._check(client, reply)
        if problem:  # this client's failure at this stage, never the end of the round
            failure = ClientFailure(client, f"{st.stage.value}: {problem}", FailureKind.MALFORMED)
            self.state = dataclasses.replace(st, failures={**st.failures, client: failure})
            return
        stored: Any = reply
        if isinstance(reply, MaskedInputRes):
            stored = (reply.num_examples, dict(reply.metrics))  # the masked vector goes into the sum only
            self._add(reply)
        elif isinstance(reply, ConsistencyRes):
            stored = reply.sig
        self.state = dataclasses.replace(self.state, pending={**st.pending, client: stored})

    def _check(self, client: str, reply: Any) -> str:
        """What is wrong with a reply ('' if nothing): type, round, and each stage's own checks."""
        st, s = self.state, self.state.setup
        want = REPLIES.get(st.stage)
        if want is None or not isinstance(reply, want):
            return f"{type(reply).__name__} is not a {want.__name__ if want else 'reply'}"
        rnd = getattr(reply, "round", None)
        if rnd != s.round:
            return f"{type(reply).__name__} is for round {rnd}, not {s.round}"
        if isinstance(reply, KeysRes):
            if not (crypto.valid_public(reply.c_pk) and crypto.valid_public(reply.s_pk)) or reply.c_pk == reply.s_pk:
                return "invalid X25519 public keys"
            if not self.pki.verify(client, keys_statement(s, client, reply.c_pk, reply.s_pk), reply.sig, reply.cert):
                return "keys not signed with the party's signing key"
        elif isinstance(reply, ShareKeysRes):
            # Exactly its advertised neighbours: a missing share would leave a pairwise mask one-sided.
            if set(reply.shares) != {v for v in self.graph[client] if v in st.keys}:
                return "shares not addressed to exactly its neighbours"
            if not all(isinstance(b, bytes) and 28 <= len(b) <= 4096 for b in reply.shares.values()):
                return "a sealed share of the wrong size"
        elif isinstance(reply, MaskedInputRes):
            m = reply.masked
            if m.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64) or tuple(m.shape) != (s.dim,):
                return f"masked input is {m.dtype}{tuple(m.shape)}, expected ({s.dim},)"
            if reply.num_examples < 0:
                return "negative num_examples"
        elif isinstance(reply, ConsistencyRes) and not self.pki.verify(
                client, survivors_statement(s, st.survivors, self.dropped), reply.sig, st.keys[client].cert):
            return "survivor story not signed with the party's signing key"
        return ""

    @property
    def dropped(self) -> tuple[str, ...]:
        """Shared their keys but sent no masked input (their pairwise masks are rebuilt from shares)."""
        st = self.state
        return tuple(u for u in st.shared if u not in st.survivors) if st.survivors else ()

    def _add(self, reply: MaskedInputRes) -> None:
        s = self.state.setup
        if self.state.masked_sum is None:
            self.state = dataclasses.replace(self.state, masked_sum=to_words(reply.masked, bits=s.bits))
        else:
            add_words(self.state.masked_sum, reply.masked, bits=s.bits)

    # ---------------------------------------------------------------------------------------------- advance
    def _quorum(self, who: list[str], what: str) -> None:
        t = self.state.setup.threshold
        if len(who) < t:
            raise RoundFailed(f"round {self.state.setup.round}: only {len(who)} client(s) {what}, fewer than the "
                              f"secure-aggregation threshold {t}; the round is abandoned and no sum is revealed")

    def advance(self) -> None:
        st = self.state
        ok = [c for c in st.asked if c in st.pending]
        if st.stage == Stage.SETUP:
            self._quorum(ok, "advertised keys")
            self.state = dataclasses.replace(st, stage=Stage.SHARE_KEYS, keys={c: st.pending[c] for c in ok})
        elif st.stage == Stage.SHARE_KEYS:
            self._quorum(ok, "shared their secrets")
            inbox: dict[str, dict[str, bytes]] = {}
            for u in ok:
                res: ShareKeysRes = st.pending[u]
                for v, blob in res.shares.items():
                    if v in ok:  # a share for a client that left now would reach no one
                        inbox.setdefault(v, {})[u] = blob
            self.state = dataclasses.replace(st, stage=Stage.COLLECT, shared=tuple(ok), inbox=inbox)
        elif st.stage == Stage.COLLECT:
            self._quorum(ok, "sent a masked input")
            if len(ok) < self.min_survivors:
                raise RoundFailed(f"round {st.setup.round}: only {len(ok)} masked input(s), fewer than "
                                  f"strategy.min_available={self.min_survivors}; abandoned before unmasking")
            self.state = dataclasses.replace(st, stage=Stage.CONSISTENCY, survivors=tuple(ok))
            self.meta = {c: st.pending[c] for c in ok}
        elif st.stage == Stage.CONSISTENCY:
            self._quorum(ok, "signed the survivor story")
            self.state = dataclasses.replace(st, stage=Stage.UNMASK, signed={c: st.pending[c] for c in ok})
        elif st.stage == Stage.UNMASK:
            self._quorum(ok, "answered the unmasking request")
            self.result = self._unmask({c: st.pending[c] for c in ok})
            self.state = dataclasses.replace(self.state, stage=Stage.DONE)
        else:
            raise ProtocolError("the round is already over")

    def _gather(self, owner: str, replies: Mapping[str, UnmaskRes], kind: str) -> bytes:
        t = self.state.setup.threshold
        shares: dict[int, bytes] = {}
        for v, r in replies.items():
            got = (r.b_shares if kind == "b" else r.sk_shares).get(owner)
            if got is not None and (v == owner or v in self.graph[owner]) and len(got) == shamir.SHARE_BYTES:
                shares[self.index[v] + 1] = got
        if len(shares) < t:
            raise RoundFailed(f"round {self.state.setup.round}: only {len(shares)} share(s) to unmask one client, "
                              f"fewer than the threshold {t}; the round is abandoned and no sum is revealed")
        try:
            return shamir.combine(shares, threshold=t)
        except ValueError as exc:
            raise ProtocolError(f"inconsistent shares ({exc}); the round is abandoned") from None

    def _unmask(self, replies: Mapping[str, UnmaskRes]) -> SumResult:
        st, s = self.state, self.state.setup
        assert st.masked_sum is not None
        total = st.masked_sum.copy()
        seeds = {u: self._gather(u, replies, "b") for u in st.survivors}
        dropped = [u for u in st.shared if u not in st.survivors and any(v in st.survivors for v in self.graph[u])]
        keys = {u: self._gather(u, replies, "sk") for u in dropped}
        for u, sk in keys.items():
            if crypto.public_of(sk) != st.keys[u].s_pk:
                raise ProtocolError(f"shares of {u!r}'s mask key do not match its public key; round abandoned")
        # Everything needed is in hand: only now is any mask removed, all at once (chunks on a thread pool).
        masks = [(b, -1) for b in seeds.values()]
        for u, sk in keys.items():  # undo each survivor v's pairwise mask with the dropped u
            near = {v: st.keys[v].s_pk for v in self.graph[u] if v in st.survivors}
            for v, seed in crypto.agree_many(sk, near, info=crypto.MASK_INFO).items():
                masks.append((seed, -1 if self.index[v] < self.index[u] else 1))
        self.revealed_b.update(seeds)
        self.revealed_sk.update(keys)
        add_masks(total, masks, bits=s.bits, prg=s.prg)
        ring = to_int64(reduce(total, bits=s.bits))
        n = len(st.survivors)
        values = dequantize_sum(ring[:-1], count=n, clip=s.clip, levels=s.levels)
        weight = float(dequantize_unit_sum(ring[-1:], levels=s.levels)[0])
        return SumResult(ring_sum=ring, values=values, weight=weight, survivors=st.survivors)
