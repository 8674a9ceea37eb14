"""Bundle hand-over over a Backend: chunked, interrupted and resumed, hash-checked at the end."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from tessera.core.errors import ExportError, ProtocolError, TransportError
from tessera.core.models import MLP
from tessera.export import BundleReceiver, load_bundle, save_bundle, send_bundle, verify_bundle
from tessera.export.handover import INCOMING, BundleChunk, BundleOffer
from tessera.runtime.backend import ClientFailure, InProcessBackend
from tessera.runtime.messages import EvaluateIns, EvaluateRes

X = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
SMALL: dict[str, Path] = {}  # one small bundle shared by the property test's examples


class FlakyBackend:
    """InProcessBackend whose connection drops on chosen exchanges: before delivery, or after it (lost reply)."""

    def __init__(self, handler: Any, *, drop: set[int], lose_reply: bool = False) -> None:
        self.inner = InProcessBackend(handler)
        self.traffic = self.inner.traffic
        self.drop, self.lose_reply, self.calls = drop, lose_reply, 0

    def start(self, clients: list[str]) -> None:
        self.inner.start(clients)

    def exchange(self, requests: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        self.calls += 1
        if self.calls in self.drop:
            if self.lose_reply:
                self.inner.exchange(requests, timeout=timeout)
            return {c: ClientFailure(c, "TransportError: connection reset by peer") for c in requests}
        return self.inner.exchange(requests, timeout=timeout)

    def close(self) -> None:
        self.inner.close()


def bundle(tmp_path: Path, *, hidden: int = 256) -> Path:
    model = MLP(32, 4, [hidden])
    return save_bundle(model, tmp_path / "src" / "mlp", example_inputs=X)


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all((a / n).read_bytes() == (b / n).read_bytes()
                                                                  for n in names)


@pytest.mark.parametrize("lose_reply", [False, True], ids=["request-lost", "ack-lost"])
def test_interrupted_transfer_resumes_from_the_last_acknowledged_chunk(tmp_path: Path, lose_reply: bool) -> None:
    src = bundle(tmp_path)  # ~ 37 KB of weights
    chunk = 4096
    backend = FlakyBackend(BundleReceiver(tmp_path / "rx"), drop={5}, lose_reply=lose_reply)
    with pytest.raises(TransportError, match="resume from the last acknowledged chunk"):
        send_bundle(backend, src, to="serving", chunk_bytes=chunk)
    assert not (tmp_path / "rx" / "mlp").exists()  # nothing half-written where a reader would look
    report = send_bundle(backend, src, to="serving", chunk_bytes=chunk)
    # exchange 1 was the offer, 2-4 delivered chunks, 5 dropped (delivered too if only the ack was lost)
    assert report.resumed_bytes == chunk * (4 if lose_reply else 3)
    assert report.payload_bytes == report.total_bytes - report.resumed_bytes
    assert same_files(src, tmp_path / "rx" / "mlp")
    assert verify_bundle(tmp_path / "rx" / "mlp").exact
    again = send_bundle(backend, src, to="serving", chunk_bytes=chunk)
    assert again.chunks == 0 and again.resumed_bytes == again.total_bytes  # already there: nothing resent


def test_a_restarted_receiver_resumes_from_its_partial_files(tmp_path: Path) -> None:
    src = bundle(tmp_path)
    first = FlakyBackend(BundleReceiver(tmp_path / "rx"), drop={3})
    with pytest.raises(TransportError):
        send_bundle(first, src, to="serving", chunk_bytes=8192)
    fresh = InProcessBackend(BundleReceiver(tmp_path / "rx"))  # the receiving process restarted
    report = send_bundle(fresh, src, to="serving", chunk_bytes=8192)
    assert report.resumed_bytes == 8192 and same_files(src, tmp_path / "rx" / "mlp")


def test_a_corrupted_partial_copy_is_refused_at_the_end_and_discarded(tmp_path: Path) -> None:
    src = bundle(tmp_path)
    backend = FlakyBackend(BundleReceiver(tmp_path / "rx"), drop={4})
    with pytest.raises(TransportError):
        send_bundle(backend, src, to="serving", chunk_bytes=4096)
    (partial,) = (tmp_path / "rx" / INCOMING).glob("*/model.safetensors")
    data = bytearray(partial.read_bytes())
    data[100] ^= 0xFF  # a bit flipped on the receiver's disk
    partial.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"refused the bundle: hash mismatch on model.safetensors.*send again"):
        send_bundle(backend, src, to="serving", chunk_bytes=4096)
    assert not (tmp_path / "rx" / "mlp").exists() and not list((tmp_path / "rx" / INCOMING).iterdir())
    report = send_bundle(backend, src, to="serving", chunk_bytes=4096)
    assert report.resumed_bytes == 0 and same_files(src, tmp_path / "rx" / "mlp")


def test_zstd_chunks_shrink_a_compressible_bundle_and_arrive_intact(tmp_path: Path) -> None:
    model = nn.Linear(256, 64)
    with torch.no_grad():
        model.weight.mul_(torch.rand_like(model.weight) < 0.1)  # 90% zeros: pruned weights compress well
    src = save_bundle(model, tmp_path / "pruned", example_inputs=torch.randn(2, 256))
    backend = InProcessBackend(BundleReceiver(tmp_path / "rx"))
    plain = send_bundle(backend, src, to="s", name="plain", chunk_bytes=16384)
    packed = send_bundle(backend, src, to="s", name="packed", chunk_bytes=16384, compression="zstd")
    assert plain.payload_bytes == plain.total_bytes
    assert packed.payload_bytes < 0.5 * packed.total_bytes
    assert same_files(src, tmp_path / "rx" / "packed")
    assert torch.equal(load_bundle(tmp_path / "rx" / "packed").weight, model.weight)


def test_receiver_refuses_hostile_offers_and_chunks(tmp_path: Path) -> None:
    import zstandard

    rx = BundleReceiver(tmp_path / "rx", max_bundle_bytes=10_000)
    tid = "a" * 64
    with pytest.raises(ProtocolError, match="malformed"):
        rx.handle("x", BundleOffer(tid, "../escape", ["manifest.json"], [10], ["0" * 64], "none"))
    with pytest.raises(ProtocolError, match="exceeds"):
        rx.handle("x", BundleOffer(tid, "b", ["manifest.json"], [20_000], ["0" * 64], "none"))
    with pytest.raises(ProtocolError, match="sha256 digest"):
        rx.handle("x", BundleOffer("../../etc", "b", ["manifest.json"], [10], ["0" * 64], "none"))
    rx.handle("x", BundleOffer(tid, "b", ["manifest.json"], [100], ["0" * 64], "zstd"))
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 1_000_000)
    with pytest.raises(ProtocolError, match="not valid zstd within 100 bytes"):
        rx.handle("x", BundleChunk(tid, "manifest.json", 0, 100, True, bomb))
    with pytest.raises(ProtocolError, match="does not fit"):
        rx.handle("x", BundleChunk(tid, "manifest.json", 0, 200, False, b"\0" * 200))
    with pytest.raises(ProtocolError, match="only accepts bundle"):
        rx.handle("x", EvaluateIns(round=1, params={}))


def test_other_messages_reach_the_party_handler(tmp_path: Path) -> None:
    class Party:
        def handle(self, client: str, msg: Any) -> Any:
            return EvaluateRes(loss=0.5, num_examples=3)

    src = bundle(tmp_path, hidden=8)
    backend = InProcessBackend(BundleReceiver(tmp_path / "rx", fallback=Party()))
    assert backend.exchange({"p": EvaluateIns(round=1, params={})})["p"] == EvaluateRes(loss=0.5, num_examples=3)
    send_bundle(backend, src, to="p")
    assert same_files(src, tmp_path / "rx" / "mlp")


@pytest.mark.slow
def test_a_200_mb_bundle_survives_an_interrupted_connection(tmp_path: Path) -> None:
    with torch.device("meta"):
        model = nn.Linear(7168, 7168)  # 7168 * 7169 float32 = 205.6 MB
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        model.weight.normal_(0, 0.01)
        model.bias.zero_()
    src = save_bundle(model, tmp_path / "big", example_inputs=torch.randn(2, 7168))
    del model
    chunk = 16 * 1024**2
    backend = FlakyBackend(BundleReceiver(tmp_path / "rx"), drop={7})
    with pytest.raises(TransportError):
        send_bundle(backend, src, to="serving", chunk_bytes=chunk)
    report = send_bundle(backend, src, to="serving", chunk_bytes=chunk)
    assert report.total_bytes > 200e6
    assert report.resumed_bytes == 5 * chunk and report.payload_bytes == report.total_bytes - 5 * chunk
    assert verify_bundle(tmp_path / "rx" / "big").exact  # every sha256 and the reference outputs


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.integers(1000, 20000), drops=st.sets(st.integers(1, 40), max_size=4), lose_reply=st.booleans(),
       zstd=st.booleans())
def test_any_pattern_of_dropped_exchanges_converges_to_the_same_bytes(
        tmp_path: Path, chunk: int, drops: set[int], lose_reply: bool, zstd: bool) -> None:
    import tempfile

    src = SMALL.get("src")
    if src is None:
        SMALL["src"] = src = bundle(Path(tempfile.mkdtemp()), hidden=64)
    rx = Path(tempfile.mkdtemp(dir=tmp_path))
    backend = FlakyBackend(BundleReceiver(rx), drop=drops, lose_reply=lose_reply)
    for _ in range(len(drops) + 1):  # each drop costs at most one retry
        try:
            send_bundle(backend, src, to="s", chunk_bytes=chunk, compression="zstd" if zstd else None)
            break
        except TransportError:
            continue
    assert same_files(src, rx / "mlp")

