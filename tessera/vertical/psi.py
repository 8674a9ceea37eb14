"""Private set intersection (PSI) to align rows across parties before split learning.

Protocol (Diffie-Hellman/ECDH PSI, as in Meadows 1986 / Huberman et al. 1999), between a leader L (usually the
label party) and each other party P, over Curve25519 via `cryptography`'s X25519:

1. Each ID is hashed to the curve: SHA-512 with a domain tag, 255 bits taken as a Montgomery u-coordinate.
   Each party draws a secret scalar; X25519 clamps it to a multiple of the cofactor 8, so every blinded value
   lies in the prime-order subgroup (of the curve or of its twist, both of prime order ~2^252 after clamping),
   where the decisional Diffie-Hellman problem is believed hard.
2. L -> P: `PsiBlindIns` with {H(x)^a} for L's IDs, in a random order.
3. P -> L: `PsiBlindRes` with {(H(x)^a)^b} in the order received, and {H(y)^b} for P's IDs in a random order.
4. L computes (H(y)^b)^a and matches. Intersecting over all P gives the final set; L orders it randomly and sends
   each P `PsiAlignIns` with positions into P's shuffled list, which P maps back to its own rows.

Only blinded points cross the wire: raw IDs and unblinded hashes never do. L learns |X_P| and |X_L ∩ X_P| per
party; P learns |X_L| and the final intersection (its rows in it). Both are the usual leakage of ECDH-PSI with a
star topology. Security holds against honest-but-curious parties (a malicious party can lie about its set).
"""

from __future__ import annotations

import hashlib
import random
import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from tessera.core.errors import ConfigError, ProtocolError
from tessera.core.serde import message
from tessera.runtime.backend import Backend, ClientFailure, InProcessBackend

DOMAIN = b"tessera-psi-v1\x00"
POINT = 32
_POOL_MIN = 8192  # below this, process start-up costs more than it saves


# ------------------------------------------------------------------------------------------------- messages
@message
@dataclass(frozen=True)
class PsiBlindIns:
    """Leader -> party: the leader's IDs hashed to the curve and blinded by its secret, shuffled."""

    session: str
    points: bytes  # concatenated 32-byte points


@message
@dataclass(frozen=True)
class PsiBlindRes:
    """Party -> leader: the leader's points blinded again (same order), and the party's own blinded, shuffled."""

    session: str
    double: bytes
    points: bytes


@message
@dataclass(frozen=True)
class PsiAlignIns:
    """Leader -> party: positions into the party's shuffled list, in the agreed row order of the intersection."""

    session: str
    positions: list[int]


@message
@dataclass(frozen=True)
class PsiAlignRes:
    session: str
    count: int


# ---------------------------------------------------------------------------------------------------- maths
def hash_to_curve(ids: Sequence[str]) -> list[bytes]:
    """Map IDs to Curve25519 u-coordinates (SHA-512 with a domain tag; top bit cleared as RFC 7748 requires)."""
    out = []
    for i in ids:
        h = bytearray(hashlib.sha512(DOMAIN + i.encode("utf-8")).digest()[:POINT])
        h[31] &= 0x7F
        out.append(bytes(h))
    return out


def _blind_chunk(secret: bytes, points: list[bytes]) -> list[bytes]:
    key = X25519PrivateKey.from_private_bytes(secret)
    return [key.exchange(X25519PublicKey.from_public_bytes(p)) for p in points]


def blind(secret: bytes, points: list[bytes], *, workers: int = 1) -> list[bytes]:
    """Multiply every point by the (clamped) secret scalar; split over `workers` processes for large sets."""
    if workers <= 1 or len(points) < _POOL_MIN:
        return _blind_chunk(secret, points)
    size = -(-len(points) // (workers * 4))
    chunks = [points[i : i + size] for i in range(0, len(points), size)]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_blind_chunk, [secret] * len(chunks), chunks))
    return [p for part in parts for p in part]


def _split(blob: bytes, *, who: str) -> list[bytes]:
    if len(blob) % POINT:
        raise ProtocolError(f"{who} sent {len(blob)} bytes of points, not a multiple of {POINT}")
    return [blob[i : i + POINT] for i in range(0, len(blob), POINT)]


def _shuffled(n: int) -> list[int]:
    order = list(range(n))
    secrets.SystemRandom().shuffle(order)
    return order


def _check_ids(name: str, ids: Sequence[str]) -> None:
    if any(not isinstance(i, str) for i in ids):
        raise ConfigError(f"party {name}: IDs must be strings; convert the ID column with str() first")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"party {name} has {len(ids) - len(set(ids))} duplicate ID(s); deduplicate the ID column")


# ---------------------------------------------------------------------------------------------------- parties
class PsiParty:
    """A non-leader party's side of PSI, as a message handler. After `PsiAlignIns`, `rows` holds its row indices
    in the agreed order."""

    def __init__(self, name: str, ids: Sequence[str], *, workers: int = 1) -> None:
        _check_ids(name, ids)
        self.name, self.ids, self.workers = name, list(ids), workers
        self._secret = secrets.token_bytes(32)
        self._order: list[int] = []
        self.rows: list[int] | None = None

    def handle(self, party: str, msg: Any) -> Any:
        if party != self.name:
            raise ProtocolError(f"PSI message for {party!r} reached {self.name!r}")
        if isinstance(msg, PsiBlindIns):
            double = blind(self._secret, _split(msg.points, who="leader"), workers=self.workers)
            self._order = _shuffled(len(self.ids))
            own = blind(self._secret, hash_to_curve([self.ids[i] for i in self._order]), workers=self.workers)
            return PsiBlindRes(session=msg.session, double=b"".join(double), points=b"".join(own))
        if isinstance(msg, PsiAlignIns):
            if any(not 0 <= p < len(self._order) for p in msg.positions) or len(set(msg.positions)) != len(
                    msg.positions):
                raise ProtocolError(f"{self.name}: alignment positions are out of range or repeated")
            self.rows = [self._order[p] for p in msg.positions]
            return PsiAlignRes(session=msg.session, count=len(self.rows))
        raise ProtocolError(f"PSI party {self.name} cannot handle {type(msg).__name__}")


class PsiGroup:
    """Routes PSI messages to in-process parties (the handler of an in-process backend)."""

    def __init__(self, parties: Sequence[PsiParty]) -> None:
        self.parties = {p.name: p for p in parties}

    def handle(self, party: str, msg: Any) -> Any:
        return self.parties[party].handle(party, msg)


def lead(ids: Sequence[str], backend: Backend, parties: Sequence[str], *, workers: int = 1,
         order_seed: int | None = None) -> list[int]:
    """The leader's side: run PSI with every party in `parties` through `backend`; return the leader's rows of
    the intersection in the agreed order (each party learns its own rows of the same order).

    The agreed order is random; `order_seed` makes it a seeded permutation of the leader's row order instead
    (reproducible experiments; whoever knows the seed learns the leader's row order of the intersection)."""
    _check_ids("leader", ids)
    session = secrets.token_hex(8)
    secret = secrets.token_bytes(32)
    order = _shuffled(len(ids))
    mine = blind(secret, hash_to_curve([ids[i] for i in order]), workers=workers)
    replies = _ok(backend.exchange({p: PsiBlindIns(session=session, points=b"".join(mine)) for p in parties}),
                  PsiBlindRes, session)
    common: set[int] | None = None  # positions in the leader's shuffled list found at every party
    where: dict[str, dict[bytes, int]] = {}
    for p in parties:
        double = _split(replies[p].double, who=p)
        if len(double) != len(mine):
            raise ProtocolError(f"party {p} returned {len(double)} points for the leader's {len(mine)}")
        theirs = blind(secret, _split(replies[p].points, who=p), workers=workers)
        where[p] = {pt: k for k, pt in enumerate(theirs)}
        found = {j for j, pt in enumerate(double) if pt in where[p]}
        common = found if common is None else common & found
    final = sorted(common or (), key=lambda j: order[j])
    rng = random.Random(order_seed) if order_seed is not None else secrets.SystemRandom()
    rng.shuffle(final)  # the agreed order reveals nothing about anyone's row order
    doubles = {p: _split(replies[p].double, who=p) for p in parties}
    align = {p: PsiAlignIns(session=session, positions=[where[p][doubles[p][j]] for j in final]) for p in parties}
    _ok(backend.exchange(align), PsiAlignRes, session)
    return [order[j] for j in final]


def _ok(replies: Mapping[str, Any], want: type, session: str) -> dict[str, Any]:
    for p, r in replies.items():
        if isinstance(r, ClientFailure):
            raise ProtocolError(f"PSI with {p} failed: {r.reason}")
        if not isinstance(r, want) or getattr(r, "session", None) != session:
            raise ProtocolError(f"PSI with {p}: unexpected {type(r).__name__} (or another session)")
    return dict(replies)


def intersect(ids: Mapping[str, Sequence[str]], *, leader: str | None = None, backend: Backend | None = None,
              workers: int = 1, order_seed: int | None = None) -> dict[str, list[int]]:
    """Align the ID columns of two or more parties privately (in-process simulation of the protocol above).

    Returns, for each party, the indices of its rows that are in the intersection, in one agreed order: row k of
    every party refers to the same ID. The leader (default: the first party) drives the protocol; `workers`
    spreads the curve operations over processes; `order_seed` fixes the agreed order (see `lead`).

    >>> rows = intersect({"alice": ["u1", "u2", "u3"], "bob": ["u3", "u9", "u1"]})
    >>> [["u1", "u2", "u3"][i] for i in rows["alice"]] == [["u3", "u9", "u1"][i] for i in rows["bob"]]
    True
    """
    if len(ids) < 2:
        raise ConfigError("PSI needs at least two parties' ID columns")
    leader = leader if leader is not None else next(iter(ids))
    if leader not in ids:
        raise ConfigError(f"leader {leader!r} is not one of the parties {list(ids)}")
    others = [PsiParty(p, v, workers=workers) for p, v in ids.items() if p != leader]
    backend = backend if backend is not None else InProcessBackend(PsiGroup(others))
    backend.start([o.name for o in others])
    try:
        leader_rows = lead(ids[leader], backend, [o.name for o in others], workers=workers, order_seed=order_seed)
    finally:
        backend.close()
    out = {leader: leader_rows}
    for o in others:
        assert o.rows is not None
        out[o.name] = o.rows
    return {p: out[p] for p in ids}
