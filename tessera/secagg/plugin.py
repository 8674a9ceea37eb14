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
from typing import Any

from tessera.core.errors import ConfigError
from tessera.horizontal.job import Plugin
from tessera.secagg.pki import PKI
from tessera.secagg.plus import SecAggPlus, SecAggPlusSettings

_PLUS_NAMES = ("secagg+", "secagg", "secaggplus", "secagg_plus")


def plugin(spec: Any, *, pki: PKI | None = None) -> Plugin:
    """A secure-aggregation plugin from "secagg+" | "ckks" | a `[secagg]` dict | a SecAggPlus/CKKS object.

    `pki`: the party keys SecAgg+ signs with (a deployed party passes `CertPKI`; default: a simulated PKI)."""
    from tessera.secagg.ckks import CKKS, CKKSSettings

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
        rest = {k: v for k, v in spec.items() if k != "kind"}
        if kind == "ckks":
            return CKKS(**CKKSSettings(**rest).model_dump())
        if kind not in _PLUS_NAMES:
            raise ConfigError(f"secagg.kind: unknown kind {kind!r}; use 'secagg+' or 'ckks'")
        plus = SecAggPlus(**SecAggPlusSettings(**rest).model_dump())
        return plus if pki is None else dataclasses.replace(plus, pki=pki)
    raise ConfigError(f"secure_aggregation: expected 'secagg+', 'ckks', a dict or a plugin object, "
                      f"got {type(spec).__name__}")
