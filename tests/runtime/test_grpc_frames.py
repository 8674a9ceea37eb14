"""Framing: split/reassemble round-trips exactly; every malformed, oversize, reordered or forged frame is refused."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.runtime.grpc import transport as tp

LIMIT, CHUNK = 10_000, 1024


def _roundtrip(blob: bytes, msg_id: int = 5) -> tuple[int, bytes]:
    r = tp.Reassembler()
    out = None
    for raw in tp.split(msg_id, blob, CHUNK):
        assert out is None, "completed before the last chunk"
        out = r.feed(tp.parse(raw, max_message_bytes=LIMIT, chunk_bytes=CHUNK))
    assert out is not None
    return out


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=1, max_size=5000))
def test_split_then_reassemble_gives_the_same_bytes(blob: bytes) -> None:
    frames = list(tp.split(9, blob, CHUNK))
    assert len(frames) == -(-len(blob) // CHUNK)  # ceil: chunk count is exactly what the size needs
    assert _roundtrip(blob, 9) == (9, blob)


def test_two_messages_back_to_back_on_one_stream() -> None:
    r = tp.Reassembler()
    got = []
    for i, blob in enumerate([b"a" * 3000, b"b" * 10]):
        for raw in tp.split(i + 1, blob, CHUNK):
            done = r.feed(tp.parse(raw, max_message_bytes=LIMIT, chunk_bytes=CHUNK))
            if done:
                got.append(done)
    assert got == [(1, b"a" * 3000), (2, b"b" * 10)]


def _frames(blob: bytes) -> list[bytes]:
    return list(tp.split(1, blob, CHUNK))


def _feed_all(frames: list[bytes]) -> None:
    r = tp.Reassembler()
    for raw in frames:
        r.feed(tp.parse(raw, max_message_bytes=LIMIT, chunk_bytes=CHUNK))


def test_flipped_payload_byte_fails_the_checksum() -> None:
    frames = _frames(bytes(3000))
    frames[1] = frames[1][:-1] + b"\x01"
    with pytest.raises(tp.FrameError, match="checksum mismatch"):
        _feed_all(frames)


def test_a_frame_of_the_previous_format_names_the_version() -> None:
    old = b"TSF1" + bytes(60)
    with pytest.raises(tp.FrameError, match="same version everywhere"):
        tp.parse(old, max_message_bytes=LIMIT, chunk_bytes=CHUNK)


def test_out_of_order_and_interleaved_chunks_are_refused() -> None:
    frames = _frames(bytes(3000))
    with pytest.raises(tp.FrameError, match="starts at chunk 1"):
        _feed_all([frames[1]])
    with pytest.raises(tp.FrameError, match="out of order"):
        _feed_all([frames[0], frames[2]])
    other = list(tp.split(2, bytes(3000), CHUNK))
    with pytest.raises(tp.FrameError, match="interleaved"):
        _feed_all([frames[0], other[0]])


def test_a_header_lying_about_the_total_is_refused() -> None:
    blob = bytes(100)
    short = tp.HEADER.pack(tp.MAGIC, tp.Kind.DATA, 1, 0, 1, 200, zlib.crc32(blob)) + blob  # says 200, carries 100
    with pytest.raises(tp.FrameError, match="announced 200"):
        _feed_all([short])
    long = tp.HEADER.pack(tp.MAGIC, tp.Kind.DATA, 1, 0, 2, 50, zlib.crc32(blob)) + blob  # says 50, first chunk has 100
    with pytest.raises(tp.FrameError, match="more than the 50"):
        _feed_all([long])


@pytest.mark.parametrize(("raw", "match"), [
    (b"short", "shorter than its header"),
    (b"XXXX" + bytes(tp.HEADER.size), "bad frame magic"),
    (tp.HEADER.pack(tp.MAGIC, 9, 1, 0, 1, 1, 0) + b"x", "unknown frame kind"),
    (tp.HEADER.pack(tp.MAGIC, tp.Kind.DATA, 1, 3, 2, 1, 0) + b"x", "inconsistent"),
    (tp.HEADER.pack(tp.MAGIC, tp.Kind.DATA, 1, 0, 1, 0, 0), "inconsistent"),
    (tp.HEADER.pack(tp.MAGIC, tp.Kind.WELCOME, 0, 0, 0, 5, 0) + b"x", "malformed control"),
])
def test_malformed_frames_are_refused(raw: bytes, match: str) -> None:
    with pytest.raises(tp.FrameError, match=match) as info:
        tp.parse(raw, max_message_bytes=LIMIT, chunk_bytes=CHUNK)
    assert not info.value.oversize


def test_oversize_message_and_chunk_are_refused_before_allocation() -> None:
    huge = tp.HEADER.pack(tp.MAGIC, tp.Kind.DATA, 1, 0, 1, LIMIT + 1, 0) + b"x"
    with pytest.raises(tp.OversizeError, match="max_message_bytes"):
        tp.parse(huge, max_message_bytes=LIMIT, chunk_bytes=CHUNK)
    fat = tp.HEADER.pack(tp.MAGIC, tp.Kind.DATA, 1, 0, 1, CHUNK + 1, 0) + bytes(CHUNK + 1)
    with pytest.raises(tp.OversizeError, match="chunk_bytes"):
        tp.parse(fat, max_message_bytes=LIMIT, chunk_bytes=CHUNK)


def test_control_frames_round_trip() -> None:
    f = tp.parse(tp.control(tp.Kind.WELCOME, b"client0"), max_message_bytes=LIMIT, chunk_bytes=CHUNK)
    assert (f.kind, f.payload) == (tp.Kind.WELCOME, b"client0")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=5).filter(any))
def test_frames_from_buffers_equal_frames_from_the_joined_message(parts: list[bytes]) -> None:
    joined = b"".join(parts)
    assert list(tp.split(4, [memoryview(p) for p in parts], CHUNK)) == list(tp.split(4, joined, CHUNK))
    assert _roundtrip(joined, 4) == (4, joined)


def test_frames_are_made_as_they_are_sent() -> None:
    blob = bytearray(5 * CHUNK)
    frames = tp.split(1, [blob], CHUNK)  # nothing is read or copied yet: no pass over the message up front
    first = next(frames)
    blob[-1] = 1  # only the frames made so far exist: the last one, made now, carries the change
    r = tp.Reassembler()
    out = [r.feed(tp.parse(raw, max_message_bytes=LIMIT, chunk_bytes=CHUNK)) for raw in [first, *frames]]
    assert out[-1] is not None and out[-1][1][-1] == 1 and sum(out[-1][1]) == 1


def test_the_reassembled_buffer_is_handed_over_not_copied() -> None:
    r = tp.Reassembler()
    out = None
    for raw in tp.split(2, b"xyz" * 1000, CHUNK):
        out = r.feed(tp.parse(raw, max_message_bytes=LIMIT, chunk_bytes=CHUNK))
    assert out is not None and isinstance(out[1], bytearray) and out[1] == b"xyz" * 1000


def test_the_ceiling_follows_the_model_unless_fixed() -> None:
    assert tp.ceiling(5000, largest_sent=10**9) == (5000, tp.ceiling(5000, largest_sent=None)[1])
    assert tp.ceiling(None, largest_sent=0)[0] == tp.AUTO_FLOOR
    model = 3 * 1024**3  # a 3 GiB model: replies up to 4x it are accepted, nothing is capped at 2 GiB
    limit, why = tp.ceiling(None, largest_sent=model)
    assert limit == tp.REPLY_FACTOR * model and "follows the model" in why
    assert tp.ceiling(None, largest_sent=None)[0] == tp.physical_memory()
    declared = tp.HEADER.pack(tp.MAGIC, tp.Kind.DATA, 1, 0, 2**20, limit + 1, 0) + b"x"
    with pytest.raises(tp.OversizeError, match="follows the model"):
        tp.parse(declared, max_message_bytes=limit, chunk_bytes=CHUNK, ceiling_reason=why)
