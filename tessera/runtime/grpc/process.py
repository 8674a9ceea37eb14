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

from tessera.core.errors import ConfigError
from tessera.core.logging import get_logger
from tessera.runtime.grpc.backend import GrpcBackend
from tessera.runtime.grpc.config import PartyConfig, read_pem
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


def write_transport(out: Path, backend: GrpcBackend, *, label: dict[str, Any] | None = None) -> Path:
    """`out/transport.json`: bytes up/down (total and per client as [down, up]) and every refused stream, over
    every session of the run; `sessions` lists each one labelled (its number, `label`: e.g. the rounds it ran)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "transport.json"
    t = backend.traffic
    sessions = _previous_sessions(path)
    session: dict[str, Any] = {"session": len(sessions) + 1, **(label or {}), "bytes_up": t.up, "bytes_down": t.down,
                               "per_client": {c: list(v) for c, v in t.per_client.items()},
                               "refused": [{"claimed": r.claimed, "reason": r.reason} for r in backend.refused]}
    sessions.append(session)
    per_client: dict[str, list[int]] = {}
    for s in sessions:
        for c, (down, up) in s["per_client"].items():
            total = per_client.setdefault(c, [0, 0])
            total[0], total[1] = total[0] + int(down), total[1] + int(up)
    report = {"bytes_up": sum(int(s["bytes_up"]) for s in sessions),
              "bytes_down": sum(int(s["bytes_down"]) for s in sessions), "per_client": per_client,
              "refused": [{**r, "session": s["session"]} for s in sessions for r in s["refused"]],
              "sessions": sessions}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    return path


def _previous_sessions(path: Path) -> list[dict[str, Any]]:
    """The sessions of an earlier transport.json (one written before sessions existed counts as session 1)."""
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("%s is not valid JSON; starting its session list afresh", path)
        return []
    if isinstance(old, dict) and isinstance(old.get("sessions"), list):
        return list(old["sessions"])
    if isinstance(old, dict) and {"bytes_up", "bytes_down"} <= set(old):
        refused = [{k: v for k, v in r.items() if k != "session"} for r in old.get("refused", [])]
        return [{"session": 1, "bytes_up": old["bytes_up"], "bytes_down": old["bytes_down"],
                 "per_client": old.get("per_client", {}), "refused": refused}]
    return []


def check_identity(party: PartyConfig) -> None:
    """Refuse a party whose key does not belong to its certificate, in one line, before any connection (gRPC
    would only say `Invalid private key.` and a client would keep retrying)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_pem, key_pem = read_pem(party.cert, f"{party.name}'s certificate"), read_pem(party.key, f"{party.name}'s key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ConfigError(f"{party.cert}: not a PEM certificate; reissue it with `tessera certs issue --name "
                          f"{party.name} --force`") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{party.key}: not an unencrypted PEM private key; reissue it with `tessera certs issue "
                          f"--name {party.name} --force`") from None
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*fmt) != cert.public_key().public_bytes(*fmt):
        raise ConfigError(f"{party.key} does not match the certificate {party.cert} (party {party.name}); give the "
                          f"key issued with that certificate, or reissue both with `tessera certs issue --name "
                          f"{party.name} --force`")
