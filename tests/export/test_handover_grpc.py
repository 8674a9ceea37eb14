"""Hand-over over real loopback gRPC + mTLS: the receiving party drops out mid-transfer, rejoins, and it resumes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from tessera.core.errors import TransportError
from tessera.core.models import MLP
from tessera.export import BundleReceiver, save_bundle, send_bundle, verify_bundle
from tessera.export.handover import BundleChunk


class Dropping:
    """The receiving party's handler: a BundleReceiver that leaves the federation after `after` chunks."""

    def __init__(self, receiver: BundleReceiver, after: int) -> None:
        self.receiver, self.after, self.seen = receiver, after, 0
        self.party: Any = None

    def handle(self, client: str, msg: Any) -> Any:
        if isinstance(msg, BundleChunk):
            self.seen += 1
            if self.seen > self.after:
                self.party.stop()  # the connection goes down before this chunk is written
                raise ConnectionError("party went away")
        return self.receiver.handle(client, msg)


@pytest.mark.slow
def test_handover_over_grpc_resumes_after_the_receiver_rejoins(tmp_path: Path) -> None:
    from tessera.runtime.grpc import ClientParty, GrpcBackend
    from tessera.runtime.grpc.certs import init_ca, issue
    from tessera.runtime.grpc.config import build

    init_ca(tmp_path)
    for n in ("label", "serving"):
        issue(tmp_path, n)

    def fed(port: int) -> Any:
        parties = [{"name": "label", "role": "coordinator", "address": f"127.0.0.1:{port}"}, {"name": "serving"}]
        settings = {"ca_cert": "ca.crt", "certs_dir": ".", "chunk_bytes": 16384, "quorum_deadline_s": 20,
                    "rpc_deadline_s": 20, "retry": {"initial_backoff_s": 0.05, "max_attempts": 50}}
        return build({"federation": settings, "parties": parties}, source="test", base=tmp_path)

    src = save_bundle(MLP(32, 4, [256]), tmp_path / "bundle", example_inputs=torch.randn(4, 32))
    backend = GrpcBackend(fed(0), {"serving": "serving"}, min_clients=1)
    port = backend.listen()
    threads = []

    def join(handler: Any) -> ClientParty:
        party = ClientParty(fed(port), "serving", handler)
        t = threading.Thread(target=party.run, daemon=True)
        t.start()
        threads.append((party, t))
        assert backend.wait_for(["serving"], 20) == ["serving"]
        return party

    try:
        dropping = Dropping(BundleReceiver(tmp_path / "rx"), after=3)
        dropping.party = join(dropping)
        with pytest.raises(TransportError):
            send_bundle(backend, src, to="serving", chunk_bytes=8192, timeout=20)
        threads[0][1].join(10)
        join(BundleReceiver(tmp_path / "rx"))  # the party restarts with a fresh process-level receiver
        report = send_bundle(backend, src, to="serving", chunk_bytes=8192, timeout=20)
        assert report.resumed_bytes == 3 * 8192
        assert report.payload_bytes == report.total_bytes - 3 * 8192
        assert verify_bundle(tmp_path / "rx" / "bundle").exact
    finally:
        for party, _ in threads:
            party.stop()
        backend.close()
        for _, t in threads:
            t.join(10)
