"""PSI: the result equals the plain set intersection, and the wire never carries a raw ID or its plain hash."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.core.errors import ConfigError, ProtocolError
from tessera.core.serde import encode_message
from tessera.runtime.backend import InProcessBackend
from tessera.vertical.psi import PsiBlindIns, PsiGroup, PsiParty, hash_to_curve, intersect, lead


def aligned(ids: dict[str, list[str]], rows: dict[str, list[int]]) -> list[list[str]]:
    return [[ids[p][i] for i in rows[p]] for p in ids]


def test_two_parties_get_exactly_the_intersection_in_one_order() -> None:
    rng = random.Random(1)
    alice = [f"id-{i}" for i in rng.sample(range(400), 150)]
    bob = [f"id-{i}" for i in rng.sample(range(400), 200)]
    rows = intersect({"alice": alice, "bob": bob})
    a, b = aligned({"alice": alice, "bob": bob}, rows)
    assert a == b
    assert set(a) == set(alice) & set(bob) and len(a) == len(set(alice) & set(bob))


def test_order_seed_makes_the_agreed_order_reproducible() -> None:
    ids = {"alice": [str(i) for i in range(50)], "bob": [str(i) for i in range(25, 75)]}
    first, second = intersect(ids, order_seed=3), intersect(ids, order_seed=3)
    assert first == second and sorted(first["alice"]) == list(range(25, 50))


def test_three_parties_and_a_chosen_leader() -> None:
    ids = {"alice": [str(i) for i in range(0, 60)], "bob": [str(i) for i in range(30, 90)][::-1],
           "carol": [str(i) for i in range(0, 90, 3)]}
    rows = intersect(ids, leader="bob")
    cols = aligned(ids, rows)
    assert cols[0] == cols[1] == cols[2]
    assert set(cols[0]) == set(ids["alice"]) & set(ids["bob"]) & set(ids["carol"])


@settings(max_examples=15, deadline=None)
@given(st.sets(st.integers(0, 60), max_size=25), st.sets(st.integers(0, 60), max_size=25))
def test_property_psi_equals_set_intersection(a: set[int], b: set[int]) -> None:
    ids = {"alice": [f"u{i}" for i in sorted(a)], "bob": [f"u{i}" for i in sorted(b, reverse=True)]}
    rows = intersect(ids)
    ca, cb = aligned(ids, rows)
    assert ca == cb and set(ca) == {f"u{i}" for i in a & b}


class Recorder:
    """An in-process backend that keeps every encoded message that crossed the 'wire'."""

    def __init__(self, handler: Any) -> None:
        self.inner = InProcessBackend(handler)
        self.traffic = self.inner.traffic
        self.wire: list[bytes] = []

    def start(self, clients: list[str]) -> None:
        self.inner.start(clients)

    def exchange(self, requests: Any, *, timeout: float | None = None) -> dict[str, Any]:
        replies = self.inner.exchange(requests, timeout=timeout)
        self.wire += [encode_message(m) for m in requests.values()]
        self.wire += [encode_message(m) for m in replies.values()]
        return replies

    def close(self) -> None:
        self.inner.close()


def test_no_raw_id_or_plain_hash_on_the_wire() -> None:
    alice = [f"alice-customer-{i:05d}" for i in range(80)]
    bob = [f"alice-customer-{i:05d}" for i in range(40, 120)]
    party = PsiParty("bob", bob)
    rec = Recorder(PsiGroup([party]))
    rec.start(["bob"])
    leader_rows = lead(alice, rec, ["bob"])
    assert sorted(alice[i] for i in leader_rows) == sorted(bob[i] for i in party.rows or [])
    blob = b"".join(rec.wire)
    assert len(rec.wire) == 4 and rec.traffic.up > 0
    secrets_on_wire = [s.encode() for s in alice + bob] + hash_to_curve(alice + bob)
    assert not [s for s in secrets_on_wire if s in blob]
    assert b"customer" not in blob


def test_refusals() -> None:
    with pytest.raises(ConfigError, match="1 duplicate ID"):
        intersect({"alice": ["a", "a", "b"], "bob": ["b"]})
    with pytest.raises(ConfigError, match="at least two parties"):
        intersect({"alice": ["a"]})
    with pytest.raises(ProtocolError, match="not a multiple of 32"):
        PsiParty("bob", ["x"]).handle("bob", PsiBlindIns(session="s", points=b"\x01" * 33))
