"""Replies spooled to disk (`reply_spool_dir`): the same values as in memory, no memory budget held, every page of
a folded tensor handed back, nothing left open when a reply is cut off, and a bad folder refused up front.

Oracles: the float32 and float64 running sums of the spooled replies equal, bit for bit, the sums of the same
replies reassembled in memory; the kernel's own count of a mapping's resident pages (/proc/self/smaps) before and
after `release`; the open file descriptors of the process.
"""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from tessera.core.errors import ConfigError
from tessera.core.serde import decode_message, encode_message_parts
from tessera.core.types import is_finite
from tessera.horizontal.strategies.base import RunningMean
from tessera.runtime.grpc import GrpcBackend
from tessera.runtime.grpc import transport as tp
from tessera.runtime.grpc.spool import MappedParams, SpoolFile
from tessera.runtime.messages import FitIns, FitRes
from tests.runtime.test_grpc_backend import ROUTES, _fed, _federation, _raw_session

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


def _open_in(folder: Path) -> list[str]:
    """Files of `folder` this process holds open (an unlinked spool file still shows, as '... (deleted)')."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            out.append(target)
    return out


def _resident(addr: int) -> int:
    """Bytes of the mapping holding `addr` that are resident in this process, as the kernel counts them."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("address not mapped")


def _spooled(reply: FitRes, folder: Path, chunk: int = 1 << 16) -> MappedParams:
    """`reply` framed, reassembled through a spool file and decoded, as the coordinator does."""
    reasm = tp.Reassembler(folder, spool_above=0)
    done = None
    for raw in tp.split(7, encode_message_parts(reply), chunk):
        done = reasm.feed(tp.parse(raw, max_message_bytes=1 << 30, chunk_bytes=chunk))
    assert done is not None and isinstance(done[1], SpoolFile)
    mapping = done[1].mapped()
    msg = decode_message(memoryview(mapping), take=True)
    return MappedParams(msg.params, mapping)


@linux
def test_a_spooled_reply_is_resident_only_while_a_tensor_is_read(tmp_path: Path) -> None:
    """Validation and fold release each tensor after reading it: the kernel counts the reply's pages resident
    after a plain read, and (almost) none after `is_finite` and `RunningMean.add` are done with them."""
    g = torch.Generator().manual_seed(0)
    sent = {"a": torch.randn(1 << 20, generator=g), "b": torch.randn(3, 5, generator=g),
            "c": torch.randn(1 << 20, generator=g)}
    params = _spooled(FitRes(params=sent, num_examples=3), tmp_path)
    addr = params["a"].data_ptr()
    assert all(torch.equal(params[k], v) for k, v in sent.items())  # reads every page
    assert _resident(addr) >= 8 << 20
    assert is_finite(params)
    assert _resident(addr) <= 4 * os.sysconf("SC_PAGE_SIZE")  # pages shared with a neighbour stay
    assert all(torch.equal(params[k], v) for k, v in sent.items())  # a released page reads back from the file
    acc = RunningMean(torch.float64)
    acc.add({k: torch.zeros_like(v) for k, v in sent.items()}, 1.0)
    acc.add(params, 3.0)
    assert _resident(addr) <= 4 * os.sysconf("SC_PAGE_SIZE")
    assert all(torch.equal(acc.sums[k], v.double() * 3) for k, v in sent.items())
    del params
    assert _open_in(tmp_path) == []  # the file (unlinked from the start) goes with the last tensor viewing it


@linux
def test_an_adopted_spooled_tensor_becomes_private_memory_and_keeps_its_values(tmp_path: Path) -> None:
    """A float32 sum adopts the first reply's tensors in place (copy-on-write pages of the mapping); folding the
    next reply releases only that reply's pages, so the sum keeps every value it was given."""
    sent = [{"w": torch.full((1 << 20,), float(i + 1))} for i in range(2)]
    acc = RunningMean(torch.float32)
    acc.add(_spooled(FitRes(params=sent[0], num_examples=1), tmp_path), 2.0)
    acc.add(_spooled(FitRes(params=sent[1], num_examples=1), tmp_path), 1.0)
    assert torch.equal(acc.mean()["w"], torch.full((1 << 20,), (2.0 * 1 + 2.0) / 3.0))


def test_spooled_replies_hold_no_memory_budget_and_sum_to_the_same_bits(certs: Path, tmp_path: Path) -> None:
    """Replies larger than reply_buffer_bytes go to disk: the in-memory budget is never taken, they arrive as
    MappedParams, and float32 and float64 sums of them equal the sums of the same replies held in memory."""
    g = torch.Generator().manual_seed(1)
    ins = {c: FitIns(round=1, params={"w": torch.randn(300_000, generator=g), "b": torch.randn(7, generator=g)})
           for c in ("c0", "c1")}

    def sums(backend: GrpcBackend) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
        wide, narrow, kinds = RunningMean(torch.float64), RunningMean(torch.float32), []

        def fold(cid: str, reply: Any) -> Any:
            kinds.append(type(reply.params).__name__)
            wide.add(reply.params, reply.num_examples)
            narrow.add(reply.params, reply.num_examples)
            return cid

        for _ in range(2):  # one client at a time: a float32 sum's last bits depend on the order of the terms
            for c, req in ins.items():
                assert backend.exchange_each({c: req}, fold) == {c: c}
        return wide.sums, narrow.sums, kinds

    with _federation(certs, reply_buffer_bytes=1024, reply_spool_dir=str(tmp_path)) as (backend, _, _, _):
        spooled = sums(backend)
        assert backend.budget.peak == 0 and backend.budget.held == 0
    with _federation(certs) as (backend, _, _, _):
        held = sums(backend)
    assert spooled[2] == ["MappedParams"] * 4 and held[2] == ["OwnedParams"] * 4
    for a, b in zip(spooled[:2], held[:2], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    expected = sum((ins[c].params["w"] + 1).double() * n for c, n in (("c0", 1), ("c1", 2))) * 2
    assert torch.allclose(spooled[0]["w"], expected, rtol=0, atol=1e-9)
    if sys.platform.startswith("linux"):
        del spooled, a, b
        assert _open_in(tmp_path) == []  # every spooled reply's file went with its last tensor


@linux
def test_a_reply_cut_off_mid_way_leaves_no_spool_file_open(certs: Path, tmp_path: Path) -> None:
    with _federation(certs, reply_buffer_bytes=1024, reply_spool_dir=str(tmp_path)) as (backend, _, _, fed):
        payload = b"\x01" * 16384
        first = tp.HEADER.pack(tp.MAGIC, tp.Kind.DATA, 1, 0, 3, 40_000, zlib.crc32(payload)) + payload
        code = _raw_session(fed, certs, [tp.control(tp.Kind.HELLO, b"carol"), first])
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED)  # carol hung up mid-reply
        assert _open_in(tmp_path) == []
        replies = backend.exchange({"c0": FitIns(round=1, params={"w": torch.zeros(5000)})})
        assert isinstance(replies["c0"], FitRes) and torch.equal(replies["c0"].params["w"], torch.ones(5000))


def test_a_spool_folder_that_cannot_take_files_is_refused_before_any_round(certs: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"reply_spool_dir.*create the folder"):
        GrpcBackend(_fed(certs, reply_spool_dir=str(tmp_path / "missing")), dict(ROUTES))


def test_a_fixed_receive_window_turns_probing_off_and_still_carries_large_replies(certs: Path) -> None:
    """`receive_window_bytes` replaces gRPC's probed window by a fixed one (what bounds the stream buffers a busy
    coordinator holds per sending client); messages many windows long still cross intact."""
    fed = _fed(certs, receive_window_bytes=256 * 1024)
    assert tp.coordinator_window(fed) == [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 256 * 1024)]
    assert tp.coordinator_window(_fed(certs)) == []
    assert not any(k == "grpc.http2.bdp_probe" for k, _ in tp.channel_options(fed))  # clients keep probing
    with _federation(certs, receive_window_bytes=256 * 1024) as (backend, _, _, _):
        w = torch.arange(400_000, dtype=torch.float32)  # 1.6 MB: six windows
        reply = backend.exchange({"c0": FitIns(round=1, params={"w": w})})["c0"]
        assert isinstance(reply, FitRes) and torch.equal(reply.params["w"], w + 1)
    with pytest.raises(ConfigError, match="receive_window_bytes"):
        _fed(certs, receive_window_bytes=1024)
