"""gRPC + mutual TLS backend: one process per party, one bidirectional stream per client, chunked frames.

- `load_federation(path)`: validated federation.toml (`config.py`)
- `init_ca` / `issue`: the federation CA and party certificates (`certs.py`)
- `GrpcBackend`: the coordinator side of the Backend protocol (`backend.py`)
- `ClientParty`: a client's dial-serve-redial loop (`party.py`)
"""

from tessera.runtime.grpc.backend import GrpcBackend, Refusal
from tessera.runtime.grpc.certs import init_ca, issue
from tessera.runtime.grpc.config import FederationConfig, load_federation
from tessera.runtime.grpc.party import ClientParty, ClientStats

__all__ = ["ClientParty", "ClientStats", "FederationConfig", "GrpcBackend", "Refusal", "init_ca", "issue",
           "load_federation"]
