"""Checks that turn a migration mistake into an error naming the fix before any round runs.

`dry_run` pushes one batch of a party's data through the model and the loss (nothing is trained, no parameter
or RNG state changes) and refuses what would otherwise fail in round 1 with a bare torch error, or worse, train
silently on the wrong objective: inputs the first layer cannot take, a regression loss that broadcasts a [N]
target against an [N, 1] output, labels beyond the model's class count, float labels for a classification loss.
`refuse_unknown` answers arguments spelled as in other frameworks (`epochs=`, `lr=`) with the tessera name.

>>> dry_run(nn.Linear(4, 1), loader, party="alice", loss_fn=nn.MSELoss())   # y of shape [N] -> ShapeMismatch
"""

from __future__ import annotations

import difflib
import functools
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tessera.core.errors import ConfigError, ShapeMismatch
from tessera.horizontal.task import LossFn, LossKind, loss_kind

_BINARY = (nn.BCEWithLogitsLoss, nn.BCELoss, F.binary_cross_entropy_with_logits, F.binary_cross_entropy)
_INTEGER = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})


@dataclass(frozen=True)
class DryRun:
    """What one batch looked like at a party (shapes without the data)."""

    party: str
    x_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    loss: float


def dry_run(target: Any, loader: Iterable[Any], *, party: str, loss_fn: LossFn | None = None,
            labels: torch.Tensor | None = None) -> DryRun | None:
    """Check one batch of `loader` through `target` (an nn.Module, or a Task: its `model_fn()` and `loss_fn`).

    `labels`, when given, are all of the party's labels for the class-count check (else the batch's). Raises
    ShapeMismatch / ConfigError naming `party` and both shapes; returns None for batches that are not `(x, y)`
    tensors (a custom Task's own format: nothing to compare).
    """
    with torch.random.fork_rng(devices=[]):  # a shuffled loader or model_fn must not move the training RNG
        model = target if isinstance(target, nn.Module) else target.model_fn()
        loss_fn = loss_fn if loss_fn is not None else getattr(target, "loss_fn", None)
        batch = next(iter(loader), None)
    if batch is None:
        raise ConfigError(f"party {party!r} has no training rows (its loader is empty); give it data or leave "
                          "it out of the federation")
    if not (isinstance(batch, (list, tuple)) and len(batch) == 2 and all(isinstance(b, torch.Tensor) for b in batch)):
        return None
    param = next(model.parameters(), None)
    xb, yb = (b.to(param.device) if param is not None else b for b in batch)
    key = _key(model, loss_fn, xb, yb)
    seen = _PASSED.get(key) if key is not None else None
    if seen is not None:  # this model already took such a batch: only the data-dependent checks remain
        _check_values(xb, yb, party)
        if loss_fn is not None:
            _check_targets(loss_fn, seen, yb, labels, party)
        return DryRun(party, tuple(xb.shape), tuple(seen.shape), tuple(yb.shape), float("nan"))
    out = _forward(model, xb, party)
    if loss_fn is None or not isinstance(out, torch.Tensor):
        return DryRun(party, tuple(xb.shape), tuple(getattr(out, "shape", ())), tuple(yb.shape), float("nan"))
    _check_targets(loss_fn, out, yb, labels, party)
    loss = _loss(loss_fn, out, yb, party)
    if key is not None:
        if len(_PASSED) >= 256:
            _PASSED.clear()
        _PASSED[key] = torch.empty(out.shape, dtype=out.dtype, device="meta")
    return DryRun(party, tuple(xb.shape), tuple(out.shape), tuple(yb.shape), loss)


# Batches that passed, by (model structure, loss, x and y shapes and dtypes) -> the model's output (shape only, on
# the meta device). Every party's batch of the same shapes through the same structure gives an output of the same
# shape, so the forward pass (a full model read: seconds for a large model) runs once per process, not per party;
# the checks that depend on the party's values (label range, NaN/inf) still run for each.
_PASSED: dict[tuple[Any, ...], torch.Tensor] = {}


def _key(model: nn.Module, loss_fn: Any, xb: torch.Tensor, yb: torch.Tensor) -> tuple[Any, ...] | None:
    structure: tuple[Any, ...] = tuple((n, tuple(p.shape), p.dtype, p.device) for n, p in model.named_parameters())
    structure += tuple((n, tuple(b.shape), b.dtype) for n, b in model.named_buffers())
    loss: Any = (type(loss_fn), repr(loss_fn)) if isinstance(loss_fn, nn.Module) else loss_fn
    try:
        hash(loss)
    except TypeError:
        return None
    return (type(model), structure, loss, tuple(xb.shape), xb.dtype, tuple(yb.shape), yb.dtype)


def _check_values(xb: torch.Tensor, yb: torch.Tensor, party: str) -> None:
    """The cached path's stand-in for the loss-is-finite check: a NaN/inf in this party's batch."""
    for name, t in (("x", xb), ("y", yb)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ConfigError(f"dry run, party {party!r}: {name} holds NaN/inf values on the first batch; clean "
                              "or impute them before training")


def _forward(model: nn.Module, xb: torch.Tensor, party: str) -> Any:
    was_training = model.training
    model.eval()  # no batch-norm statistics move, no dropout draws
    try:
        with torch.no_grad():
            return model(xb)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise _input_error(model, xb, party, exc) from exc
    finally:
        model.train(was_training)


def _input_error(model: nn.Module, xb: torch.Tensor, party: str, exc: Exception) -> Exception:
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd,
                                                                              nn.Embedding))), None)
    param = next(model.parameters(), None)
    where = f"dry run, party {party!r}: the model cannot take x of shape {list(xb.shape)} ({xb.dtype})"
    if param is not None and "dtype" in str(exc):
        return ConfigError(f"{where}: the model's parameters are {param.dtype}; convert x to {param.dtype} "
                           f"(numpy: x.astype(np.float32), torch: x.float()). torch said: {exc}")
    if first is None:
        return ShapeMismatch(f"{where}. torch said: {exc}")
    name, layer = first
    if isinstance(layer, nn.Linear):
        expects, fix = f"[..., {layer.in_features}] (in_features={layer.in_features})", \
            f"build it with in_features={xb.shape[-1]}"
    elif isinstance(layer, nn.Embedding):
        expects, fix = f"integer ids below {layer.num_embeddings}", "pass integer ids within the vocabulary"
    else:
        expects, fix = f"[N, {layer.in_channels}, ...] (in_channels={layer.in_channels})", \
            f"build it with in_channels={xb.shape[1] if xb.ndim > 1 else '?'}"
    label = f"{name!r} ({type(layer).__name__})" if name else f"({type(layer).__name__})"
    return ShapeMismatch(f"{where}: its first layer {label} expects {expects}. Give "
                         f"every party the columns the model was built for, or {fix}. torch said: {exc}")


def _check_targets(loss_fn: Any, out: torch.Tensor, y: torch.Tensor, labels: torch.Tensor | None,
                   party: str) -> None:
    kind, name = loss_kind(loss_fn), _name(loss_fn)
    shapes = f"model output {list(out.shape)} vs y {list(y.shape)}"
    where = f"dry run, party {party!r}"
    if kind is LossKind.REGRESSION and out.shape != y.shape:
        raise ShapeMismatch(f"{where}: {shapes}; {name} would broadcast them to {_broadcast(out, y)} and train "
                            f"on every pair of rows. {_reshape_hint(out, y)}")
    if kind is not LossKind.CLASSIFICATION:
        return
    fn = loss_fn.func if isinstance(loss_fn, functools.partial) else loss_fn
    binary = isinstance(fn, _BINARY[:2]) or fn in _BINARY[2:]
    every = (labels if labels is not None else y).detach()
    if binary:
        if out.shape != y.shape:
            raise ShapeMismatch(f"{where}: {shapes}; {name} needs one target per output. {_reshape_hint(out, y)}")
        if every.numel() and (every.min() < 0 or every.max() > 1):
            raise ShapeMismatch(f"{where}: labels reach {_item(every.max())} but {name} is binary (targets in "
                                f"[0, 1], one per output, model output {list(out.shape)}); for "
                                f"{_item(every.max()) + 1} classes use nn.CrossEntropyLoss and a model with that "
                                "many outputs")
        return
    if y.is_floating_point():
        if y.shape == out.shape:
            return  # class probabilities
        raise ConfigError(f"{where}: y has dtype {y.dtype} and shape {list(y.shape)} but {name} takes integer "
                          "class labels: pass y as int64 (numpy: y.astype(np.int64), torch: y.long())")
    want = (out.shape[0], *out.shape[2:]) if out.ndim > 1 else ()
    if tuple(y.shape) != want:
        hint = " (y.reshape(-1))" if y.numel() == out.shape[0] else ""
        raise ShapeMismatch(f"{where}: {shapes}; {name} needs y of shape {list(want)}{hint}")
    classes = out.shape[1] if out.ndim > 1 else 1
    if every.dtype in _INTEGER and every.numel():
        lo, hi = torch.aminmax(every)  # every label in range: so are those not ignored (one reduction, no mask)
        if int(lo) >= 0 and int(hi) < classes:
            return
    valid = every[every != getattr(fn, "ignore_index", -100)]
    if valid.numel() and (valid.min() < 0 or valid.max() >= classes):
        raise ShapeMismatch(f"{where}: labels run from {_item(valid.min())} to {_item(valid.max())} "
                            f"({_item(valid.max()) + 1} classes) but the model outputs {classes} logits per row "
                            f"(output {list(out.shape)}); build the model with {_item(valid.max()) + 1} outputs "
                            "or relabel to 0..classes-1")


def _loss(loss_fn: LossFn, out: torch.Tensor, y: torch.Tensor, party: str) -> float:
    where = f"dry run, party {party!r}: {_name(loss_fn)} on model output {list(out.shape)} ({out.dtype}) and y " \
        f"{list(y.shape)} ({y.dtype})"
    leaf = out.detach().requires_grad_()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = loss_fn(leaf, y)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise ConfigError(f"{where} returned {getattr(loss, 'shape', type(loss).__name__)}, not a scalar; "
                                  "use reduction='mean' (or 'sum')")
            torch.autograd.grad(loss, leaf)  # the loss's own backward: dtype mistakes show up here
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        error = ShapeMismatch if "size" in str(exc) or "shape" in str(exc) else ConfigError
        raise error(f"{where} fails: {exc}") from exc
    if any("target size" in str(w.message) for w in caught):  # a broadcasting loss tessera does not know by name
        raise ShapeMismatch(f"{where}: the shapes differ and the loss broadcasts them. {_reshape_hint(out, y)}")
    if not torch.isfinite(loss):
        raise ConfigError(f"{where} is {float(loss)} on the first batch: x or y hold NaN/inf values, or the "
                          "targets are outside the loss's range")
    return float(loss.detach())


def _name(loss_fn: Any) -> str:
    fn = loss_fn.func if isinstance(loss_fn, functools.partial) else loss_fn
    return type(fn).__name__ if isinstance(fn, nn.Module) else getattr(fn, "__name__", "loss_fn")


def _broadcast(out: torch.Tensor, y: torch.Tensor) -> str:
    try:
        return str(list(torch.broadcast_shapes(out.shape, y.shape)))  # type: ignore[no-untyped-call]
    except RuntimeError:
        return "shapes that do not line up"


def _reshape_hint(out: torch.Tensor, y: torch.Tensor) -> str:
    if out.numel() == y.numel():
        return f"Give y the output's shape: y.reshape({', '.join(['-1', *map(str, out.shape[1:])])})."
    return f"The model gives {out.shape[-1] if out.ndim else 1} output(s) per row: build it with one output per " \
        "target column."


def _item(t: torch.Tensor) -> int:
    return int(t.item())


# Arguments spelled as in Keras, SecretFlow, Flower or sklearn, and what tessera calls them (and where it goes).
_ROUNDS_OR_EPOCHS = ("did you mean rounds= (federated rounds) or local_epochs= (passes over local data per round)? "
                     "Both go to fit(...)")
FOREIGN: dict[str, str] = {
    **dict.fromkeys(("epochs", "epoch", "num_epochs", "n_epochs", "nb_epoch", "max_epochs"), _ROUNDS_OR_EPOCHS),
    **dict.fromkeys(("num_rounds", "n_rounds", "rounds_num", "global_rounds", "comm_rounds", "communication_rounds",
                     "num_round", "round"), "did you mean fit(rounds=...) (federated rounds)?"),
    **dict.fromkeys(("local_epoch", "client_epochs", "num_local_epochs", "local_ep", "aggregate_freq"),
                    "did you mean fit(local_epochs=...) (passes over local data per round)?"),
    **dict.fromkeys(("batchsize", "bs", "batch", "local_batch_size", "train_batch_size", "local_bs"),
                    "did you mean fit(batch_size=...)?"),
    **dict.fromkeys(("lr", "learning_rate", "momentum", "weight_decay", "optimizer", "optim", "opt"),
                    "the optimizer and its settings go in FLModel(optimizer_fn=...), a function of the parameters: "
                    "optimizer_fn=lambda params: torch.optim.SGD(params, lr=0.1)"),
    **dict.fromkeys(("validation_split", "val_split", "valid_split", "test_split"),
                    "tessera does not split for you: hold out rows per party and pass "
                    "fit(validation_data=([x_val_alice, ...], [y_val_alice, ...]))"),
    **dict.fromkeys(("val_data", "valid_data", "validation", "eval_data", "test_data", "validation_set"),
                    "did you mean fit(validation_data=...) (one list of x arrays and one of y arrays, per party)?"),
    **dict.fromkeys(("verbose", "callbacks", "progress_bar"), "did you mean fit(progress=True)?"),
    **dict.fromkeys(("loss", "criterion", "loss_func", "loss_function"), "did you mean FLModel(loss_fn=...)?"),
    **dict.fromkeys(("model_def", "model_fn", "net", "network", "module"),
                    "did you mean FLModel(model=...) (an nn.Module)?"),
    **dict.fromkeys(("device_list", "clients", "client_ids", "participants", "workers"),
                    "did you mean FLModel(parties=...) (one name per data holder)?"),
    **dict.fromkeys(("aggregator", "agg", "aggregation"), "did you mean FLModel(strategy=...) (e.g. FedAvg())?"),
    **dict.fromkeys(("secagg", "secure_agg", "secure_aggregator"), "did you mean FLModel(secure_aggregation=...)?"),
    **dict.fromkeys(("differential_privacy", "dp_strategy", "dp_spent_step_freq"), "did you mean FLModel(dp=...)?"),
    **dict.fromkeys(("random_seed", "random_state", "rng"), "did you mean FLModel(seed=...)?"),
    **dict.fromkeys(("log_dir", "logdir", "out_dir", "output", "save_dir"), "did you mean FLModel(output_dir=...)?"),
    **dict.fromkeys(("tensorboard", "mlflow", "logger", "tracking"),
                    "did you mean FLModel(loggers=['tensorboard']) (or 'mlflow')?"),
}


def refuse_unknown(where: str, unknown: Mapping[str, Any], known: Iterable[str]) -> None:
    """Raise a ConfigError for `unknown` keyword arguments, each with what tessera calls it."""
    if not unknown:
        return
    known = sorted(known)
    lines = []
    for name in unknown:
        hint = FOREIGN.get(name.lower())
        if hint is None:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            foreign = difflib.get_close_matches(name.lower(), list(FOREIGN), n=1, cutoff=0.8)
            hint = (f"did you mean {close[0]}=?" if close else FOREIGN[foreign[0]] if foreign
                    else f"it takes {', '.join(known)}")
        lines.append(f"{name}=: {hint}")
    raise ConfigError(f"{where} got unknown argument(s): " + "; ".join(lines))
