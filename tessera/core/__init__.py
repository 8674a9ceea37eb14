"""Types, serde, errors, config, logging and metrics: what every other layer builds on."""

from tessera.core.errors import (
    ConfigError,
    ExportError,
    PrivacyBudgetExceeded,
    ProtocolError,
    RoundFailed,
    SerdeError,
    ShapeMismatch,
    TesseraError,
    TransportError,
)
from tessera.core.types import Metrics, Params, Scalar

__all__ = [
    "ConfigError", "ExportError", "Metrics", "Params", "PrivacyBudgetExceeded", "ProtocolError", "RoundFailed",
    "Scalar", "SerdeError", "ShapeMismatch", "TesseraError", "TransportError",
]
