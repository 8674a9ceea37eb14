"""Frames on the wire and the gRPC plumbing shared by both ends. No protoc: raw bytes through a generic handler.

One long-lived bidirectional stream per client (`/tessera.Federation/Session`). The client dials out (clients sit
behind NAT), names itself in the call metadata, and then serves requests the coordinator pushes. Every gRPC
message on the stream is one frame::

    magic "TSF2" | kind u8 | message id u64 | chunk index u32 | chunk count u32 | total length u64
    | crc32 of this payload u32 | payload (at most chunk_bytes)

A serde-encoded message is split into `count` DATA frames sharing an id, produced one at a time as the stream
sends them, from the message's buffers (`serde.encode_parts`: the envelope and views of the tensors), so a sender
never holds a second copy of the message. No gRPC message is larger than one frame, so protobuf's 2 GiB limit
never applies to a whole message (the header counts chunks in u32 and bytes in u64). The receiver checks `total`
against its ceiling *before* allocating, preallocates one buffer of exactly `total` bytes, checks each chunk's
crc32 as it copies it into the buffer in order, and checks the length before decoding; the buffer is then handed
to serde, whose tensors are views over it (one copy from the network, never two).

The checksum catches framing and reassembly faults, not attackers: integrity and authenticity of every byte come
from TLS (an authenticated but hostile party could compute any digest). It is per chunk, so neither end makes an
extra pass over a whole model (TSF1 carried a sha256 of the whole message: four passes over the model per round,
0.43 s of a 50M-parameter round on this machine, before the first byte could leave).

Control frames carry no chunks: HELLO (client -> coordinator, first frame, payload = its party name) registers
the session, WELCOME (payload = the job client id it serves) acknowledges it, BYE ends the job.
"""

from __future__ import annotations

import enum
import math
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from tessera.core.errors import TransportError
from tessera.runtime.grpc.certs import designated_name
from tessera.runtime.grpc.config import FederationConfig, PartyConfig, read_pem
from tessera.runtime.grpc.spool import SpoolFile

SERVICE = "tessera.Federation"
METHOD = "Session"
FULL_METHOD = f"/{SERVICE}/{METHOD}"
PARTY_KEY = "x-tessera-party"
MAGIC = b"TSF2"
HEADER = struct.Struct("<4sBQIIQI")
_SLACK = 4096  # room for the frame header and gRPC's own envelope above chunk_bytes
AUTO_FLOOR = 64 * 1024**2  # the smallest automatic ceiling: small control and split-learning messages fit
REPLY_FACTOR = 4  # a reply may be this many times the largest request (an update plus control variates, ...)


class Kind(enum.IntEnum):
    DATA = 0
    WELCOME = 1
    BYE = 2
    HELLO = 3


class FrameError(TransportError):
    """A frame that is malformed, out of order, over a limit or fails its hash; the stream carrying it is closed."""

    oversize = False


class OversizeError(FrameError):
    oversize = True


@dataclass(frozen=True)
class Frame:
    kind: Kind
    msg_id: int
    index: int
    count: int
    total: int
    crc: int
    payload: bytes | memoryview


Buffers = Sequence[bytes | bytearray | memoryview]


def split(msg_id: int, parts: bytes | Buffers, chunk_bytes: int) -> Iterator[bytes]:
    """The DATA frames of one encoded message (one buffer or consecutive buffers), made lazily: only the frame
    being sent exists as a copy, and its crc32 is taken from that copy. The buffers must not change until the last
    frame is made."""
    views = [memoryview(p).cast("B") for p in ([parts] if isinstance(parts, bytes) else parts)]
    views = [v for v in views if len(v)]
    total = sum(len(v) for v in views)
    if not total:
        raise FrameError("refusing to send an empty message")
    return _frames(msg_id, views, total, chunk_bytes)


def _frames(msg_id: int, views: list[memoryview], total: int, chunk_bytes: int) -> Iterator[bytes]:
    count = math.ceil(total / chunk_bytes)
    part, pos = 0, 0
    for i in range(count):
        pieces: list[bytes | memoryview] = []
        crc = 0
        need = min(chunk_bytes, total - i * chunk_bytes)
        while need:
            take = min(need, len(views[part]) - pos)
            piece = views[part][pos : pos + take]
            crc = zlib.crc32(piece, crc)
            pieces.append(piece)
            need, pos = need - take, pos + take
            if pos == len(views[part]):
                part, pos = part + 1, 0
        yield b"".join([HEADER.pack(MAGIC, Kind.DATA, msg_id, i, count, total, crc), *pieces])


def physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - every supported OS answers
        return 2**40


def ceiling(fixed: int | None, *, largest_sent: int | None) -> tuple[int, str]:
    """The largest message a receiver accepts, and why, for the error that refuses a larger one.

    `fixed` is max_message_bytes from federation.toml. Left unset, the ceiling follows the model: the coordinator
    accepts replies up to REPLY_FACTOR times the largest request it sent to that party (at least AUTO_FLOOR), so a
    job never fails because its model grew, while a declared size far beyond the model is refused before any
    allocation; a client (`largest_sent=None`) accepts what its authenticated coordinator sends, up to its
    memory."""
    if fixed is not None:
        return fixed, f"max_message_bytes={fixed} (federation.toml; raise it on every party if this is expected)"
    if largest_sent is None:
        ram = physical_memory()
        return ram, f"this machine's memory ({ram} bytes)"
    limit = max(AUTO_FLOOR, REPLY_FACTOR * largest_sent)
    return limit, (f"the ceiling of {limit} bytes that follows the model ({REPLY_FACTOR}x the largest request sent "
                   f"to this party, at least {AUTO_FLOOR}); set max_message_bytes in federation.toml if replies "
                   "are legitimately larger")


def control(kind: Kind, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, kind, 0, 0, 0, len(payload), zlib.crc32(payload)) + payload


def parse(raw: bytes, *, max_message_bytes: int, chunk_bytes: int, ceiling_reason: str = "") -> Frame:
    """Check one frame's header against the limits; raises FrameError (OversizeError for size limits).
    `ceiling_reason` says where `max_message_bytes` came from, for the error message."""
    if not isinstance(raw, bytes) or len(raw) < HEADER.size:
        raise FrameError("frame shorter than its header")
    magic, kind, msg_id, index, count, total, crc = HEADER.unpack_from(raw)
    if magic != MAGIC:
        old = " (TSF1: a tessera older than this party's; run the same version everywhere)" if magic == b"TSF1" else ""
        raise FrameError(f"bad frame magic; the peer is not speaking tessera's framing{old}")
    try:
        k = Kind(kind)
    except ValueError:
        raise FrameError(f"unknown frame kind {kind}") from None
    payload = memoryview(raw)[HEADER.size :]  # no copy: the reassembler copies it once, into its buffer
    if k is not Kind.DATA:
        if len(payload) != total or total > 1024:
            raise FrameError("malformed control frame")
        _check_crc(payload, crc, index, msg_id)
        return Frame(k, 0, 0, 0, total, crc, bytes(payload))
    if total > max_message_bytes:
        why = ceiling_reason or f"max_message_bytes={max_message_bytes}"
        raise OversizeError(f"message of {total} bytes exceeds {why}; refused before allocating it")
    if len(payload) > chunk_bytes:
        raise OversizeError(f"chunk of {len(payload)} bytes exceeds chunk_bytes={chunk_bytes}")
    if total == 0 or count == 0 or index >= count or count > total or not payload:
        raise FrameError(f"inconsistent frame header (chunk {index} of {count}, total {total})")
    _check_crc(payload, crc, index, msg_id)
    return Frame(k, msg_id, index, count, total, crc, payload)


def _check_crc(payload: memoryview, crc: int, index: int, msg_id: int) -> None:
    if zlib.crc32(payload) != crc:
        raise FrameError(f"frame {index} of message {msg_id}: checksum mismatch; the chunk was corrupted in transit "
                         "or by the sender's framing")


class Reassembler:
    """Rebuilds one message at a time from in-order chunks; a stream interleaving messages is refused.

    The buffer is a bytearray, or a `spool.SpoolFile` for a message larger than `spool_above` bytes when a spool
    folder is given (the coordinator's `reply_spool_dir`). numpy's uninitialised, huge-page advised memory fills
    6x faster than a bytearray in a quiet microbenchmark, but two interleaved series of deployed 50M rounds showed
    no gain (1.35-1.86 s against 1.24-1.44 s, then 1.58-2.13 s against 1.74-2.09 s), and with the kernel's
    `defrag=madvise` a huge page can cost a synchronous compaction when memory is fragmented."""

    def __init__(self, spool_dir: Path | None = None, spool_above: int = 0) -> None:
        self._buf: bytearray | SpoolFile | None = None
        self._head: tuple[int, int, int] | None = None
        self._offset = 0
        self._next = 0
        self._spool_dir, self._spool_above = spool_dir, spool_above

    def spools(self, total: int) -> bool:
        """Whether a message of `total` bytes goes to disk rather than memory."""
        return self._spool_dir is not None and total > self._spool_above

    def feed(self, f: Frame) -> tuple[int, bytearray | SpoolFile] | None:
        """Add a chunk (its checksum was checked by `parse`); returns (message id, buffer) when the message is
        complete. The buffer is the caller's from then on (decode a bytearray with ``take=True``, map a
        SpoolFile)."""
        head = (f.msg_id, f.count, f.total)
        if self._buf is None:
            if f.index != 0:
                raise FrameError(f"message {f.msg_id} starts at chunk {f.index}, expected 0")
            if self._spool_dir is not None and self.spools(f.total):
                self._buf = SpoolFile(self._spool_dir, f.total)
            else:
                self._buf = bytearray(f.total)
            self._head, self._offset, self._next = head, 0, 0
        if head != self._head or f.index != self._next:
            raise FrameError("chunks arrived out of order or interleaved with another message")
        end = self._offset + len(f.payload)
        if end > f.total:
            raise FrameError(f"chunks carry more than the {f.total} bytes announced")
        if isinstance(self._buf, bytearray):
            self._buf[self._offset : end] = f.payload
        else:
            self._buf.write(f.payload)
        self._offset, self._next = end, self._next + 1
        if self._next < f.count:
            return None
        buf, self._buf = self._buf, None
        if end != f.total:
            raise FrameError(f"message {f.msg_id}: got {end} bytes, header announced {f.total}")
        return f.msg_id, buf

    def close(self) -> None:
        """Drop a message cut off mid-way (a spool file is deleted at once)."""
        if isinstance(self._buf, SpoolFile):
            self._buf.close()
        self._buf = None


def channel_options(fed: FederationConfig) -> list[tuple[str, int | str]]:
    limit = fed.settings.chunk_bytes + _SLACK
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 10_000),  # notice a vanished peer (NAT drop, cable pulled) within ~15 s
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ]


def coordinator_window(fed: FederationConfig) -> list[tuple[str, int | str]]:
    """The coordinator's receive window per client stream. gRPC sizes it by probing the link's bandwidth-delay
    product, which lets every client sending at once park tens of MiB in the coordinator; `receive_window_bytes`
    fixes it, bounding that to the window per client and capping each stream's rate at window / round-trip time.
    Clients keep the probed window: each receives from one coordinator."""
    fixed = fed.settings.receive_window_bytes
    return [] if fixed is None else [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", fixed)]


def server_credentials(fed: FederationConfig, me: PartyConfig) -> grpc.ServerCredentials:
    """TLS with the federation CA as the only root, and a client certificate required: no cert, or one from
    another CA, fails the handshake before any handler runs."""
    return grpc.ssl_server_credentials(
        [(read_pem(me.key, f"{me.name}'s key"), read_pem(me.cert, f"{me.name}'s certificate"))],
        root_certificates=read_pem(fed.ca_cert, "federation.ca_cert"),
        require_client_auth=True,
    )


def client_channel(fed: FederationConfig, me: PartyConfig) -> grpc.Channel:
    """A channel to the coordinator that verifies the coordinator's cert carries the coordinator's designated name
    (`certs.designated_name`), never just any SAN that happens to match its party name."""
    coord = fed.coordinator
    assert coord.address is not None  # validated in config
    creds = grpc.ssl_channel_credentials(
        root_certificates=read_pem(fed.ca_cert, "federation.ca_cert"),
        private_key=read_pem(me.key, f"{me.name}'s key"),
        certificate_chain=read_pem(me.cert, f"{me.name}'s certificate"),
    )
    options = [*channel_options(fed), ("grpc.ssl_target_name_override", designated_name(coord.name))]
    return grpc.secure_channel(coord.address, creds, options=options)
