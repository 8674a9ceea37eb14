"""PSI over loopback gRPC + mTLS, the party in its own thread: many chunked messages, the exact intersection."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tessera.runtime.grpc import ClientParty, GrpcBackend
from tessera.runtime.grpc.certs import init_ca, issue
from tessera.runtime.grpc.config import FederationConfig, build
from tessera.vertical.psi import PsiParty, lead

pytestmark = pytest.mark.slow


def _fed(certs: Path, port: int) -> FederationConfig:
    parties = [{"name": "server", "role": "coordinator", "address": f"127.0.0.1:{port}"}, {"name": "bob"}]
    fed = {"ca_cert": "ca.crt", "certs_dir": ".", "chunk_bytes": 16384, "quorum_deadline_s": 20,
           "rpc_deadline_s": 20, "retry": {"initial_backoff_s": 0.05, "max_attempts": 50}}
    return build({"federation": fed, "parties": parties}, source="test", base=certs)


def test_psi_over_grpc_streams_chunks_and_equals_the_set_intersection(tmp_path: Path) -> None:
    init_ca(tmp_path)
    for name in ("server", "bob"):
        issue(tmp_path, name)
    alice = [f"user-{i}" for i in range(3000)]
    bob_ids = [f"user-{i}" for i in range(2000, 4500)][::-1]
    backend = GrpcBackend(_fed(tmp_path, 0), {"bob": "bob"})
    port = backend.listen()
    bob = PsiParty("bob", bob_ids)
    client = ClientParty(_fed(tmp_path, port), "bob", bob)
    thread = threading.Thread(target=client.run, daemon=True)
    thread.start()
    try:
        backend.start(["bob"])
        rows = lead(alice, backend, ["bob"], chunk=512)  # 6 + 5 blinding and 2 alignment messages
    finally:
        backend.close()
        thread.join(20)
    assert not thread.is_alive() and bob.rows is not None
    assert [alice[i] for i in rows] == [bob_ids[i] for i in bob.rows]
    assert set(alice[i] for i in rows) == set(alice) & set(bob_ids) and len(rows) == 1000
    assert client.stats.requests == 1 + 6 + 5 + 2
