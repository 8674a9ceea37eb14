"""A malformed reply from one client (wrong type, wrong round, wrong shape, garbage bytes, a bad signature) is that
client's failure for the round, in SecAgg+ and in CKKS: the round completes with the others' exact sum."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tessera.runtime.backend import FailureKind, InProcessBackend
from tessera.runtime.messages import FitIns
from tessera.secagg.ckks import CKKS, CKKSServer
from tessera.secagg.ckks import _Parties as CKKSParties
from tessera.secagg.ckks_protocol import CKKSDecryptRes, CKKSFitRes, CKKSKeygenRes, CKKSKeyRes
from tessera.secagg.client import encode_input
from tessera.secagg.messages import (
    ConsistencyRes,
    KeysRes,
    MaskedInputRes,
    ShareKeysRes,
    Stage,
    UnmaskRes,
)
from tessera.secagg.plus import SecAggPlus, flatten, run_stages
from tessera.secagg.quantize import ring_mask
from tessera.secagg.server import SecAggServer
from tessera.secagg.simulate import _Parties

from .helpers import make_updates

N = 6
BAD = "client2"


class Tamper:
    """Wraps a handler: `bad`'s honest reply of type `kind` is replaced by `forge(reply)`."""

    def __init__(self, inner: Any, kind: type, forge: Callable[[Any], Any]) -> None:
        self.inner, self.kind, self.forge = inner, kind, forge

    def handle(self, client: str, msg: Any) -> Any:
        reply = self.inner.handle(client, msg)
        return self.forge(reply) if client == BAD and isinstance(reply, self.kind) else reply


def _garbage_shares(r: UnmaskRes) -> UnmaskRes:
    return dataclasses.replace(r, b_shares={u: b"\x07" * 5 for u in r.b_shares},
                               sk_shares={u: b"\x07" * 5 for u in r.sk_shares})


SECAGG_FORGERIES = {
    "keys-wrong-type": (KeysRes, lambda r: ShareKeysRes(round=1, shares={})),
    "keys-wrong-round": (KeysRes, lambda r: dataclasses.replace(r, round=9)),
    "keys-garbage-bytes": (KeysRes, lambda r: dataclasses.replace(r, c_pk=b"\x00" * 32)),
    "keys-wrong-length": (KeysRes, lambda r: dataclasses.replace(r, s_pk=b"short")),
    "keys-bad-signature": (KeysRes, lambda r: dataclasses.replace(r, sig=bytes(64))),
    "shares-missing-one": (ShareKeysRes, lambda r: dataclasses.replace(r, shares=dict(list(r.shares.items())[1:]))),
    "shares-garbage-size": (ShareKeysRes, lambda r: dataclasses.replace(r, shares={k: b"x" for k in r.shares})),
    "masked-wrong-shape": (MaskedInputRes, lambda r: dataclasses.replace(r, masked=r.masked[:-1])),
    "masked-wrong-dtype": (MaskedInputRes, lambda r: dataclasses.replace(r, masked=r.masked.float())),
    "masked-wrong-type": (MaskedInputRes, lambda r: KeysRes(round=1, c_pk=b"", s_pk=b"")),
    "consistency-bad-signature": (ConsistencyRes, lambda r: ConsistencyRes(round=1, sig=b"\x01" * 64)),
    "unmask-garbage-shares": (UnmaskRes, _garbage_shares),
}


@pytest.mark.parametrize("name", list(SECAGG_FORGERIES))
def test_a_malformed_secagg_reply_is_that_clients_dropout(name: str) -> None:
    kind, forge = SECAGG_FORGERIES[name]
    updates = make_updates(N, seed=3)
    cfg = SecAggPlus(threshold=0.6, clip=8.0, max_weight=1.0)
    clients = [f"client{i}" for i in range(N)]
    setup = cfg.setup(1, clients, dim=34, graph_seed=0, session=1)
    backend = InProcessBackend(Tamper(_Parties(updates, set(), Stage.SETUP, cfg.pki), kind, forge))
    fit = {c: FitIns(round=1, params={}, config={"seed": i}) for i, c in enumerate(clients)}
    server = SecAggServer(setup, pki=cfg.pki)
    run_stages(server, backend, fit, timeout=None)  # no exception: the round completes
    assert server.result is not None
    late = kind in (ConsistencyRes, UnmaskRes)  # its masked input is already in the sum
    if not late or kind is ConsistencyRes:
        assert server.state.failures[BAD].kind == FailureKind.MALFORMED
    included = clients if late else [c for c in clients if c != BAD]
    assert server.result.survivors == tuple(included)
    expect = sum(encode_input(flatten(updates[clients.index(c)]), 1, setup, fit[c].config["seed"]) for c in included)
    assert torch.equal(server.result.ring_sum, expect & ring_mask(setup.bits))


CKKS_FORGERIES = {
    "key-wrong-type": (CKKSKeyRes, lambda r: CKKSFitRes(round=1, chunks=[], num_examples=1)),
    "fit-wrong-round": (CKKSFitRes, lambda r: dataclasses.replace(r, round=4)),
    "fit-garbage-bytes": (CKKSFitRes, lambda r: dataclasses.replace(r, chunks=[b"\x13" * 200])),
    "fit-too-many-ciphertexts": (CKKSFitRes, lambda r: dataclasses.replace(r, chunks=r.chunks * 2)),
    "fit-wrong-type": (CKKSFitRes, lambda r: CKKSKeyRes(round=1, pk=b"")),
}


@pytest.mark.parametrize("name", list(CKKS_FORGERIES))
def test_a_malformed_ckks_reply_is_that_clients_failure(name: str) -> None:
    kind, forge = CKKS_FORGERIES[name]
    updates = make_updates(4, seed=6)
    clients = [f"client{i}" for i in range(4)]
    server = CKKSServer(CKKS(max_weight=1.0).setup(1, clients, dim=34))
    backend = InProcessBackend(Tamper(CKKSParties(updates, set()), kind, forge))
    values, _ = server.run(backend, {c: FitIns(round=1, params={}) for c in clients}, timeout=None)
    assert server.failures[BAD].kind == FailureKind.MALFORMED and BAD not in server.meta
    exact = sum(flatten(updates[i]) for i in range(4) if clients[i] != BAD)
    assert float((torch.from_numpy(values) - exact).abs().max()) < 1e-6


def test_a_key_leader_sending_a_garbage_context_is_replaced_by_the_next() -> None:
    updates = make_updates(3, seed=6)
    clients = ["client2", "client0", "client1"]  # the bad client answers first, so it leads the key ceremony
    server = CKKSServer(CKKS(max_weight=1.0).setup(1, clients, dim=34))
    forge = (CKKSKeygenRes, lambda r: dataclasses.replace(r, public_context=b"garbage"))
    backend = InProcessBackend(Tamper(CKKSParties(updates, set()), *forge))
    values, _ = server.run(backend, {c: FitIns(round=1, params={}) for c in clients}, timeout=None)
    assert server.failures[BAD].kind == FailureKind.MALFORMED
    exact = sum(flatten(u) for u in updates)  # the leader's own update still counts: only its keygen reply failed
    assert float((torch.from_numpy(values) - exact).abs().max()) < 1e-6


def test_a_wrong_decryption_is_skipped_for_the_next_survivor() -> None:
    updates = make_updates(3, seed=6)
    clients = ["client2", "client0", "client1"]
    server = CKKSServer(CKKS(max_weight=1.0).setup(1, clients, dim=34))
    forge = (CKKSDecryptRes, lambda r: dataclasses.replace(r, values=torch.full((34,), float("nan"))))
    backend = InProcessBackend(Tamper(CKKSParties(updates, set()), *forge))
    values, _ = server.run(backend, {c: FitIns(round=1, params={}) for c in clients}, timeout=None)
    assert server.failures[BAD].kind == FailureKind.MALFORMED
    assert float((torch.from_numpy(values) - sum(flatten(u) for u in updates)).abs().max()) < 1e-6
