"""Send what every client gets once per exchange: tensors shared by all requests go to Ray's object store once.

The coordinator builds one message per client, but the global params (and e.g. SCAFFOLD's server control
variate) are the same object in every one of them. `split` finds maps shared by identity across requests, at a
message field (`FitIns.params`) or one level down (`FitIns.extras["scaffold_c"]`), encodes them once with serde
and leaves an empty map in their place in each client's message; `join` puts them back on the actor. Both halves
are serde blobs, so what an actor decodes is exactly what a wire would have carried. An actor decodes the shared
blob once per exchange (`decode_table`) and serves every client it runs from those tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from tessera.core import serde
from tessera.core.errors import SerdeError

Path = tuple[str, ...]  # (field,) or (field, key)


def _candidates(msg: Any) -> list[tuple[Path, Any]]:
    out: list[tuple[Path, Any]] = []
    if not dataclasses.is_dataclass(msg) or isinstance(msg, type):
        return out
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if isinstance(value, dict) and value:
            out.append(((f.name,), value))
            out += [((f.name, k), v) for k, v in value.items() if isinstance(k, str) and isinstance(v, dict) and v]
    return out


def find_shared(requests: Mapping[str, Any]) -> dict[Path, Any]:
    """Path -> the map that is the same object in most (at least two) requests; a whole field wins over its keys."""
    if len(requests) < 2:
        return {}
    count: dict[tuple[Path, int], int] = {}
    value_of: dict[tuple[Path, int], Any] = {}
    for msg in requests.values():
        for path, value in _candidates(msg):
            key = (path, id(value))
            count[key] = count.get(key, 0) + 1
            value_of[key] = value
    best: dict[Path, tuple[Path, int]] = {}
    for key, n in count.items():
        if n >= 2 and (key[0] not in best or n > count[best[key[0]]]):
            best[key[0]] = key
    return {p: value_of[k] for p, k in sorted(best.items()) if len(p) == 1 or (p[0],) not in best}


def split(msg: Any, shared: dict[Path, Any]) -> tuple[Any, list[Path]]:
    """`msg` with each map that *is* (by identity) a shared one replaced by an empty map, and those paths."""
    changes: dict[str, Any] = {}
    left_out: list[Path] = []
    for path, value in shared.items():
        current = changes.get(path[0], getattr(msg, path[0]))
        if len(path) == 1 and current is value:
            changes[path[0]] = {}
        elif len(path) == 2 and isinstance(current, dict) and current.get(path[1]) is value:
            changes[path[0]] = {**current, path[1]: {}}
        else:
            continue
        left_out.append(path)
    return (dataclasses.replace(msg, **changes) if changes else msg), left_out


def encode_shared(requests: Mapping[str, Any]) -> tuple[bytes | None, dict[str, bytes]]:
    """(the shared blob or None, one encoded message per client with the shared maps left out)."""
    first = find_shared(requests)
    if not first:
        return None, {c: serde.encode_message(m) for c, m in requests.items()}
    blob = serde.dumps({"paths": [list(p) for p in first], "values": list(first.values())})
    out: dict[str, bytes] = {}
    for c, m in requests.items():
        light, left_out = split(m, first)
        out[c] = serde.dumps({"left_out": [list(p) for p in left_out], "message": serde.encode_message(light)})
    return blob, out


Table = dict[Path, Any]  # the shared maps of one exchange, decoded


def decode_table(shared: bytes | bytearray | memoryview, *, max_bytes: int, borrow: bool = False) -> Table:
    """The exchange's shared maps, decoded once per actor: one copy out of the (read-only) object store into a
    buffer the tensors then view, so serving each client costs no copy of them; with `borrow` no copy at all, the
    tensors view the store's pages (the caller hands them over frozen: `serde.loads`)."""
    if borrow:
        table = serde.loads(shared, max_bytes=max_bytes, borrow=True)
    else:
        table = serde.loads(bytearray(shared), max_bytes=max_bytes, take=True)
    if not (isinstance(table, dict) and set(table) == {"paths", "values"} and isinstance(table["paths"], list)
            and isinstance(table["values"], list) and len(table["paths"]) == len(table["values"])
            and all(isinstance(p, list) and 1 <= len(p) <= 2 and all(isinstance(x, str) for x in p)
                    for p in table["paths"])):
        raise SerdeError("not a shared-params table")
    return {tuple(p): v for p, v in zip(table["paths"], table["values"], strict=True)}


def decode(request: bytes, shared: bytes | bytearray | memoryview | Table | None, *, max_bytes: int) -> Any:
    """The client's full message from its blob and the exchange's shared blob or decoded table (validated by
    serde). The shared maps are the table's own objects: hand the message over read-only (`runtime.handover`)."""
    if shared is None:
        return serde.decode_message(request, max_bytes=max_bytes)
    wrapper = serde.loads(request, max_bytes=max_bytes)
    if not (isinstance(wrapper, dict) and set(wrapper) == {"left_out", "message"}
            and isinstance(wrapper["left_out"], list) and isinstance(wrapper["message"], bytes)):
        raise SerdeError("not a shared-params request")
    msg = serde.decode_message(wrapper["message"], max_bytes=max_bytes)
    values = shared if isinstance(shared, dict) else decode_table(shared, max_bytes=max_bytes)
    changes: dict[str, Any] = {}
    for raw in wrapper["left_out"]:
        path = tuple(raw) if isinstance(raw, list) else ()
        if path not in values or not all(isinstance(x, str) for x in path):
            raise SerdeError("request leaves out a map the shared blob does not carry")
        if len(path) == 1:
            changes[path[0]] = values[path]
        else:
            current = changes.get(path[0], getattr(msg, path[0]))
            if not isinstance(current, dict):
                raise SerdeError("request leaves out a map the shared blob does not carry")
            changes[path[0]] = {k: (values[path] if k == path[1] else v) for k, v in current.items()}
    return dataclasses.replace(msg, **changes) if changes else msg
