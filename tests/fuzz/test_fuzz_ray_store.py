"""Fuzz what the Ray backend decodes from its object store and state store (client state blobs, shared-params
requests) with a fixed seed and budget. Oracle: only TesseraError comes out."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from tessera.runtime.messages import FitIns
from tessera.runtime.ray import shared
from tessera.runtime.ray.store import decode_state, encode_state
from tests.fuzz.conftest import FUZZ, mutate, mutations, only_tessera_errors

STATE = encode_state({"scaffold_c": {"w": torch.ones(3)}, "ledger": {"steps": [1, 2], "eps": 0.5}})
PARAMS = {"w": torch.linspace(0, 1, 4), "b": torch.zeros(2)}
SHARED, REQUESTS = shared.encode_shared({c: FitIns(round=1, params=PARAMS, config={"c": c}) for c in ("a", "b")})


@FUZZ
@given(mutations())
def test_fuzz_client_state(ops: list[tuple[int, int, int]]) -> None:
    assert STATE is not None
    only_tessera_errors("ray client state", decode_state, mutate(STATE, ops))


@FUZZ
@given(st.booleans(), mutations())
def test_fuzz_shared_request(edit_shared: bool, ops: list[tuple[int, int, int]]) -> None:
    assert SHARED is not None
    blob, table = (REQUESTS["a"], mutate(SHARED, ops)) if edit_shared else (mutate(REQUESTS["a"], ops), SHARED)
    only_tessera_errors("ray shared request", lambda: shared.decode(blob, table, max_bytes=1 << 20))
