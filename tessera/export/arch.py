"""Architecture references: how a bundle says which module to build, and how the loader builds it safely.

A spec is JSON: ``{"ref": "package.module:Class", "kwargs": {...}}`` for a class built from its constructor
kwargs, ``"modules": {arg: spec}`` for constructor arguments that are modules themselves (a fuse model's head),
and ``"children": [[name, spec], ...]`` for the containers ``nn.Sequential``, ``nn.ModuleList`` and
``nn.ModuleDict``. Kwargs come from, in order: the ``kwargs=`` given to save_bundle, the model's ``config``
attribute (a dict or dataclass, as on `tessera.core.models.MLP`), the arguments `record_init` recorded, or, for
``torch.nn`` layers and tessera's own modules only, the attributes they store their constructor arguments in.

Loading imports ``module`` only if it is on the allowlist (``tessera``, ``torch.nn``, plus what the caller
passes in ``allow=``) and only uses the attribute if it is an ``nn.Module`` class whose own ``__module__`` and
``__qualname__`` are the ones named (so an allowlisted module cannot re-export a foreign class) and allowlisted
too. A class deriving from `Rebuildable` checks its kwargs against its bounds and the bundle's weight shapes
before it is constructed. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from torch import Tensor, nn

from tessera.core.errors import ExportError

ALWAYS_ALLOWED = ("tessera", "torch.nn")
MAX_SPEC_DEPTH = 32
Spec = dict[str, Any]
Shapes = Mapping[str, Sequence[int]]
M = TypeVar("M", bound=type[nn.Module])
_RECORDED = "_tessera_init"  # instance attribute: (class, kwargs) that record_init stored


class Rebuildable(nn.Module):
    """Base for modules whose constructor is costly or takes sizes a hostile manifest could inflate.

    `check_rebuild` runs before the loader constructs the class, with the manifest's kwargs and the shapes of
    the bundle's weights; it raises ExportError when the kwargs are out of bounds or do not match the weights.
    """

    # kwargs (as key paths into the kwargs) that hold file-system paths: save_bundle stores them relative to the
    # folder holding the bundle, and the loader resolves them against wherever the bundle is loaded from
    path_kwargs: ClassVar[tuple[tuple[str, ...], ...]] = ()

    @classmethod
    def check_rebuild(cls, kwargs: Mapping[str, Any], shapes: Shapes) -> None:
        """Raise ExportError if `kwargs` are outside this class's bounds or inconsistent with `shapes`."""


def _walk(kwargs: dict[str, Any], keys: Sequence[Any]) -> tuple[dict[str, Any], str] | None:
    node: Any = kwargs
    for k in keys[:-1]:
        node = node.get(k) if isinstance(node, dict) and isinstance(k, str) else None
    if isinstance(node, dict) and keys and isinstance(keys[-1], str) and isinstance(node.get(keys[-1]), str):
        return node, keys[-1]
    return None


def relativize(spec: Spec, module: nn.Module, folder: Path) -> Spec:
    """Rewrite the path kwargs a Rebuildable declares as paths relative to `folder` (where the bundle goes)."""
    if not isinstance(module, Rebuildable) or not module.path_kwargs:
        return spec
    kwargs = json.loads(json.dumps(spec["kwargs"]))
    done = []
    for keys in module.path_kwargs:
        hit = _walk(kwargs, keys)
        if hit is not None:
            node, last = hit
            node[last] = Path(os.path.relpath(Path(node[last]).resolve(), folder.resolve())).as_posix()
            done.append(list(keys))
    return {**spec, "kwargs": kwargs, **({"relative": done} if done else {})}


def _resolved_kwargs(spec: Spec, base_dir: Path | None) -> dict[str, Any]:
    kwargs = dict(spec.get("kwargs") or {})
    relative = spec.get("relative", [])
    if not isinstance(relative, list) or not all(isinstance(r, list) for r in relative):
        raise ExportError("architecture spec is malformed (relative); the manifest is corrupt")
    if relative and base_dir is not None:
        kwargs = json.loads(json.dumps(kwargs))
        for keys in relative:
            hit = _walk(kwargs, keys)
            if hit is not None and not Path(hit[0][hit[1]]).is_absolute():
                hit[0][hit[1]] = str(base_dir / hit[0][hit[1]])
    return kwargs


def check_bounds(kwargs: Mapping[str, Any], bounds: Mapping[str, tuple[int, int]], *, what: str) -> None:
    """Each integer kwarg named in `bounds` must be an int within its [low, high]; ExportError otherwise."""
    for key, (low, high) in bounds.items():
        value = kwargs.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ExportError(f"{what}: {key}={value!r} is outside [{low}, {high}]; the manifest is corrupt or "
                              "hostile (re-export the bundle)")


def record_init(cls: M) -> M:
    """Class decorator: remember the constructor arguments of each instance, so save_bundle can rebuild it.

    For a model class without a `config` attribute::

        @record_init
        class Net(nn.Module):
            def __init__(self, features: int, hidden: int = 32) -> None: ...

        save_bundle(Net(64, hidden=16), "bundle", example_inputs=x)   # manifest kwargs {"features": 64, "hidden": 16}

    Arguments must be JSON values or nn.Modules (recorded as nested specs); ``*args`` cannot be recorded. When a
    decorated class is subclassed, the subclass must be decorated too (else the export names the fix).
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ExportError("record_init decorates nn.Module classes")
    original = cls.__init__
    signature = inspect.signature(original)
    if any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()):
        raise ExportError(f"{cls.__qualname__}.__init__ takes *args, which cannot be recorded as keyword "
                          "arguments; give the class a `config` attribute instead")

    @functools.wraps(original)
    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        recorded: dict[str, Any] = {}
        for name, value in list(bound.arguments.items())[1:]:
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                recorded.update(value)
            else:
                recorded[name] = value
        object.__setattr__(self, _RECORDED, (cls, recorded))  # outermost __init__ finishes last and wins

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def _recorded_spec(module: nn.Module, ref: str) -> Spec | None:
    recorded = vars(module).get(_RECORDED)
    if recorded is None:
        return None
    owner, args = recorded
    if owner is not type(module):
        raise ExportError(f"{type(module).__qualname__} inherits @record_init from {owner.__qualname__} but is not "
                          "decorated itself, so its own constructor arguments are unknown; decorate "
                          f"{type(module).__qualname__} with @tessera.export.record_init too")
    kwargs: dict[str, Any] = {}
    modules: dict[str, Spec] = {}
    for name, value in args.items():
        if isinstance(value, nn.Module):
            modules[name] = describe(value)
        else:
            kwargs[name] = _jsonable(value, what=f"{type(module).__name__}.{name}")
    return {"ref": ref, "kwargs": kwargs, **({"modules": modules} if modules else {})}


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
    recorded = _recorded_spec(module, ref)
    if recorded is not None:
        return recorded
    container = _container_for(type(module))
    if container is not None:
        return {"ref": ref, "kwargs": container.kwargs(module),
                "children": [[name, describe(child)] for name, child in module.named_children()]}
    if arch is None and type(module).__module__.startswith(("torch.nn.modules.", "tessera.")):
        return _introspect(module)
    raise ExportError(
        f"cannot record how to rebuild {type(module).__qualname__}; choose one: decorate the class with "
        "@tessera.export.record_init (records its constructor arguments), give it a `config` attribute holding "
        "its constructor kwargs (a dict or dataclass), or pass save_bundle(..., kwargs={...}); a bundle of a "
        "model that cannot be rebuilt can still be loaded with load_bundle(path, model=YourModel(...)) after "
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
    if any(not part.isidentifier() or part.startswith("_") for part in qualname.split(".")):
        raise ExportError(f"architecture {ref!r} names a private or invalid attribute; the manifest is corrupt "
                          "or hostile")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ExportError(f"architecture {ref!r} cannot be found ({type(exc).__name__}: {exc}); install the "
                          "package that defines it, or load with load_bundle(path, model=...)") from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ExportError(f"architecture {ref!r} is not an nn.Module class; the manifest is corrupt or hostile")
    own = f"{obj.__module__}:{obj.__qualname__}"
    if own != ref or not is_allowed(own, allow):  # a re-export (module:other.path.Class) is not the class named
        raise ExportError(f"architecture {ref!r} resolves to {own}, which is not the class it names or not on "
                          "the allowlist; the manifest is corrupt or hostile (refs are written as the class's own "
                          "module:qualname)")
    return obj


def check(spec: Any, allow: Sequence[str], shapes: Shapes, *, base_dir: Path | None = None, prefix: str = "",
          depth: int = 0) -> None:
    """Validate a spec without constructing anything: form, allowlist, and each `Rebuildable`'s own bounds.

    `shapes` are the bundle's weight shapes; a Rebuildable sees those under its own prefix (names relative to it).
    """
    if depth > MAX_SPEC_DEPTH:
        raise ExportError(f"architecture spec is nested deeper than {MAX_SPEC_DEPTH}; the manifest is hostile")
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs", {}), dict) \
            or not set(spec) <= {"ref", "kwargs", "modules", "children", "relative"}:
        raise ExportError("architecture spec is malformed; the manifest is corrupt")
    cls = resolve(spec.get("ref"), allow)
    children = spec.get("children", [])
    modules = spec.get("modules", {})
    if not isinstance(modules, dict) or not isinstance(children, list) or not all(
            isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) for c in children):
        raise ExportError("architecture spec is malformed; the manifest is corrupt")
    if children and _container_for(cls) is None:
        raise ExportError(f"{spec.get('ref')!r} is not a container tessera can assemble from children")
    if issubclass(cls, Rebuildable):
        own = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
        cls.check_rebuild(_resolved_kwargs(spec, base_dir), own)
    for name, child in [*children, *modules.items()]:
        check(child, allow, shapes, base_dir=base_dir, prefix=f"{prefix}{name}.", depth=depth + 1)


def build(spec: Any, allow: Sequence[str] = (), *, shapes: Shapes | None = None,
          base_dir: Path | None = None) -> nn.Module:
    """Construct the module a spec describes (weights uninitialised as far as the caller cares).

    With `shapes` (the bundle's weight shapes) the whole spec is checked first (`check`), before any constructor.
    Relative path kwargs resolve against `base_dir` (the folder holding the bundle).
    """
    if shapes is not None:
        check(spec, allow, shapes, base_dir=base_dir)
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs", {}), dict):
        raise ExportError("architecture spec is malformed; the manifest is corrupt")
    cls = resolve(spec.get("ref"), allow)
    kwargs = _resolved_kwargs(spec, base_dir)
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
    except (TypeError, ValueError, OverflowError, KeyError, AttributeError, AssertionError) as exc:
        raise ExportError(f"cannot build {spec.get('ref')} from the recorded kwargs "
                          f"({type(exc).__name__}: {exc})"[:300]) from None


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
