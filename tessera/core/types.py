"""Params (the unit that crosses the wire) and the small pure helpers on it."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, TypeAlias

import numpy as np
import torch
from torch import nn

from tessera.core.errors import ConfigError, ShapeMismatch

Params: TypeAlias = dict[str, torch.Tensor]
Scalar: TypeAlias = bool | int | float | str
Metrics: TypeAlias = dict[str, float]


class OwnedParams(dict[str, torch.Tensor]):
    """Params whose tensors nothing else references (decoded by a transport into a buffer of its own): whoever
    consumes them may reuse their memory, e.g. a float32 running sum that starts as the first reply scaled in
    place instead of a new model-sized tensor. Tensors shared with anyone else must come in a plain dict.

    `release(key)`: the consumer has read that tensor for the last time and will not write it; params backed by
    a mapped file (`runtime.grpc.spool.MappedParams`) give its pages back, so a reply is never resident whole."""

    resident: ClassVar[bool] = True  # False: the tensors view a mapped file, to be read one at a time and released

    def release(self, key: str) -> None:
        """Nothing to give back for tensors in process memory (they go when the last reference does)."""


def get_params(model: nn.Module, *, copy: bool = True) -> Params:
    """A detached CPU copy of the model's state dict (parameters and buffers), in module order.

    `copy=False` returns the model's own CPU tensors (detached, no copy) for a caller that reads them before the
    model changes and keeps none of them (a clone, a checkpoint write, a hand-over that copies)."""
    return {k: v.detach().to("cpu", copy=copy) for k, v in model.state_dict().items()}


def set_params(model: nn.Module, params: Mapping[str, torch.Tensor], *, who: str = "global params") -> None:
    """Load `params` into `model` strictly, raising ShapeMismatch naming the first key that does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in params]
    extra = [k for k in params if k not in own]
    if missing or extra:
        raise ShapeMismatch(
            f"{who} do not match the model: missing {missing[:5]}, unexpected {extra[:5]}; "
            "build every party's model with the same model_fn"
        )
    for k, v in own.items():
        if tuple(v.shape) != tuple(params[k].shape):
            raise ShapeMismatch(
                f"{who}: '{k}' has shape {tuple(params[k].shape)} but the model expects {tuple(v.shape)}; "
                "build every party's model with the same model_fn"
            )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(params[k])


class ModuleFactory:
    """A picklable `model_fn` that rebuilds `model`'s structure without carrying its weights.

    Every tensor of the state dict is a meta tensor here (nothing to copy or ship: a Ray actor receives a few KB,
    not the model) and zeros in each module built; non-persistent buffers keep their values. For clients that load
    the global params into the model before using it, as `TaskClient` always does.
    """

    def __init__(self, model: nn.Module) -> None:
        persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
        memo: dict[int, Any] = {}
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for b in model.buffers():
            if id(b) in persistent:
                memo[id(b)] = torch.empty_like(b, device="meta")
        self.skeleton = copy.deepcopy(model, memo)
        self.extra = {n: b.detach().clone() for n, b in model.named_buffers() if id(b) not in persistent}
        first = next(iter(model.state_dict().values()), None)
        self.device = first.device if first is not None else torch.device("cpu")

    def __call__(self) -> nn.Module:
        model = copy.deepcopy(self.skeleton).to_empty(device=self.device)
        with torch.no_grad():
            for t in model.state_dict().values():
                t.zero_()
            for name, b in self.extra.items():
                model.get_buffer(name).copy_(b)
        return model


def check_compatible(
    reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], *, who: str
) -> None:
    """Raise ShapeMismatch unless `other` has exactly the keys, shapes and dtypes of `reference`."""
    if list(reference) != list(other):
        missing = [k for k in reference if k not in other]
        extra = [k for k in other if k not in reference]
        raise ShapeMismatch(
            f"{who}: keys differ from the global params (missing {missing[:5]}, unexpected {extra[:5]})")
    for k, ref in reference.items():
        t = other[k]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise ShapeMismatch(
                f"{who}: '{k}' is {t.dtype} {tuple(t.shape)}, expected {ref.dtype} {tuple(ref.shape)}"
            )


def is_finite(params: Mapping[str, torch.Tensor]) -> bool:
    """Whether no floating tensor holds a NaN or an Inf.

    One fused `torch._foreach_norm` over the floating tensors: a norm is finite only if every element is (a NaN
    or Inf term makes the sum of squares NaN or Inf), so finite norms prove the answer (6 us for a small model's
    reply, against 24 us for a check per tensor). Any non-finite norm, which may be a finite tensor whose norm
    overflows, gets the exact check tensor by tensor. Params that are not resident (a spooled reply's mapped
    file, `OwnedParams.resident`) are checked one tensor at a time, each released after its check."""
    if isinstance(params, OwnedParams) and not params.resident:
        return _each_finite(params, params.release)
    floats = [t for t in params.values() if t.is_floating_point()]
    return not floats or all(math.isfinite(n) for n in torch._foreach_norm(floats)) or _each_finite(params)


def _each_finite(params: Mapping[str, torch.Tensor], release: Callable[[str], None] | None = None) -> bool:
    """`is_finite` one tensor at a time, in one read of each and no temporary: a sum is finite only if every term
    is; a finite tensor whose sum overflows gets the elementwise check."""
    for k, t in params.items():
        if (t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.sum()))
                and not bool(torch.isfinite(t).all())):
            return False
        if release is not None:
            release(k)
    return True


def sub(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Params:
    return {k: a[k] - b[k] for k in a}


def add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Params:
    return {k: a[k] + b[k] for k in a}


def scale(a: Mapping[str, torch.Tensor], factor: float) -> Params:
    return {k: v * factor for k, v in a.items()}


def zeros_like(a: Mapping[str, torch.Tensor]) -> Params:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def l2_norm(a: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over the floating tensors of `a`, computed in float64."""
    total = sum(float(v.double().pow(2).sum()) for v in a.values() if v.is_floating_point())
    return math.sqrt(total)


def num_bytes(a: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in a)


def clone(a: Mapping[str, torch.Tensor]) -> Params:
    return {k: v.detach().clone() for k, v in a.items()}


def as_tensor(a: Any, *, what: str) -> torch.Tensor:
    """numpy arrays, torch tensors, pandas frames/series -> a tensor (float64 -> float32)."""
    if hasattr(a, "to_numpy"):
        a = a.to_numpy()
    if isinstance(a, np.ndarray):
        if a.dtype == object:
            raise ConfigError(f"{what}: object arrays cannot be trained on; convert columns to numbers first")
        a = torch.from_numpy(np.array(a, copy=True))  # own the memory: the caller may change its array
    if not isinstance(a, torch.Tensor):
        raise ConfigError(f"{what}: expected a numpy array, torch tensor or pandas frame, got {type(a).__name__}")
    return a.float() if a.dtype == torch.float64 else a
