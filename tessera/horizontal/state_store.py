"""A client party's state on disk: what must survive a restart of its process (`tessera party --state-dir`).

`ClientContext.state` holds what a client carries from round to round: its privacy ledger (DP-SGD), its SecAgg+
stage state (which rounds it finished: replay protection), SCAFFOLD's control variate. In simulation the server's
checkpoint carries it; in a deployment it lives in the client's process, so a restarted client would start again
from epsilon 0 and accept a replayed round. `ClientStateStore` keeps one file per client, written atomically
(temp file, fsync, rename; 0600 like every temp file) with `core.serde` (never pickle) after every request the
client serves, before its reply leaves; `PersistentClientApp` reloads it when the process starts.

A state file that is present but unreadable is refused with one line: starting that client from empty state
would silently reset its epsilon to 0.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tessera.core import serde
from tessera.core.errors import ConfigError, SerdeError
from tessera.core.io import atomic_write_parts, read_into
from tessera.horizontal.client import ClientApp, ClientContext

FORMAT = 1
SUFFIX = ".state"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ClientStateStore:
    """One file per client id under `folder`: `{"format": 1, "client": id, "state": ClientContext.state}`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"--state-dir {self.folder} is a file; give a folder (it is created if missing)")

    def path(self, client: str) -> Path:
        if not _NAME.fullmatch(client):
            raise ConfigError(f"client id {client!r} cannot name a state file (letters, digits, '.', '_', '-' "
                              "only); rename the client in job.toml")
        return self.folder / f"{client}{SUFFIX}"

    def load(self, client: str) -> dict[str, Any] | None:
        """The saved state of `client`; None when it has none yet. ConfigError (one line) for a corrupt file."""
        path = self.path(client)
        if not path.exists():
            return None
        fix = ("it holds this client's privacy ledger and replay state, so the party will not start from scratch: "
               "restore it from a backup, or move it away only for a new run with a fresh budget")
        try:
            blob = serde.loads(read_into(path), take=True)
        except (SerdeError, OSError) as exc:
            raise ConfigError(f"{path}: corrupt client state ({str(exc).splitlines()[0][:120]}); {fix}") from None
        if not (isinstance(blob, dict) and blob.get("format") == FORMAT and isinstance(blob.get("state"), dict)):
            raise ConfigError(f"{path}: not a tessera client state (format {FORMAT}); {fix}")
        if blob.get("client") != client:
            raise ConfigError(f"{path} holds the state of client {blob.get('client')!r}, not {client!r}; give each "
                              "party its own --state-dir")
        state: dict[str, Any] = blob["state"]
        return state

    def save(self, client: str, state: dict[str, Any]) -> None:
        """Write `client`'s state atomically: the file is the old state or the new one, never half of each."""
        try:
            parts = serde.encode_parts({"format": FORMAT, "client": client, "state": state})
        except SerdeError as exc:
            raise ConfigError(f"client {client}'s state cannot be stored ({exc}); ClientContext.state must hold "
                              "only tensors, numbers, strings, bytes, maps and lists") from None
        atomic_write_parts(self.path(client), parts)


class PersistentClientApp:
    """A Handler over a ClientApp whose clients' state is reloaded from a store and saved after every request
    (before the reply is returned, so no reply leaves whose privacy spend is not on disk)."""

    def __init__(self, app: ClientApp, store: ClientStateStore) -> None:
        self.app, self.store = app, store
        self.loaded: set[str] = set()

    def restore(self, client: str) -> dict[str, Any] | None:
        """Load `client`'s saved state into the app now (a corrupt file fails here, before any connection)."""
        state = self.store.load(client)
        if state is not None:
            self.app.contexts[client] = ClientContext(client, dict(state))
        self.loaded.add(client)
        return state

    def handle(self, client: str, msg: Any) -> Any:
        if client not in self.loaded:
            self.restore(client)
        try:
            return self.app.handle(client, msg)
        finally:  # a failed request may have spent privacy too (steps before the failure): it is saved as well
            self.store.save(client, self.app.context(client).state)
