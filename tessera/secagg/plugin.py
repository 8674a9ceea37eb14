"""`tessera.secagg.plugin(spec)`: one option surface for job.toml, FLModel and Python.

```toml
[secagg]                 # SecAgg+ (default kind)
threshold = 0.6
clip = 8.0
bits = 32

[secagg]                 # CKKS homomorphic aggregation (TenSEAL)
kind = "ckks"
```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tessera.core.config import validate
from tessera.core.errors import ConfigError
from tessera.horizontal.job import Plugin
from tessera.secagg.pki import PKI
from tessera.secagg.plus import SecAggPlus

_PLUS_NAMES = ("secagg+", "secagg", "secaggplus", "secagg_plus")


class _PlusSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["secagg+", "secagg", "secaggplus", "secagg_plus"] = "secagg+"
    threshold: float = Field(0.6, gt=0.5, le=1.0)
    clip: float = Field(8.0, gt=0)
    bits: int = Field(32, ge=8, le=62)
    max_weight: float = Field(10_000.0, gt=0)
    dropout: float = Field(0.3, ge=0, lt=1)
    degree: int | None = Field(None, ge=1)
    l2_clip: float | None = Field(None, gt=0)


class _CKKSSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["ckks"] = "ckks"
    clip: float = Field(8.0, gt=0)
    max_weight: float = Field(10_000.0, gt=0)
    poly_modulus_degree: Literal[8192, 16384] = 8192
    scale_bits: int = Field(40, ge=20, le=50)


def plugin(spec: Any, *, pki: PKI | None = None) -> Plugin:
    """A secure-aggregation plugin from "secagg+" | "ckks" | a `[secagg]` dict | a SecAggPlus/CKKS object.

    `pki`: the party keys SecAgg+ signs with (a deployed party passes `CertPKI`; default: a simulated PKI)."""
    from tessera.secagg.ckks import CKKS

    if isinstance(spec, Plugin):
        return spec
    if isinstance(spec, str):
        name = spec.strip().lower()
        if name in _PLUS_NAMES:
            return SecAggPlus() if pki is None else SecAggPlus(pki=pki)
        if name == "ckks":
            return CKKS()
        raise ConfigError(f"secure_aggregation: unknown kind {spec!r}; use 'secagg+' or 'ckks'")
    if isinstance(spec, Mapping):
        kind = str(spec.get("kind", "secagg+")).lower()
        if kind == "ckks":
            c = validate(_CKKSSpec, dict(spec), source="secagg")
            return CKKS(**c.model_dump(exclude={"kind"}))
        if kind not in _PLUS_NAMES:
            raise ConfigError(f"secagg.kind: unknown kind {kind!r}; use 'secagg+' or 'ckks'")
        p = validate(_PlusSpec, dict(spec), source="secagg")
        plus = SecAggPlus(**p.model_dump(exclude={"kind"}))
        return plus if pki is None else dataclasses.replace(plus, pki=pki)
    raise ConfigError(f"secure_aggregation: expected 'secagg+', 'ckks', a dict or a plugin object, "
                      f"got {type(spec).__name__}")
