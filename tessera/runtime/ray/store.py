"""Per-client state kept by the driver between rounds, keyed by client id, as serde blobs (never pickle).

Actors are interchangeable and hold no client state: before a client runs, its blob travels to whichever actor
runs it, and the state the client leaves behind comes back with the reply. `MemoryStore` keeps blobs in the
driver's memory; `DiskStore` keeps one file per client in a private folder (removed on close), so the driver's
memory stays bounded however many clients carry state (SCAFFOLD control variates, DP accountants).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from tessera.core import serde
from tessera.core.errors import SerdeError


class StateStore(Protocol):
    def get(self, client: str) -> bytes | None: ...

    def put(self, client: str, blob: bytes | None) -> None:
        """Store `blob` for `client`; None (no state) removes the entry."""

    def clients(self) -> Iterator[str]: ...

    def clear(self) -> None: ...

    def close(self) -> None: ...


class MemoryStore:
    """Blobs in a dict on the driver."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}

    def get(self, client: str) -> bytes | None:
        return self._blobs.get(client)

    def put(self, client: str, blob: bytes | None) -> None:
        if blob is None:
            self._blobs.pop(client, None)
        else:
            self._blobs[client] = blob

    def clients(self) -> Iterator[str]:
        return iter(list(self._blobs))

    def clear(self) -> None:
        self._blobs.clear()

    def close(self) -> None:
        self._blobs.clear()


class DiskStore:
    """One file per client under a fresh folder inside `root`; file names are hashes, never raw client ids."""

    def __init__(self, root: str | Path) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="tessera-client-state-", dir=root))
        self._known: set[str] = set()

    def _path(self, client: str) -> Path:
        return self.dir / (hashlib.sha256(client.encode()).hexdigest()[:32] + ".tsr")

    def get(self, client: str) -> bytes | None:
        return self._path(client).read_bytes() if client in self._known else None

    def put(self, client: str, blob: bytes | None) -> None:
        if blob is None:
            self._path(client).unlink(missing_ok=True)
            self._known.discard(client)
        else:
            self._path(client).write_bytes(blob)  # scratch space: durability is the checkpoint's job
            self._known.add(client)

    def clients(self) -> Iterator[str]:
        return iter(sorted(self._known))

    def clear(self) -> None:
        for client in list(self._known):
            self.put(client, None)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self._known.clear()


def make_store(state_dir: str | None) -> StateStore:
    return DiskStore(state_dir) if state_dir else MemoryStore()


def encode_state(state: dict[str, Any]) -> bytes | None:
    """A client's `ClientContext.state` as a serde blob; None when there is nothing to keep."""
    return serde.dumps(state) if state else None


def decode_state(blob: bytes | None) -> dict[str, Any]:
    if blob is None:
        return {}
    state = serde.loads(blob)
    if not isinstance(state, dict):
        raise SerdeError("stored client state is not a map")
    return state
