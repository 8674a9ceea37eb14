"""CKKS homomorphic aggregation (placeholder, filled below)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tessera.horizontal.simulation import JobParts


@dataclass(frozen=True)
class CKKS:
    clip: float = 8.0
    max_weight: float = 10_000.0
    poly_modulus_degree: int = 8192
    scale_bits: int = 40

    def configure(self, parts: JobParts) -> None:
        raise NotImplementedError
