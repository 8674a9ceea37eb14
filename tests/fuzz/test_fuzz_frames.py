"""Fuzz gRPC frame parsing and reassembly with a fixed seed and budget: random headers, and valid frame streams
with frames edited, dropped, duplicated or reordered, each fed through parse -> Reassembler -> serde exactly as
the coordinator's reader does. Oracle: only TesseraError (FrameError is one) comes out."""

from __future__ import annotations

import zlib

import torch
from hypothesis import given
from hypothesis import strategies as st

from tessera.core import serde
from tessera.runtime.grpc import transport as tp
from tessera.runtime.messages import FitRes
from tests.fuzz.conftest import FUZZ, mutate, mutations, only_tessera_errors

LIMIT, CHUNK = 1 << 16, 1024
REPLY = serde.encode_message(FitRes(params={"w": torch.linspace(-3, 3, 700)}, num_examples=3, metrics={"loss": 0.1}))
FRAMES = list(tp.split(1, REPLY, CHUNK))


def _read(frames: list[bytes]) -> None:
    """The coordinator's reader: parse each frame, reassemble, decode every completed message in place."""
    r = tp.Reassembler()
    for raw in frames:
        frame = tp.parse(raw, max_message_bytes=LIMIT, chunk_bytes=CHUNK)
        if frame.kind is not tp.Kind.DATA:
            continue
        done = r.feed(frame)
        if done is not None:
            serde.decode_message(done[1], take=True)


headers = st.tuples(st.integers(0, 4), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                    st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.none() | st.integers(0, 2**32 - 1))


@FUZZ
@given(headers, st.binary(max_size=CHUNK + 8))
def test_fuzz_frame_headers(fields: tuple[int, int, int, int, int, int | None], payload: bytes) -> None:
    crc = zlib.crc32(payload) if fields[-1] is None else fields[-1]  # None: the right checksum, past that check
    raw = tp.HEADER.pack(tp.MAGIC, *fields[:-1], crc) + payload
    only_tessera_errors("grpc frame header", _read, [raw])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(FRAMES) - 1), mutations(max_ops=3), st.booleans()), min_size=1,
                max_size=len(FRAMES) + 3))
def test_fuzz_frame_streams(picks: list[tuple[int, list[tuple[int, int, int]], bool]]) -> None:
    frames = [mutate(FRAMES[i], ops) if edit else FRAMES[i] for i, ops, edit in picks]
    only_tessera_errors("grpc frame stream", _read, frames)


@FUZZ
@given(mutations(max_ops=4))
def test_fuzz_reassembled_payload(ops: list[tuple[int, int, int]]) -> None:
    """A peer that frames its own garbage: frames are valid, the message inside is not."""
    blob = mutate(REPLY, ops)
    frames = list(tp.split(1, blob, CHUNK)) if blob else []
    only_tessera_errors("grpc reassembled payload", _read, frames)
