"""Hand a bundle to another party over the runtime channel: chunked, resumable, hash-checked at the end.

The sender drives a `Backend` (in-process, Ray or gRPC: anything that moves ``@message`` dataclasses); the
receiving party runs a `BundleReceiver` as (or in front of) its handler::

    sender                                   receiver (BundleReceiver)
    BundleOffer(files, sizes, sha256s)  ->   BundleStatus(bytes already held per file)
    BundleChunk(file, offset, data)     ->   BundleAck(next offset)          ... repeated
    BundleCommit                        ->   BundleReceipt(ok)  after every SHA-256 and the manifest check

Partial files live under ``root/.incoming/<digest>/`` with the offer beside them, so a broken connection, or a
receiver restart, resumes from the last acknowledged byte: calling `send_bundle` again re-offers, learns what
the receiver already holds, and sends only the rest. Chunks may be zstd-compressed one by one (resume works at
chunk granularity); the receiver bounds decompression by the declared size. Nothing is unpickled, ever.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tessera.core.errors import ExportError, ProtocolError, TransportError
from tessera.core.logging import get_logger
from tessera.core.serde import message
from tessera.export import audit
from tessera.export.audit import default_log
from tessera.export.manifest import MANIFEST, SIGNATURE, check_files, is_simple_name, read_manifest, sha256_file
from tessera.export.sign import Trust, verify_signature
from tessera.runtime.backend import Backend, ClientFailure, Handler

log = get_logger(__name__)
DEFAULT_CHUNK_BYTES = 4 * 1024**2
INCOMING = ".incoming"


@message
@dataclass(frozen=True)
class BundleOffer:
    transfer_id: str  # the manifest digest: the same bundle resumes, a different one starts afresh
    name: str
    files: list[str]
    sizes: list[int]
    sha256: list[str]
    compression: str  # "none" | "zstd"


@message
@dataclass(frozen=True)
class BundleStatus:
    transfer_id: str
    offsets: dict[str, int]
    complete: bool


@message
@dataclass(frozen=True)
class BundleChunk:
    transfer_id: str
    file: str
    offset: int
    raw_bytes: int
    compressed: bool
    data: bytes


@message
@dataclass(frozen=True)
class BundleAck:
    transfer_id: str
    file: str
    next_offset: int


@message
@dataclass(frozen=True)
class BundleCommit:
    transfer_id: str


@message
@dataclass(frozen=True)
class BundleReceipt:
    transfer_id: str
    ok: bool
    reason: str


class BundleReceiver:
    """A party's handler for incoming bundles, written under `root/<name>` once every hash checks out.

    Other messages go to `fallback` (the party's usual handler), so one channel carries both.
    """

    def __init__(self, root: str | Path, *, fallback: Handler | None = None, max_bundle_bytes: int = 64 * 1024**3,
                 max_chunk_bytes: int = 64 * 1024**2, trust: Any = None,
                 audit_log: str | Path | bool = True) -> None:
        self.root = Path(root)
        self.fallback = fallback
        self.trust = Trust.of(trust) if trust is not None else None  # then only signed bundles are accepted
        self.audit_log = default_log(self.root, audit_log)
        self.max_bundle_bytes = max_bundle_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.received: dict[str, Path] = {}

    def handle(self, client: str, msg: Any) -> Any:
        if isinstance(msg, BundleOffer):
            return self._offer(msg)
        if isinstance(msg, BundleChunk):
            return self._chunk(msg)
        if isinstance(msg, BundleCommit):
            name = self._load_offer(msg.transfer_id).name
            receipt = self._commit(msg)
            audit.append(self.audit_log, "receive" if receipt.ok else "refuse", digest=msg.transfer_id,
                         bundle=name, who=client, reason=receipt.reason or None)
            return receipt
        if self.fallback is not None:
            return self.fallback.handle(client, msg)
        raise ProtocolError(f"bundle receiver got a {type(msg).__name__}; it only accepts bundle hand-over messages")

    # ------------------------------------------------------------------------------------------------ state
    def _dir(self, tid: str) -> Path:
        if not (len(tid) == 64 and all(c in "0123456789abcdef" for c in tid)):
            raise ProtocolError("transfer id must be a bundle's sha256 digest")
        return self.root / INCOMING / tid

    def _load_offer(self, tid: str) -> BundleOffer:
        path = self._dir(tid).with_suffix(".offer.json")
        if not path.is_file():
            raise ProtocolError("no offer for this transfer; the sender must send BundleOffer first")
        return BundleOffer(**json.loads(path.read_text()))

    def _offsets(self, offer: BundleOffer) -> dict[str, int]:
        d = self._dir(offer.transfer_id)
        return {f: (d / f).stat().st_size if (d / f).exists() else 0 for f in offer.files}

    # --------------------------------------------------------------------------------------------- messages
    def _offer(self, offer: BundleOffer) -> BundleStatus:
        d = self._dir(offer.transfer_id)
        n = len(offer.files)
        if not (len(offer.sizes) == n == len(offer.sha256) and MANIFEST in offer.files and is_simple_name(offer.name)
                and all(is_simple_name(f) for f in offer.files) and len(set(offer.files)) == n):
            raise ProtocolError("malformed bundle offer (file names, sizes and hashes must line up)")
        if offer.compression not in ("none", "zstd") or any(s < 0 for s in offer.sizes):
            raise ProtocolError("malformed bundle offer (compression or sizes)")
        if sum(offer.sizes) > self.max_bundle_bytes:
            raise ProtocolError(f"bundle of {sum(offer.sizes)} bytes exceeds this party's limit of "
                                f"{self.max_bundle_bytes}; raise max_bundle_bytes")
        final = self.root / offer.name
        if final.is_dir() and (final / MANIFEST).is_file() and _digest(final) == offer.transfer_id:
            return BundleStatus(offer.transfer_id, {f: s for f, s in zip(offer.files, offer.sizes, strict=True)}, True)
        d.mkdir(parents=True, exist_ok=True)
        d.with_suffix(".offer.json").write_text(json.dumps(asdict(offer)))
        return BundleStatus(offer.transfer_id, self._offsets(offer), False)

    def _chunk(self, c: BundleChunk) -> BundleAck:
        offer = self._load_offer(c.transfer_id)
        if c.file not in offer.files:
            raise ProtocolError(f"chunk for {c.file!r}, which is not in the offer")
        size = offer.sizes[offer.files.index(c.file)]
        path = self._dir(c.transfer_id) / c.file
        have = path.stat().st_size if path.exists() else 0
        if c.offset != have:  # a duplicate or a chunk after a lost ack: tell the sender where we are
            return BundleAck(c.transfer_id, c.file, have)
        if not (0 <= c.raw_bytes <= self.max_chunk_bytes and c.offset + c.raw_bytes <= size):
            raise ProtocolError(f"chunk of {c.raw_bytes} bytes at {c.offset} does not fit {c.file} ({size} bytes)")
        data = _decompress(c.data, c.raw_bytes) if c.compressed else c.data
        if len(data) != c.raw_bytes:
            raise ProtocolError(f"chunk of {c.file} carries {len(data)} bytes, declared {c.raw_bytes}")
        with open(path, "ab") as fh:
            fh.write(data)
        return BundleAck(c.transfer_id, c.file, have + len(data))

    def _commit(self, msg: BundleCommit) -> BundleReceipt:
        offer = self._load_offer(msg.transfer_id)
        d = self._dir(msg.transfer_id)
        final = self.root / offer.name
        if final.is_dir() and (final / MANIFEST).is_file() and _digest(final) == offer.transfer_id:
            return BundleReceipt(msg.transfer_id, True, "already received")
        try:
            for f, size, digest in zip(offer.files, offer.sizes, offer.sha256, strict=True):
                if not (d / f).is_file() or (d / f).stat().st_size != size or sha256_file(d / f) != digest:
                    raise ExportError(f"hash mismatch on {f} after transfer")
            manifest = read_manifest(d)
            offered = dict(zip(offer.files, offer.sha256, strict=True))
            if manifest["manifest_sha256"] != offer.transfer_id or any(
                    offered.get(e.get("file")) != e.get("sha256") for e in manifest["files"]):
                raise ExportError("the manifest is not the one offered, or lists files that were not sent")
            extra = set(offer.files) - {e["file"] for e in manifest["files"]} - {MANIFEST, SIGNATURE}
            if extra:
                raise ExportError(f"the offer carries files the manifest does not list ({sorted(extra)[:5]})")
            if self.trust is not None:
                verify_signature(d, offer.transfer_id, self.trust)
        except ExportError as exc:
            shutil.rmtree(d, ignore_errors=True)  # start afresh: a corrupt prefix would never verify
            d.with_suffix(".offer.json").unlink(missing_ok=True)
            return BundleReceipt(msg.transfer_id, False, f"{exc}; the partial copy was discarded, send again")
        if final.exists():
            return BundleReceipt(msg.transfer_id, False, f"{offer.name} already exists here with other contents")
        d.rename(final)
        d.with_suffix(".offer.json").unlink(missing_ok=True)
        self.received[offer.name] = final
        log.info("received bundle %s (%d files)", offer.name, len(offer.files))
        return BundleReceipt(msg.transfer_id, True, "")


def _digest(root: Path) -> str | None:
    try:
        return str(read_manifest(root)["manifest_sha256"])
    except ExportError:
        return None


def _decompress(data: bytes, raw_bytes: int) -> bytes:
    import zstandard

    # Read at most one byte more than declared from a stream: a frame's own size field is not trusted (bomb).
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
            out = reader.read(raw_bytes + 1)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"chunk is not valid zstd: {exc}") from None
    if len(out) > raw_bytes:
        raise ProtocolError(f"chunk is not valid zstd within {raw_bytes} bytes (it expands further)")
    return bytes(out)


@dataclass(frozen=True)
class TransferReport:
    """What a (possibly resumed) hand-over moved. `resumed_bytes` were already at the receiver."""

    to: str
    name: str
    transfer_id: str
    total_bytes: int
    resumed_bytes: int
    payload_bytes: int
    chunks: int
    compression: str
    seconds: float


def send_bundle(backend: Backend, bundle: str | Path, *, to: str, name: str | None = None,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES, compression: str | None = None, level: int = 3,
                timeout: float | None = None, who: str | None = None,
                audit_log: str | Path | bool = True) -> TransferReport:
    """Send a bundle directory to party `to`, resuming whatever an earlier, interrupted call left there.

    A completed hand-over is appended to `audit_log` (default: tessera-audit.jsonl beside the bundle) as sent
    by `who` (this party's name) to `to`.

    Raises TransportError if the channel breaks (call again to resume) and ExportError if the receiver's hash
    check fails (its partial copy is discarded; call again to resend from scratch).
    """
    root = Path(bundle)
    if not root.is_dir():
        raise ExportError(f"{root} is not a bundle directory; hand over the directory save_bundle wrote")
    if not 1 <= chunk_bytes <= 64 * 1024**2:
        raise ExportError("chunk_bytes must be between 1 byte and 64 MiB")
    if compression not in (None, "none", "zstd"):
        raise ExportError(f"compression must be None or 'zstd', got {compression!r}")
    manifest = read_manifest(root)
    check_files(root, manifest)
    entries = [(e["file"], int(e["bytes"]), str(e["sha256"])) for e in manifest["files"]]
    entries += [(f, (root / f).stat().st_size, sha256_file(root / f)) for f in (MANIFEST, SIGNATURE)
                if (root / f).is_file()]
    tid = str(manifest["manifest_sha256"])
    comp = "zstd" if compression == "zstd" else "none"
    offer = BundleOffer(tid, name or root.name, [e[0] for e in entries], [e[1] for e in entries],
                        [e[2] for e in entries], comp)
    start = time.perf_counter()
    channel = _Channel(backend, to, timeout)
    status = channel.ask(offer, BundleStatus)
    resumed = sum(min(status.offsets.get(f, 0), s) for f, s, _ in entries)
    payload = chunks = 0
    if not status.complete:
        compressor = _compressor(comp, level)
        for f, size, _ in entries:
            offset = min(status.offsets.get(f, 0), size)
            with open(root / f, "rb") as fh:
                while offset < size:
                    fh.seek(offset)
                    raw = fh.read(min(chunk_bytes, size - offset))
                    data = compressor(raw) if compressor else raw
                    packed = len(data) < len(raw)
                    ack = channel.ask(BundleChunk(tid, f, offset, len(raw), packed, data if packed else raw),
                                      BundleAck)
                    payload += len(data) if packed else len(raw)
                    chunks += 1
                    offset = ack.next_offset
        receipt = channel.ask(BundleCommit(tid), BundleReceipt)
        if not receipt.ok:
            raise ExportError(f"{to} refused the bundle: {receipt.reason}")
    audit.append(default_log(root.resolve().parent, audit_log), "send", digest=tid, bundle=offer.name, who=who,
                 to=to)
    return TransferReport(to, offer.name, tid, sum(e[1] for e in entries), resumed, payload, chunks, comp,
                          time.perf_counter() - start)


class _Channel:
    def __init__(self, backend: Backend, to: str, timeout: float | None) -> None:
        self.backend, self.to, self.timeout = backend, to, timeout

    def ask(self, msg: Any, expect: type) -> Any:
        reply = self.backend.exchange({self.to: msg}, timeout=self.timeout).get(self.to)
        if isinstance(reply, ClientFailure) or reply is None:
            why = reply.reason if isinstance(reply, ClientFailure) else "no reply"
            raise TransportError(f"hand-over to {self.to} interrupted at {type(msg).__name__} ({why}); call "
                                 "send_bundle again to resume from the last acknowledged chunk")
        if not isinstance(reply, expect):
            raise ProtocolError(f"{self.to} answered {type(msg).__name__} with {type(reply).__name__}")
        return reply


def _compressor(comp: str, level: int) -> Any:
    if comp != "zstd":
        return None
    import zstandard

    return zstandard.ZstdCompressor(level=level).compress
