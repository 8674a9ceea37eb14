"""Private set intersection (PSI) to align rows across parties before split learning.

Protocol (Diffie-Hellman/ECDH PSI, as in Meadows 1986 / Huberman et al. 1999), between a leader L (usually the
label party) and each other party P, over Curve25519 via `cryptography`'s X25519:

1. Each ID is hashed to the curve: SHA-512 with a domain tag, 255 bits taken as a Montgomery u-coordinate.
   X25519 clamps every secret scalar to a multiple of the cofactor 8, so blinded values lie in a prime-order
   subgroup (of the curve or of its twist), where decisional Diffie-Hellman is believed hard.
2. `PsiOpen`: L opens a session and declares how many points it will send; P draws a secret for this session
   only and shuffles its own rows.
3. `PsiBlindIns` (chunked): L sends {H(x)^a} in a random order; P answers with one-way tags T(H(x)^ab) in the
   order received (each of L's declared points is blinded once: nothing past the declared count, no second
   pass), and with chunks of {H(y)^b} for its own IDs in its shuffled order.
4. L computes (H(y)^b)^a and matches tags. Over all parties that gives the intersection; L orders it randomly
   and sends each P `PsiAlignIns` (chunked): positions into P's shuffled list, each with its point H(y)^ba.
   P checks every point against its own H(x)^ab and refuses rows outside the intersection, or a point used twice.

Only blinded points and tags cross the wire: raw IDs and unblinded hashes never do. L learns |X_P| and
|X_L ∩ X_P| per party; P learns |X_L| and its rows of the final intersection: the usual leakage of star-topology
ECDH-PSI. Against a malicious leader: P blinds at most the declared number of points per session, with a secret
never used again, so one session answers one set of queries; P aligns at most |X_L ∩ X_P| rows, each backed by
a point only an intersecting ID yields (L sees tags, never the points H(x)^ab). Not covered: L may pair those
points with other positions of P's list (a proof of correct exponentiation per row would stop it), and either
side may lie about its set.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tessera.core.errors import ConfigError, ProtocolError
from tessera.core.serde import message
from tessera.runtime.backend import Backend, ClientFailure, InProcessBackend
from tessera.vertical.psi_curve import POINT, TAG, Index, bulk, hash_to_curve

__all__ = ["Duplicates", "PsiAlignIns", "PsiBlindIns", "PsiGroup", "PsiOpen", "PsiParty", "hash_to_curve",
           "intersect", "lead"]
CHUNK = 1 << 16  # points per message: 2 MiB, so memory on the wire stays bounded whatever the set size


class Duplicates(enum.Enum):
    """What to do with an ID that occurs more than once in a party's column."""

    REFUSE = "refuse"  # a ConfigError naming the count (the default: duplicates are usually a data bug)
    FIRST = "first"  # align the first row holding the ID; later rows never align


# ------------------------------------------------------------------------------------------------- messages
@message
@dataclass(frozen=True)
class PsiOpen:
    """Leader -> party: open a session; the leader will send exactly `count` blinded points."""

    session: str
    count: int


@message
@dataclass(frozen=True)
class PsiOpenRes:
    session: str
    count: int


@message
@dataclass(frozen=True)
class PsiBlindIns:
    """Leader -> party: the next of the leader's blinded points (may be empty), and how many of the party's own
    blinded points to return next."""

    session: str
    points: bytes  # concatenated 32-byte points
    want: int


@message
@dataclass(frozen=True)
class PsiBlindRes:
    """Party -> leader: tags of the leader's points blinded again (same order); the party's next own points."""

    session: str
    tags: bytes
    points: bytes


@message
@dataclass(frozen=True)
class PsiAlignIns:
    """Leader -> party: positions into the party's shuffled list (u32 little-endian) in the agreed row order,
    each with its doubly blinded point; `last` closes the session."""

    session: str
    positions: bytes
    points: bytes
    last: bool


@message
@dataclass(frozen=True)
class PsiAlignRes:
    session: str
    count: int


# ---------------------------------------------------------------------------------------------------- helpers
def _permutation(n: int, seed: int | None = None) -> np.ndarray:
    return np.random.default_rng(secrets.randbits(128) if seed is None else seed).permutation(n)


def _points(blob: bytes, *, who: str) -> int:
    if len(blob) % POINT:
        raise ProtocolError(f"{who} sent {len(blob)} bytes of points, not a multiple of {POINT}")
    return len(blob) // POINT


def _blind(op: str, secret: bytes, payload: bytes | list[str], workers: int, who: str) -> tuple[bytes, bytes]:
    try:
        return bulk(op, secret, payload, workers=workers)
    except ValueError as exc:
        raise ProtocolError(f"{who}: {exc}") from None


def _unique(name: str, ids: Sequence[str], duplicates: Duplicates) -> tuple[list[str], list[int]]:
    """The IDs to run PSI on, and the row each one stands for."""
    if any(not isinstance(i, str) for i in ids):
        raise ConfigError(f"party {name}: IDs must be strings; convert the ID column with str() first")
    first: dict[str, int] = {}
    for row, i in enumerate(ids):
        first.setdefault(i, row)
    if len(first) != len(ids) and duplicates is Duplicates.REFUSE:
        raise ConfigError(f"party {name} has {len(ids) - len(first)} duplicate ID(s); deduplicate the ID column "
                          "or pass duplicates=Duplicates.FIRST")
    return list(first), list(first.values())


# ---------------------------------------------------------------------------------------------------- parties
@dataclass
class _Session:
    secret: bytes
    order: np.ndarray  # position in the shuffled list -> index into the party's unique IDs
    declared: int
    received: int = 0
    sent: int = 0
    double: bytearray = field(default_factory=bytearray)  # H(x)^ab, in the leader's order
    index: Index | None = None
    used: np.ndarray | None = None
    rows: list[np.ndarray] = field(default_factory=list)


class PsiParty:
    """A non-leader party's side of PSI, as a message handler. After the last `PsiAlignIns`, `rows` holds its
    row indices in the agreed order. Sessions run one at a time (opening one closes any other), each with a fresh
    secret; a closed session is never reopened. `max_leader_ids` caps the points a leader may have blinded in one
    session, `max_sessions` the sessions this party ever answers (each lets the leader test up to
    `max_leader_ids` candidate IDs against this party's set)."""

    def __init__(self, name: str, ids: Sequence[str], *, workers: int = 1, max_leader_ids: int | None = None,
                 max_sessions: int | None = None, duplicates: Duplicates = Duplicates.REFUSE) -> None:
        self.name, self.workers, self.max_leader_ids, self.max_sessions = name, workers, max_leader_ids, max_sessions
        self.ids, self._rows_of = _unique(name, ids, duplicates)
        self.rows: list[int] | None = None
        self._open: dict[str, _Session] = {}
        self._closed: set[str] = set()

    def handle(self, party: str, msg: Any) -> Any:
        if party != self.name:
            raise ProtocolError(f"PSI message for {party!r} reached {self.name!r}")
        if isinstance(msg, PsiOpen):
            return self._start(msg)
        s = self._open.get(getattr(msg, "session", ""))
        if s is None:
            raise ProtocolError(f"{self.name}: PSI session is not open (never opened, or closed: one blinding "
                                "request per session)")
        try:
            if isinstance(msg, PsiBlindIns):
                return self._blind(s, msg)
            if isinstance(msg, PsiAlignIns):
                return self._align(s, msg)
        except ProtocolError:
            self._close(msg.session)  # a peer that breaks the protocol loses the session and its secret
            raise
        raise ProtocolError(f"PSI party {self.name} cannot handle {type(msg).__name__}")

    def _start(self, msg: PsiOpen) -> PsiOpenRes:
        if msg.session in self._open or msg.session in self._closed:
            raise ProtocolError(f"{self.name}: PSI session {msg.session!r} was already opened; open a new one")
        if msg.count < 0 or (self.max_leader_ids is not None and msg.count > self.max_leader_ids):
            raise ProtocolError(f"{self.name}: the leader declared {msg.count} IDs, over this party's limit of "
                                f"{self.max_leader_ids} (max_leader_ids)")
        if self.max_sessions is not None and len(self._closed) + len(self._open) >= self.max_sessions:
            raise ProtocolError(f"{self.name} has answered its {self.max_sessions} PSI session(s) (max_sessions); "
                                "start the party again to allow another")
        for other in list(self._open):  # one session at a time: memory stays bounded, an abandoned one is closed
            self._close(other)
        self._open[msg.session] = _Session(secrets.token_bytes(32), _permutation(len(self.ids)), msg.count)
        return PsiOpenRes(session=msg.session, count=len(self.ids))

    def _blind(self, s: _Session, msg: PsiBlindIns) -> PsiBlindRes:
        n = _points(msg.points, who="leader")
        if s.received + n > s.declared or msg.want < 0:
            raise ProtocolError(f"{self.name}: the leader sent points past the {s.declared} it declared; each "
                                "point is blinded once per session")
        double, tags = _blind("tag", s.secret, msg.points, self.workers, "leader")
        s.double += double
        s.received += n
        mine = s.order[s.sent : s.sent + msg.want]
        s.sent += len(mine)
        own, _ = _blind("hash", s.secret, [self.ids[i] for i in mine], self.workers, self.name)
        return PsiBlindRes(session=msg.session, tags=tags, points=own)

    def _align(self, s: _Session, msg: PsiAlignIns) -> PsiAlignRes:
        if s.received != s.declared:
            raise ProtocolError(f"{self.name}: alignment before the leader's {s.declared} points were blinded")
        if s.index is None:
            s.index, s.used = Index(bytes(s.double), POINT), np.zeros(s.declared, dtype=bool)
        assert s.used is not None
        if len(msg.positions) % 4 or len(msg.points) != len(msg.positions) // 4 * POINT:
            raise ProtocolError(f"{self.name}: alignment carries {len(msg.positions)} bytes of positions and "
                                f"{len(msg.points)} bytes of points; want 4 and {POINT} per row")
        pos = np.frombuffer(msg.positions, dtype="<u4").astype(np.int64)
        found, where = s.index.find(msg.points)
        if len(found) != len(pos) or (len(pos) and int(pos.max()) >= s.sent) or s.used[where].any() or len(
                np.unique(where)) != len(where):
            raise ProtocolError(f"{self.name}: the alignment names rows outside the intersection (or a row twice); "
                                "refused")
        s.used[where] = True
        s.rows.append(s.order[pos])
        count = sum(len(r) for r in s.rows)
        if msg.last:
            picked = np.concatenate(s.rows) if s.rows else np.zeros(0, dtype=np.int64)
            if len(np.unique(picked)) != len(picked):
                self._close(msg.session)
                raise ProtocolError(f"{self.name}: the alignment names one row twice; refused")
            self.rows = [self._rows_of[int(i)] for i in picked]
            self._close(msg.session)
        return PsiAlignRes(session=msg.session, count=count)

    def _close(self, session: str) -> None:
        self._open.pop(session, None)  # the secret goes with it
        self._closed.add(session)


class PsiGroup:
    """Routes PSI messages to in-process parties (the handler of an in-process backend)."""

    def __init__(self, parties: Sequence[PsiParty]) -> None:
        self.parties = {p.name: p for p in parties}

    def handle(self, party: str, msg: Any) -> Any:
        return self.parties[party].handle(party, msg)


# ---------------------------------------------------------------------------------------------------- leader
def _ok(replies: Mapping[str, Any], want: type, session: str) -> dict[str, Any]:
    for p, r in replies.items():
        if isinstance(r, ClientFailure):
            raise ProtocolError(f"PSI with {p} failed: {r.reason}")
        if not isinstance(r, want) or getattr(r, "session", None) != session:
            raise ProtocolError(f"PSI with {p}: unexpected {type(r).__name__} (or another session)")
    return dict(replies)


def _matches(secret: bytes, backend: Backend, p: str, session: str, *, tags: bytes, count: int, chunk: int,
             workers: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    """Stream party p's blinded IDs and match them: (leader positions j, p's positions, points), sorted by j."""
    index = Index(tags, TAG)
    js, ps, pts = [], [], []
    got = 0
    while got < count:
        res = _ok(backend.exchange({p: PsiBlindIns(session=session, points=b"", want=chunk)}), PsiBlindRes,
                  session)[p]
        n = _points(res.points, who=p)
        if n == 0 or got + n > count:
            raise ProtocolError(f"party {p} sent {got + n} of the {count} points it announced")
        theirs, their_tags = _blind("tag", secret, res.points, workers, p)
        qi, kj = index.find(their_tags)
        rows = np.frombuffer(theirs, dtype=np.uint8).reshape(-1, POINT)
        js.append(kj)
        ps.append(qi + got)
        pts.append(rows[qi])
        got += n
    j = np.concatenate(js) if js else np.zeros(0, dtype=np.int64)
    by_j = np.argsort(j, kind="stable")
    pos = np.concatenate(ps)[by_j] if ps else np.zeros(0, dtype=np.int64)
    points = np.concatenate(pts)[by_j] if pts else np.zeros((0, POINT), dtype=np.uint8)
    return j[by_j], pos, points.tobytes()


def lead(ids: Sequence[str], backend: Backend, parties: Sequence[str], *, workers: int = 1,
         order_seed: int | None = None, chunk: int = CHUNK, duplicates: Duplicates = Duplicates.REFUSE) -> list[int]:
    """The leader's side: run PSI with every party in `parties` through `backend`; return the leader's rows of
    the intersection in the agreed order (each party learns its own rows of the same order).

    The agreed order is random; `order_seed` makes it a seeded permutation instead (reproducible experiments;
    whoever knows the seed learns the leader's row order of the intersection)."""
    unique, rows_of = _unique("leader", ids, duplicates)
    session, secret = secrets.token_hex(16), secrets.token_bytes(32)
    order = _permutation(len(unique))
    counts = {p: r.count for p, r in _ok(backend.exchange({p: PsiOpen(session=session, count=len(unique))
                                                           for p in parties}), PsiOpenRes, session).items()}
    tags: dict[str, list[bytes]] = {p: [] for p in parties}
    for start in range(0, len(unique), chunk):
        mine, _ = _blind("hash", secret, [unique[i] for i in order[start : start + chunk]], workers, "leader")
        replies = _ok(backend.exchange({p: PsiBlindIns(session=session, points=mine, want=0) for p in parties}),
                      PsiBlindRes, session)
        for p, r in replies.items():
            if len(r.tags) != len(mine) // POINT * TAG:
                raise ProtocolError(f"party {p} returned {len(r.tags) // TAG} tags for {len(mine) // POINT} points")
            tags[p].append(r.tags)
    found = {p: _matches(secret, backend, p, session, tags=b"".join(tags.pop(p)), count=counts[p], chunk=chunk,
                         workers=workers) for p in parties}
    common = order[:0] if not parties else np.arange(len(unique))
    for j, _, _ in found.values():
        common = np.intersect1d(common, j, assume_unique=True)
    final = common[np.argsort(order[common], kind="stable")]  # leader's row order, then shuffled:
    final = final[_permutation(len(final), order_seed)]  # the agreed order reveals nobody's row order
    for p, (j, pos, pts) in found.items():
        at = np.searchsorted(j, final)
        rows = np.frombuffer(pts, dtype=np.uint8).reshape(-1, POINT)
        for start in range(0, max(len(final), 1), chunk):
            sl = at[start : start + chunk]
            last = start + chunk >= len(final)
            _ok(backend.exchange({p: PsiAlignIns(session=session, positions=pos[sl].astype("<u4").tobytes(),
                                                 points=rows[sl].tobytes(), last=last)}), PsiAlignRes, session)
    return [rows_of[int(i)] for i in order[final]]


def intersect(ids: Mapping[str, Sequence[str]], *, leader: str | None = None, backend: Backend | None = None,
              workers: int = 1, order_seed: int | None = None, chunk: int = CHUNK,
              duplicates: Duplicates = Duplicates.REFUSE) -> dict[str, list[int]]:
    """Align the ID columns of two or more parties privately (in-process simulation of the protocol above).

    Returns, for each party, the indices of its rows that are in the intersection, in one agreed order: row k of
    every party refers to the same ID. The leader (default: the first party) drives the protocol; `workers`
    spreads the curve operations over processes; `order_seed` fixes the agreed order (see `lead`); `chunk` is
    the number of points per message.

    >>> rows = intersect({"alice": ["u1", "u2", "u3"], "bob": ["u3", "u9", "u1"]})
    >>> [["u1", "u2", "u3"][i] for i in rows["alice"]] == [["u3", "u9", "u1"][i] for i in rows["bob"]]
    True
    """
    if len(ids) < 2:
        raise ConfigError("PSI needs at least two parties' ID columns")
    leader = leader if leader is not None else next(iter(ids))
    if leader not in ids:
        raise ConfigError(f"leader {leader!r} is not one of the parties {list(ids)}")
    if chunk < 1:
        raise ConfigError(f"chunk must be at least 1 point per message, got {chunk}")
    others = [PsiParty(p, v, workers=workers, duplicates=duplicates) for p, v in ids.items() if p != leader]
    backend = backend if backend is not None else InProcessBackend(PsiGroup(others))
    backend.start([o.name for o in others])
    try:
        leader_rows = lead(ids[leader], backend, [o.name for o in others], workers=workers, order_seed=order_seed,
                           chunk=chunk, duplicates=duplicates)
    finally:
        backend.close()
    out = {leader: leader_rows}
    for o in others:
        assert o.rows is not None
        out[o.name] = o.rows
    return {p: out[p] for p in ids}
