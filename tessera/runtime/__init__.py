"""Federation, roles, messages and backends (inprocess here; ray and grpc in their own modules)."""

from tessera.runtime.backend import Backend, ClientFailure, InProcessBackend, Traffic
from tessera.runtime.federation import Federation, Party, Role
from tessera.runtime.messages import ErrorRes, EvaluateIns, EvaluateRes, FitIns, FitRes

__all__ = [
    "Backend", "ClientFailure", "ErrorRes", "EvaluateIns", "EvaluateRes", "Federation", "FitIns", "FitRes",
    "InProcessBackend", "Party", "Role", "Traffic",
]
