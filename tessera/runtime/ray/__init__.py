"""Ray backend: many virtual clients on a bounded actor pool, on one machine or a cluster (see docs/scale.md)."""

from tessera.runtime.ray.backend import RayBackend, connect, ray_session
from tessera.runtime.ray.options import RayOptions

__all__ = ["RayBackend", "RayOptions", "connect", "ray_session"]
