"""Architecture references: how a bundle says which module to build, and how the loader builds it safely.

A spec is JSON: ``{"ref": "package.module:Class", "kwargs": {...}}`` for a class built from its constructor
kwargs, ``"modules": {arg: spec}`` for constructor arguments that are modules themselves (a fuse model's head),
and ``"children": [[name, spec], ...]`` for the containers ``nn.Sequential``, ``nn.ModuleList`` and
``nn.ModuleDict``. Kwargs come from, in order: the ``kwargs=`` given to save_bundle, the model's ``config``
attribute (a dict or dataclass, as on `tessera.core.models.MLP`), or, for ``torch.nn`` layers and tessera's own
modules only, the attributes they store their constructor arguments in.

Loading imports ``module`` only if it is on the allowlist (``tessera``, ``torch.nn``, plus what the caller
passes in ``allow=``) and only uses the attribute if it is an ``nn.Module`` class; nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from tessera.core.errors import ExportError

ALWAYS_ALLOWED = ("tessera", "torch.nn")
Spec = dict[str, Any]


def class_ref(cls: type) -> str:
    """`module:QualName` for an importable class, or ExportError naming why it cannot be imported later."""
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        where = "__main__" if cls.__module__ == "__main__" else "a function"
        raise ExportError(f"{cls.__qualname__} is defined in {where} and cannot be imported by whoever loads the "
                          "bundle; move the class to a module-level "
                          "definition in an importable module")
    return f"{cls.__module__}:{cls.__qualname__}"


def _jsonable(value: Any, *, what: str) -> Any:
    try:
        back = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{what} must be JSON (numbers, strings, lists, dicts): {exc}") from None
    return back


def _config_kwargs(module: nn.Module) -> dict[str, Any] | None:
    config = vars(module).get("config")  # the instance's own attribute, not one a wrapper forwards
    if isinstance(config, Mapping):
        return dict(config)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return None


def _introspect(module: nn.Module) -> Spec:
    """Constructor kwargs of a torch.nn or tessera module, read back from the attributes it stores them in.

    Module-valued arguments (a fuse model's `head`, a split model's `bases`) become nested specs.
    """
    cls = type(module)
    kwargs: dict[str, Any] = {}
    modules: dict[str, Spec] = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
            continue
        value = getattr(module, p.name, inspect.Parameter.empty)
        if p.name == "bias" and (value is None or isinstance(value, Tensor)):
            value = value is not None
        if isinstance(value, nn.Module):
            modules[p.name] = describe(value)
        elif value is inspect.Parameter.empty or isinstance(value, Tensor):
            if p.default is inspect.Parameter.empty:
                raise ExportError(f"cannot read constructor argument {p.name!r} of {cls.__name__}; pass "
                                  "save_bundle(..., kwargs=...) or load with load_bundle(path, model=...)")
        else:
            kwargs[p.name] = _jsonable(value, what=f"{cls.__name__}.{p.name}")
    return {"ref": class_ref(cls), "kwargs": kwargs, **({"modules": modules} if modules else {})}


def describe(module: nn.Module, *, arch: str | None = None, kwargs: Mapping[str, Any] | None = None) -> Spec:
    """The spec from which `build` recreates `module` (same class, same constructor kwargs, same children)."""
    ref = arch or class_ref(type(module))
    if kwargs is not None:
        return {"ref": ref, "kwargs": _jsonable(dict(kwargs), what="kwargs")}
    config = _config_kwargs(module)
    if config is not None:
        return {"ref": ref, "kwargs": _jsonable(config, what=f"{type(module).__name__}.config")}
    container = _container_for(type(module))
    if container is not None:
        return {"ref": ref, "kwargs": container.kwargs(module),
                "children": [[name, describe(child)] for name, child in module.named_children()]}
    if arch is None and type(module).__module__.startswith(("torch.nn.modules.", "tessera.")):
        return _introspect(module)
    raise ExportError(
        f"cannot record how to rebuild {type(module).__qualname__}: give it a `config` attribute holding its "
        "constructor kwargs (a dict or dataclass), or pass save_bundle(..., kwargs={...}); a bundle of a model "
        "that cannot be rebuilt can still be loaded with load_bundle(path, model=YourModel(...)) after "
        "save_bundle(..., rebuildable=False)")


def is_allowed(ref: str, allow: Sequence[str]) -> bool:
    module = ref.split(":", 1)[0]
    return any(entry in (ref, module) or module.startswith(entry + ".") for entry in (*ALWAYS_ALLOWED, *allow))


def resolve(ref: Any, allow: Sequence[str]) -> type[nn.Module]:
    """The nn.Module class named by `ref`, imported only if allowlisted."""
    if not (isinstance(ref, str) and ref.count(":") == 1 and all(ref.split(":"))):
        raise ExportError(f"architecture reference {ref!r} is not of the form 'package.module:Class'")
    if not is_allowed(ref, allow):
        raise ExportError(f"architecture {ref!r} is not on the allowlist {list(ALWAYS_ALLOWED) + list(allow)}; "
                          f"if you trust it, pass allow=[{ref.split(':')[0]!r}] (CLI: --allow)")
    module_name, qualname = ref.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ExportError(f"architecture {ref!r} cannot be found ({type(exc).__name__}: {exc}); install the "
                          "package that defines it, or load with load_bundle(path, model=...)") from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ExportError(f"architecture {ref!r} is not an nn.Module class; the manifest is corrupt or hostile")
    return obj


def build(spec: Any, allow: Sequence[str] = ()) -> nn.Module:
    """Construct the module a spec describes (weights uninitialised as far as the caller cares)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs", {}), dict):
        raise ExportError("architecture spec is malformed; the manifest is corrupt")
    cls = resolve(spec.get("ref"), allow)
    kwargs = dict(spec.get("kwargs") or {})
    if "children" in spec:
        container = _container_for(cls)
        if container is None or not isinstance(spec["children"], list):
            raise ExportError(f"{spec.get('ref')!r} is not a container tessera can assemble from children")
        children = OrderedDict((str(name), build(child, allow)) for name, child in spec["children"])
        return container.make(cls, children, kwargs)
    if cls.__module__.startswith("torch.nn.modules."):
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    modules = spec.get("modules") or {}
    if not isinstance(modules, dict):
        raise ExportError("architecture spec is malformed; the manifest is corrupt")
    try:
        return cls(**kwargs, **{str(k): build(v, allow) for k, v in modules.items()})
    except (TypeError, ValueError) as exc:
        raise ExportError(f"cannot build {spec.get('ref')} from the recorded kwargs: {exc}") from None


@dataclasses.dataclass(frozen=True)
class _Container:
    kwargs: Callable[[nn.Module], dict[str, Any]]
    make: Callable[[type[nn.Module], OrderedDict[str, nn.Module], dict[str, Any]], nn.Module]


_CONTAINERS: dict[str, _Container] = {
    "torch.nn.modules.container:Sequential": _Container(lambda m: {}, lambda c, ch, kw: nn.Sequential(ch)),
    "torch.nn.modules.container:ModuleList": _Container(lambda m: {}, lambda c, ch, kw: nn.ModuleList(ch.values())),
    "torch.nn.modules.container:ModuleDict": _Container(lambda m: {}, lambda c, ch, kw: nn.ModuleDict(ch)),
}


def _container_for(cls: type) -> _Container | None:
    return _CONTAINERS.get(f"{cls.__module__}:{cls.__qualname__}")
