"""The TesseraError hierarchy: every error a user or a peer can cause, each message naming the fix."""

from __future__ import annotations


class TesseraError(Exception):
    """Base of every error tessera raises on purpose (bad input, protocol violation, exhausted budget)."""


class ConfigError(TesseraError):
    """A job/federation file or an argument is invalid; the message names the key and the fix."""


class SerdeError(TesseraError):
    """Bytes that are not a valid tessera message (wrong magic, dtype, shape, size, or type)."""


class ProtocolError(TesseraError):
    """A peer sent a message out of stage, twice, or for the wrong round."""


class ShapeMismatch(TesseraError):
    """Tensors that must line up do not; the message names both shapes and who holds them."""


class RoundFailed(TesseraError):
    """Too few clients succeeded for the round to be aggregated."""


class PrivacyBudgetExceeded(TesseraError):
    """A DP step would push a party's epsilon above its budget; nothing was run."""


class ExportError(TesseraError):
    """A bundle cannot be written, loaded or verified (tampered, not allowlisted, wrong party)."""


class TransportError(TesseraError):
    """A network peer could not be reached or broke the channel."""
