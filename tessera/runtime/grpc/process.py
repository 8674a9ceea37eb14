"""One party as an OS process: how signals stop it, the client serve loop, and the transport report.

Shared by the horizontal coordinator/clients (`tessera.horizontal.deploy`) and the split label party/data owners
(`tessera.vertical.deploy`). Progress lines go to `notify` (the CLI prints them; the default logs them).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tessera.core.logging import get_logger
from tessera.runtime.grpc.backend import GrpcBackend
from tessera.runtime.grpc.party import ClientParty, ClientStats

log = get_logger(__name__)
Notify = Callable[[str], None]


class Stopper:
    """Installs SIGTERM/SIGINT handlers for a coordinator. First signal: finish the round (or epoch) in flight,
    then stop (`requested` turns true). Second: abandon it now (every request in flight fails)."""

    def __init__(self, backend: GrpcBackend) -> None:
        self.backend = backend
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested:
            self.backend.abort("coordinator interrupted twice: round abandoned")
        self.requested = True
        self.backend.stop_waiting()


def serve(party: ClientParty, intro: str, *, notify: Notify = log.info) -> ClientStats:
    """Run a client party until the coordinator says BYE or SIGTERM/SIGINT stops it (a clean stop)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: party.stop())
    notify(intro)
    stats = party.run()
    notify(f"party {party.me.name} done: {stats.requests} requests served over {stats.connections} connection(s)")
    return stats


def write_transport(out: Path, backend: GrpcBackend) -> Path:
    """`out/transport.json`: bytes up/down (total and per client) and every refused stream."""
    out.mkdir(parents=True, exist_ok=True)
    t = backend.traffic
    report = {"bytes_up": t.up, "bytes_down": t.down, "per_client": t.per_client,
              "refused": [{"claimed": r.claimed, "reason": r.reason} for r in backend.refused]}
    path = out / "transport.json"
    path.write_text(json.dumps(report, indent=2))
    return path
