"""Fixtures shared by the runtime tests."""

from pathlib import Path

import pytest

from tessera.runtime.grpc.certs import init_ca, issue


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A federation CA and certificates for server, alice, bob and carol (fresh per test module)."""
    d = tmp_path_factory.mktemp("certs")
    init_ca(d)
    for n in ("server", "alice", "bob", "carol"):
        issue(d, n)
    return d
