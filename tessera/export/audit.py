"""An append-only audit log of bundle exports and hand-overs: who, which bundle digest, when, to or from whom.

One JSON object per line in `tessera-audit.jsonl`, by default in the folder that holds the bundle (exports and
sends) or the receiver's root (receipts). Each record carries `prev`, the SHA-256 of the line before it, so a
deleted or edited line breaks the chain that `check_audit_log` walks. Lines are written with one `O_APPEND`
write and fsync; timestamps live here, never in a bundle's hashed files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tessera.core.errors import ExportError

AUDIT_LOG = "tessera-audit.jsonl"
GENESIS = "0" * 64


def _last_hash(path: Path) -> str:
    if not path.is_file() or path.stat().st_size == 0:
        return GENESIS
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 64 * 1024))
        lines = fh.read().splitlines()
    return hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS


def append(path: Path | None, event: str, *, digest: str, bundle: str, who: str | None, **extra: Any) -> None:
    """Append one record; `path=None` disables the log (the caller opted out)."""
    if path is None:
        return
    record = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "event": event, "who": who,
              "digest": digest, "bundle": bundle, **extra, "prev": _last_hash(path)}
    line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_audit_log(path: str | Path) -> list[dict[str, Any]]:
    """Every record, after checking the hash chain; ExportError names the first broken line."""
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"audit log {p} does not exist")
    records: list[dict[str, Any]] = []
    prev = GENESIS
    for i, raw in enumerate(p.read_bytes().splitlines(), start=1):
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            raise ExportError(f"{p}:{i} is not JSON; the audit log was edited") from None
        if not isinstance(record, dict) or record.get("prev") != prev:
            raise ExportError(f"{p}:{i} does not follow line {i - 1} (hash chain broken); the audit log was edited "
                              "or lines were removed")
        records.append(record)
        prev = hashlib.sha256(raw).hexdigest()
    return records


def default_log(folder: Path, audit_log: str | Path | bool) -> Path | None:
    """`audit_log=True` -> folder/tessera-audit.jsonl; False -> no log; a path -> that file."""
    if audit_log is True:
        return folder / AUDIT_LOG
    if audit_log is False:
        return None
    return Path(audit_log)
