"""Fuzz the SecAgg+ stage machines: a mutated reply at any stage is that client's failure on the server (receive
never raises) and the round goes on or is abandoned with a TesseraError; a mutated request makes a client refuse
with a TesseraError, never anything else."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tessera.core import serde
from tessera.core.errors import SerdeError
from tessera.runtime.backend import InProcessBackend
from tessera.runtime.messages import FitIns
from tessera.secagg.client import step
from tessera.secagg.messages import STAGES, ClientState, Stage
from tessera.secagg.plus import SecAggPlus, flatten
from tessera.secagg.server import SecAggServer
from tessera.secagg.simulate import _Parties
from tests.fuzz.conftest import FUZZ, mutate, mutations, only_tessera_errors
from tests.secagg.helpers import make_updates

CLIENTS = ["client0", "client1", "client2", "client3"]
CFG = SecAggPlus(max_weight=1.0)
FIT = {c: FitIns(round=1, params={}, config={"seed": i}) for i, c in enumerate(CLIENTS)}
UPDATES = make_updates(4, seed=1)


@dataclass
class Snapshot:
    server: SecAggServer  # requests() already called for this stage
    states: dict[str, bytes]  # every client's state before this stage
    requests: dict[str, Any]
    replies: dict[str, Any]  # the honest replies


def _snapshots() -> dict[Stage, Snapshot]:
    setup = CFG.setup(1, CLIENTS, dim=34, graph_seed=0, session=1)
    server = SecAggServer(setup, pki=CFG.pki)
    parties = _Parties(UPDATES, set(), Stage.SETUP, CFG.pki)
    backend = InProcessBackend(parties)
    out = {}
    for stage in STAGES:
        requests = server.requests(FIT if stage == Stage.COLLECT else None)
        states = dict(parties.state)
        before = copy.deepcopy(server)
        replies = backend.exchange(requests)
        out[stage] = Snapshot(before, states, requests, replies)
        for c, r in replies.items():
            server.receive(c, r)
        server.advance()
    return out


SNAPSHOTS = _snapshots()


def _server_round(stage: Stage, client: str, blob: bytes) -> None:
    snap = SNAPSHOTS[stage]
    try:
        reply = serde.decode_message(blob)
    except SerdeError:
        return  # refused by the wire format (the backend turns it into a MALFORMED failure)
    server = copy.deepcopy(snap.server)
    for c, r in snap.replies.items():
        server.receive(c, reply if c == client else r)  # never raises: a bad reply is that client's failure
    assert server.state.failures or client in server.state.pending
    server.advance()  # may abandon the round (too few left, inconsistent shares): a TesseraError


@pytest.mark.parametrize("stage", STAGES, ids=[s.value for s in STAGES])
@FUZZ
@given(who=st.sampled_from(CLIENTS), ops=mutations())
def test_fuzz_secagg_server_replies(stage: Stage, who: str, ops: list[tuple[int, int, int]]) -> None:
    blob = mutate(serde.encode_message(SNAPSHOTS[stage].replies[who]), ops)
    only_tessera_errors(f"secagg server {stage.value} reply", _server_round, stage, who, blob)


def _client_step(stage: Stage, client: str, blob: bytes) -> None:
    snap = SNAPSHOTS[stage]
    msg = serde.decode_message(blob)
    raw = snap.states.get(client)
    state = serde.decode_message(raw, expected=(ClientState,)) if raw is not None else None

    def train(m: Any) -> Any:
        return flatten(UPDATES[CLIENTS.index(client)]), 1, {}

    step(state, msg, client, train, CFG.pki)


@pytest.mark.parametrize("stage", STAGES, ids=[s.value for s in STAGES])
@FUZZ
@given(who=st.sampled_from(CLIENTS), ops=mutations())
def test_fuzz_secagg_client_requests(stage: Stage, who: str, ops: list[tuple[int, int, int]]) -> None:
    blob = mutate(serde.encode_message(SNAPSHOTS[stage].requests[who]), ops)
    only_tessera_errors(f"secagg client {stage.value} request", _client_step, stage, who, blob)
