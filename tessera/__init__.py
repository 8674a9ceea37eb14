"""tessera: privacy-preserving federated learning for PyTorch.

The top level exposes the two high-level entry points; everything else lives in its layer
(see DESIGN.md): tessera.horizontal, tessera.vertical, tessera.secagg, tessera.privacy, tessera.export, ...
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "FLModel": ("tessera.api", "FLModel"),
    "SLModel": ("tessera.api", "SLModel"),
}


def __getattr__(name: str) -> Any:
    # Lazy so `import tessera` stays cheap and does not pull in every layer (transformers, ray, grpc).
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'tessera' has no attribute {name!r}")


__all__ = ["FLModel", "SLModel", "__version__"]
