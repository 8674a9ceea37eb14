"""The curve work of PSI in bulk: hashing IDs to Curve25519, blinding (X25519 scalar multiplication via
`cryptography`), one-way tags of blinded points, and matching blinded points or tags with numpy.

This module imports nothing from tessera (and so neither torch) because its functions run in worker processes
started as `python -m tessera.vertical.psi_curve` and fed over pipes: they start in well under a second, never
re-import the caller's main module, and hold no threads of the caller (gRPC, torch), which a fork would copy in an
unknown state. Errors come back as `ValueError`; the protocol layer (psi.py) turns them into a `ProtocolError`.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

DOMAIN = b"tessera-psi-v1\x00"
TAG_DOMAIN = b"tessera-psi-tag-v1\x00"
POINT = 32  # a Curve25519 u-coordinate
TAG = 16  # SHA-256 of a doubly blinded point, truncated: the leader matches tags, never sees those points
POOL_MIN = 8192  # below this many points a worker round trip costs more than it saves
_POOLS: dict[int, _Pool] = {}


def hash_to_curve(ids: Sequence[str]) -> list[bytes]:
    """Map IDs to Curve25519 u-coordinates (SHA-512 with a domain tag; top bit cleared as RFC 7748 requires)."""
    out = []
    for i in ids:
        h = bytearray(hashlib.sha512(DOMAIN + i.encode("utf-8", "surrogatepass")).digest()[:POINT])
        h[31] &= 0x7F
        out.append(bytes(h))
    return out


def _mult(secret: bytes, blob: bytes) -> bytes:
    key = X25519PrivateKey.from_private_bytes(secret)
    pub, exchange = X25519PublicKey.from_public_bytes, key.exchange
    try:
        return b"".join([exchange(pub(blob[i : i + POINT])) for i in range(0, len(blob), POINT)])
    except ValueError:  # X25519 of a low-order point is all zeros; OpenSSL refuses it
        raise ValueError("a low-order point (not a hashed ID) was sent for blinding") from None


def _tags(blob: bytes) -> bytes:
    sha = hashlib.sha256
    return b"".join([sha(TAG_DOMAIN + blob[i : i + POINT]).digest()[:TAG] for i in range(0, len(blob), POINT)])


def _job(op: bytes, secret: bytes, payload: bytes) -> tuple[bytes, bytes]:
    """One task: b"h" (length-prefixed IDs -> blinded points), b"b" (points -> blinded), b"t" (blinded, tagged)."""
    if op == b"h":
        return _mult(secret, b"".join(hash_to_curve(_unpack_ids(payload)))), b""
    out = _mult(secret, payload)
    return out, (_tags(out) if op == b"t" else b"")


def _pack_ids(ids: Sequence[str]) -> bytes:
    parts = [i.encode("utf-8", "surrogatepass") for i in ids]
    return b"".join(struct.pack("<I", len(b)) + b for b in parts)


def _unpack_ids(blob: bytes) -> list[str]:
    out, at = [], 0
    while at < len(blob):
        (n,) = struct.unpack_from("<I", blob, at)
        out.append(blob[at + 4 : at + 4 + n].decode("utf-8", "surrogatepass"))
        at += 4 + n
    return out


def _read(stream: IO[bytes], n: int) -> bytes:
    buf = stream.read(n)
    if len(buf) != n:
        raise EOFError("PSI worker pipe closed")
    return buf


def _blob(stream: IO[bytes]) -> bytes:
    return _read(stream, struct.unpack("<Q", _read(stream, 8))[0])


def _serve(inp: IO[bytes], out: IO[bytes]) -> None:
    """Worker loop: request = op(1) secret(32) u64-length payload; reply = status(1) and two u64-length blobs
    (results, or an error message). Plain bytes both ways: no pickle between processes either."""
    while op := inp.read(1):
        secret, payload = _read(inp, 32), _blob(inp)
        try:
            a, b = _job(op, secret, payload)
            status = b"\x00"
        except ValueError as exc:
            a, b, status = str(exc).encode(), b"", b"\x01"
        out.write(status + struct.pack("<Q", len(a)) + a + struct.pack("<Q", len(b)) + b)
        out.flush()


class _Pool:
    """`workers` long-lived worker processes fed over pipes; one batch at a time (a lock), each worker a piece."""

    def __init__(self, workers: int) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.procs = [subprocess.Popen([sys.executable, "-m", "tessera.vertical.psi_curve"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, env=env) for _ in range(workers)]
        self.lock = threading.Lock()

    def run(self, op: bytes, secret: bytes, pieces: list[bytes]) -> list[tuple[bytes, bytes]]:
        with self.lock:
            procs = self.procs[: len(pieces)]
            for proc, piece in zip(procs, pieces, strict=True):
                assert proc.stdin is not None
                proc.stdin.write(op + secret + struct.pack("<Q", len(piece)) + piece)
                proc.stdin.flush()
            replies = []
            for proc in procs:
                assert proc.stdout is not None
                status, a, b = _read(proc.stdout, 1), _blob(proc.stdout), _blob(proc.stdout)
                replies.append((status, a, b))
        for status, a, _ in replies:
            if status != b"\x00":
                raise ValueError(a.decode())
        return [(a, b) for _, a, b in replies]

    def close(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self.procs:
            proc.wait(timeout=10)


def _pool(workers: int) -> _Pool:
    if workers not in _POOLS:
        _POOLS[workers] = _Pool(workers)
    return _POOLS[workers]


@atexit.register
def shutdown() -> None:
    """Stop the worker processes (they start again on the next large batch)."""
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def bulk(op: str, secret: bytes, payload: bytes | list[str], *, workers: int) -> tuple[bytes, bytes]:
    """Blind `payload` ("hash": IDs; "blind": points; "tag": points, also tagged) with `secret`, over `workers`
    processes (one piece each) when the input is large enough to pay for the round trip."""
    code = {"hash": b"h", "blind": b"b", "tag": b"t"}[op]
    n = len(payload) if isinstance(payload, list) else len(payload) // POINT
    if workers <= 1 or n < POOL_MIN:
        return _job(code, secret, _pack_ids(payload) if isinstance(payload, list) else payload)
    step = -(-n // workers)
    if isinstance(payload, list):
        pieces = [_pack_ids(payload[i : i + step]) for i in range(0, n, step)]
    else:
        pieces = [payload[i * POINT : (i + step) * POINT] for i in range(0, n, step)]
    parts = _pool(workers).run(code, secret, pieces)
    return b"".join(p[0] for p in parts), b"".join(p[1] for p in parts)


def _prefix(blob: bytes, width: int) -> np.ndarray:
    return np.frombuffer(blob, dtype="<u8")[:: width // 8]


class Index:
    """Rows of `width` bytes, sorted by their first 8 bytes for vectorised lookup (full rows compared on a hit)."""

    def __init__(self, blob: bytes, width: int) -> None:
        assert width % 8 == 0 and len(blob) % width == 0
        self.width = width
        self.rows = np.frombuffer(blob, dtype=np.uint8).reshape(-1, width)
        pre = _prefix(blob, width)
        self.order = np.argsort(pre, kind="stable")
        self.sorted = pre[self.order]

    def __len__(self) -> int:
        return len(self.order)

    def find(self, blob: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(qi, ki): query row qi equals indexed row ki, for every query row found (first equal row if repeated)."""
        q = np.frombuffer(blob, dtype=np.uint8).reshape(-1, self.width)
        pre = _prefix(blob, self.width)
        lo = np.searchsorted(self.sorted, pre, "left")
        hi = np.searchsorted(self.sorted, pre, "right")
        runs = hi - lo
        single = np.nonzero(runs == 1)[0]
        k = self.order[lo[single]]
        same = np.all(self.rows[k] == q[single], axis=1) if len(single) else np.zeros(0, dtype=bool)
        qi, ki = [single[same]], [k[same]]
        for j in np.nonzero(runs > 1)[0]:  # 64-bit prefix collisions: ~1e-7 per million rows
            for c in self.order[lo[j] : hi[j]]:
                if bytes(self.rows[c]) == bytes(q[j]):
                    qi.append(np.array([j]))
                    ki.append(np.array([c]))
                    break
        return np.concatenate(qi).astype(np.int64), np.concatenate(ki).astype(np.int64)


if __name__ == "__main__":
    _serve(sys.stdin.buffer, sys.stdout.buffer)
