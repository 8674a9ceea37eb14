"""PSI: the result equals the plain set intersection (random, chunked, multi-process and adversarial inputs), the
wire never carries a raw ID or its plain hash, and a party refuses a leader that breaks the protocol."""

from __future__ import annotations

import random
import secrets
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.core.errors import ConfigError, ProtocolError
from tessera.core.serde import encode_message
from tessera.runtime.backend import InProcessBackend
from tessera.vertical import psi_curve
from tessera.vertical.psi import (
    Duplicates,
    PsiAlignIns,
    PsiBlindIns,
    PsiGroup,
    PsiOpen,
    PsiParty,
    hash_to_curve,
    intersect,
    lead,
)


def aligned(ids: dict[str, list[str]], rows: dict[str, list[int]]) -> list[list[str]]:
    return [[ids[p][i] for i in rows[p]] for p in ids]


def check(ids: dict[str, list[str]], rows: dict[str, list[int]]) -> None:
    """Oracle: every party's aligned column is the same list, and it is exactly the plain set intersection."""
    cols = aligned(ids, rows)
    want = set.intersection(*(set(v) for v in ids.values()))
    assert all(c == cols[0] for c in cols) and set(cols[0]) == want and len(cols[0]) == len(want)


def test_two_parties_get_exactly_the_intersection_in_one_order() -> None:
    rng = random.Random(1)
    ids = {"alice": [f"id-{i}" for i in rng.sample(range(400), 150)],
           "bob": [f"id-{i}" for i in rng.sample(range(400), 200)]}
    check(ids, intersect(ids, chunk=7))  # many small messages: the streamed path


def test_order_seed_makes_the_agreed_order_reproducible() -> None:
    ids = {"alice": [str(i) for i in range(50)], "bob": [str(i) for i in range(25, 75)]}
    first, second = intersect(ids, order_seed=3), intersect(ids, order_seed=3)
    assert first == second and sorted(first["alice"]) == list(range(25, 50))


def test_three_parties_and_a_chosen_leader() -> None:
    ids = {"alice": [str(i) for i in range(0, 60)], "bob": [str(i) for i in range(30, 90)][::-1],
           "carol": [str(i) for i in range(0, 90, 3)]}
    check(ids, intersect(ids, leader="bob", chunk=16))


def test_worker_processes_give_the_same_intersection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psi_curve, "POOL_MIN", 8)
    ids = {"alice": [f"u{i}" for i in range(300)], "bob": [f"u{i}" for i in range(150, 600)]}
    check(ids, intersect(ids, workers=2, chunk=64))


@settings(max_examples=15, deadline=None)
@given(st.sets(st.integers(0, 60), max_size=25), st.sets(st.integers(0, 60), max_size=25))
def test_property_psi_equals_set_intersection(a: set[int], b: set[int]) -> None:
    ids = {"alice": [f"u{i}" for i in sorted(a)], "bob": [f"u{i}" for i in sorted(b, reverse=True)]}
    check(ids, intersect(ids, chunk=4))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.text(max_size=6), max_size=20), st.lists(st.text(max_size=6), max_size=20))
def test_adversarial_ids_duplicates_empty_and_unicode(a: list[str], b: list[str]) -> None:
    ids = {"alice": a, "bob": b}
    rows = intersect(ids, duplicates=Duplicates.FIRST, chunk=3)
    check(ids, rows)
    for p, col in ids.items():  # the first row holding each ID is the one aligned
        assert all(col.index(col[r]) == r for r in rows[p])


def test_edge_sets() -> None:
    for a, b in [([], []), ([], ["x"]), (["x"], []), (["é", "e\u0301", "😀", ""], ["e\u0301", "😀", "", "E"])]:
        check({"alice": a, "bob": b}, intersect({"alice": a, "bob": b}))


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
    leader_rows = lead(alice, rec, ["bob"], chunk=32)
    assert sorted(alice[i] for i in leader_rows) == sorted(bob[i] for i in party.rows or [])
    blob = b"".join(rec.wire)
    assert len(rec.wire) > 8 and rec.traffic.up > 0
    secrets_on_wire = [s.encode() for s in alice + bob] + hash_to_curve(alice + bob)
    assert not [s for s in secrets_on_wire if s in blob]
    assert b"customer" not in blob


def test_refusals() -> None:
    with pytest.raises(ConfigError, match="1 duplicate ID"):
        intersect({"alice": ["a", "a", "b"], "bob": ["b"]})
    with pytest.raises(ConfigError, match="at least two parties"):
        intersect({"alice": ["a"]})
    bob = PsiParty("bob", ["x"])
    bob.handle("bob", PsiOpen(session="s", count=2))
    with pytest.raises(ProtocolError, match="not a multiple of 32"):
        bob.handle("bob", PsiBlindIns(session="s", points=b"\x01" * 33, want=0))


# ------------------------------------------------------------------- a hostile leader (issue 16, item 5)
def _blinded(ids: list[str]) -> bytes:
    return psi_curve.bulk("hash", secrets.token_bytes(32), ids, workers=1)[0]


def test_one_blinding_request_per_session() -> None:
    bob = PsiParty("bob", ["a", "b"], max_leader_ids=3)
    pts = _blinded(["a", "b", "c"])
    bob.handle("bob", PsiOpen(session="s1", count=2))
    bob.handle("bob", PsiBlindIns(session="s1", points=pts[:64], want=0))
    with pytest.raises(ProtocolError, match="past the 2 it declared"):  # a second pass over the same session
        bob.handle("bob", PsiBlindIns(session="s1", points=pts[:32], want=0))
    with pytest.raises(ProtocolError, match="not open"):  # ... which closed it for good
        bob.handle("bob", PsiBlindIns(session="s1", points=b"", want=1))
    with pytest.raises(ProtocolError, match="already opened"):
        bob.handle("bob", PsiOpen(session="s1", count=1))
    with pytest.raises(ProtocolError, match="over this party's limit of 3"):
        bob.handle("bob", PsiOpen(session="s2", count=4))
    with pytest.raises(ProtocolError, match="not open"):
        bob.handle("bob", PsiBlindIns(session="never", points=pts, want=0))


def test_sessions_run_one_at_a_time_and_are_capped() -> None:
    bob = PsiParty("bob", ["a"], max_sessions=2)
    pts = _blinded(["a"])
    bob.handle("bob", PsiOpen(session="s1", count=1))
    bob.handle("bob", PsiOpen(session="s2", count=1))  # closes s1 and its secret
    with pytest.raises(ProtocolError, match="not open"):
        bob.handle("bob", PsiBlindIns(session="s1", points=pts, want=0))
    with pytest.raises(ProtocolError, match="answered its 2 PSI session"):
        bob.handle("bob", PsiOpen(session="s3", count=1))


def test_each_session_blinds_with_its_own_secret() -> None:
    bob = PsiParty("bob", ["a"])
    pts = _blinded(["a", "b"])
    tags = []
    for s in ("s1", "s2"):
        bob.handle("bob", PsiOpen(session=s, count=2))
        tags.append(bob.handle("bob", PsiBlindIns(session=s, points=pts, want=1)).tags)
    assert len(tags[0]) == 32 and tags[0] != tags[1]  # a leader cannot link its queries across sessions


class Forger(InProcessBackend):
    """A leader's backend that rewrites the alignment: one row of the party outside the intersection is added
    (with a point copied from an intersecting row, or a made-up one)."""

    def __init__(self, handler: Any, how: str) -> None:
        super().__init__(handler)
        self.how = how

    def exchange(self, requests: Any, *, timeout: float | None = None) -> dict[str, Any]:
        msg = next(iter(requests.values()))
        if isinstance(msg, PsiAlignIns):
            pos = np.frombuffer(msg.positions, dtype="<u4")
            outside = next(p for p in range(10) if p not in set(pos.tolist()))
            point = msg.points[:32] if self.how == "copy" else secrets.token_bytes(32)
            msg = PsiAlignIns(session=msg.session, positions=msg.positions + np.array([outside], "<u4").tobytes(),
                              points=msg.points + point, last=msg.last)
            requests = {p: msg for p in requests}
        return super().exchange(requests, timeout=timeout)


@pytest.mark.parametrize("how", ["copy", "made-up"])
def test_party_refuses_rows_outside_the_intersection(how: str) -> None:
    bob = PsiParty("bob", [f"u{i}" for i in range(10)])
    honest = PsiParty("bob", [f"u{i}" for i in range(10)])
    assert sorted(lead(["u1", "u2", "zz"], InProcessBackend(PsiGroup([honest])), ["bob"])) == [0, 1]
    with pytest.raises(ProtocolError, match="outside the intersection"):
        lead(["u1", "u2", "zz"], Forger(PsiGroup([bob]), how), ["bob"])
    assert bob.rows is None
