"""Task: what a user writes to run their single-machine training federated.

A Task says how to build the model, how to train and evaluate it on a DataLoader, and which data a client holds.
`SupervisedTask` is the standard loop (loss, optimizer, epochs) so most users write no Task class at all.
"""

from __future__ import annotations

import enum
import functools
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from tessera.core.device import DeviceSpec, Placement, device_of, scalar, scaled_step
from tessera.core.types import Metrics, Params, get_params, set_params

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFn = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]


Loaders = tuple[DataLoader[Any], DataLoader[Any] | None]


class Task(Protocol):
    """What a user writes. `data_fn(client_id, round)` is called every round the client trains or evaluates, so
    data may change per round (a device that sees new readings each round); caching is the Task's choice.

    A task that also implements `SelectsParams` chooses which tensors travel (LoRA sends adapters only); otherwise
    the whole state dict does."""

    def model_fn(self) -> nn.Module: ...

    def data_fn(self, client_id: str, round: int) -> Loaders: ...

    def train(self, model: nn.Module, loader: DataLoader[Any], config: Mapping[str, Any]) -> Metrics: ...

    def evaluate(self, model: nn.Module, loader: DataLoader[Any]) -> tuple[float, Metrics]: ...


@runtime_checkable
class HasLoss(Protocol):
    """A Task that trains with a plain `loss_fn(outputs, targets)` (SupervisedTask, DPTask): the dry run before a
    client's first round checks that loss on one batch."""

    loss_fn: LossFn


@runtime_checkable
class Placed(Protocol):
    """A Task that trains on a chosen device and precision (SupervisedTask, LoRATask): plugins that run their own
    training loop (DP-SGD) read where and how."""

    placement: Placement


@runtime_checkable
class SelectsParams(Protocol):
    """A Task that chooses which tensors cross the wire (and how they load back)."""

    def get_params(self, model: nn.Module) -> Params: ...

    def set_params(self, model: nn.Module, params: Params) -> None: ...


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose argmax (or >0 for a single logit) equals the label."""
    if logits.ndim == 1 or logits.shape[-1] == 1:
        pred = (logits.reshape(-1) > 0).long()
    else:
        pred = logits.argmax(dim=-1)
    return float((pred == y.reshape(-1).long()).float().mean())


def _pairs(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and targets as float64 [rows, outputs] (a [N] target lines up with a [N, 1] output)."""
    p, t = pred.detach().double(), y.detach().double()
    return p.reshape(len(p), -1), t.reshape(len(t), -1)


def mse(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error over every output (sklearn.metrics.mean_squared_error)."""
    p, t = _pairs(pred, y)
    return float((p - t).pow(2).mean())


def mae(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Mean absolute error over every output (sklearn.metrics.mean_absolute_error)."""
    p, t = _pairs(pred, y)
    return float((p - t).abs().mean())


def r2(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Coefficient of determination, averaged over outputs (sklearn.metrics.r2_score, a constant target scores
    1.0 when predicted exactly and 0.0 otherwise, as sklearn does)."""
    p, t = _pairs(pred, y)
    ss_res = (t - p).pow(2).sum(0)
    ss_tot = (t - t.mean(0)).pow(2).sum(0)
    safe = torch.where(ss_tot > 0, ss_tot, torch.ones_like(ss_tot))
    score = torch.where(ss_tot > 0, 1 - ss_res / safe, (ss_res == 0).double())
    return float(score.mean())


class LossKind(enum.Enum):
    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    UNKNOWN = "unknown"


_LOSS_KINDS: dict[Any, LossKind] = {
    **dict.fromkeys((nn.CrossEntropyLoss, nn.NLLLoss, nn.BCEWithLogitsLoss, nn.BCELoss, F.cross_entropy, F.nll_loss,
                     F.binary_cross_entropy_with_logits, F.binary_cross_entropy), LossKind.CLASSIFICATION),
    **dict.fromkeys((nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, F.mse_loss, F.l1_loss, F.smooth_l1_loss,
                     F.huber_loss), LossKind.REGRESSION),
}


def loss_kind(loss_fn: Any) -> LossKind:
    """What a loss trains: a torch loss module (or subclass), a torch.nn.functional loss, or a partial of one."""
    fn = loss_fn.func if isinstance(loss_fn, functools.partial) else loss_fn
    for cls in type(fn).__mro__:
        if cls in _LOSS_KINDS:
            return _LOSS_KINDS[cls]
    return _LOSS_KINDS.get(fn, LossKind.UNKNOWN) if callable(fn) else LossKind.UNKNOWN


def default_metrics(loss_fn: Any) -> dict[str, MetricFn]:
    """Metrics that mean something for this loss: accuracy for classification, mse/mae/r2 for regression, none
    (the loss alone) for a loss tessera does not know; `metrics=` overrides the choice."""
    kind = loss_kind(loss_fn)
    if kind is LossKind.CLASSIFICATION:
        return {"accuracy": accuracy}
    if kind is LossKind.REGRESSION:
        return {"mse": mse, "mae": mae, "r2": r2}
    return {}


class SupervisedTask:
    """The standard supervised loop, configured per round by the strategy.

    Round config keys it honours: `local_epochs`, `max_steps` (stop after that many optimizer steps: deadline
    rounds), `proximal_mu` (FedProx: adds mu/2 ||w - w_global||^2), and `grad_correction` (a Params added to the
    gradients before every step: SCAFFOLD's c - c_i).

    `data_fn` is `(client_id, round) -> (train_loader, test_loader | None)`, called every round. A one-argument
    `data_fn(client_id)` declares data that never changes between rounds: its loaders are built once per client
    and cached (the `max_cached_clients` most recently used clients are kept).

    `device` ("auto", "cpu", "cuda", "cuda:N", "mps"; None leaves the model where model_fn built it) places each
    model once when it is built and every batch per step; `precision` "bf16"/"fp16" runs the forward pass under
    autocast (fp16 with a GradScaler). Parameters still cross the wire as CPU tensors (core.device).
    """

    def __init__(
        self,
        *,
        model_fn: Callable[[], nn.Module],
        loss_fn: LossFn,
        optimizer_fn: OptimizerFn,
        data_fn: Callable[[str, int], Loaders] | Callable[[str], Loaders],
        metrics: Mapping[str, MetricFn] | None = None,
        max_cached_clients: int = 10_000,
        device: DeviceSpec = None,
        precision: str = "32",
    ) -> None:
        self.placement = Placement.of(device, precision)
        self._model_fn = model_fn
        self.loss_fn = loss_fn
        self.optimizer_fn = optimizer_fn
        self._data_fn = data_fn
        self._per_round = _positional_arity(data_fn) >= 2
        self._cache: OrderedDict[str, Loaders] = OrderedDict()
        self._lock = threading.Lock()
        self.max_cached_clients = max_cached_clients
        self.metrics = dict(metrics) if metrics is not None else default_metrics(loss_fn)

    def model_fn(self) -> nn.Module:
        return self.placement.place(self._model_fn())

    def data_fn(self, client_id: str, round: int) -> Loaders:
        if self._per_round:
            return self._data_fn(client_id, round)  # type: ignore[call-arg]
        with self._lock:
            if client_id in self._cache:
                self._cache.move_to_end(client_id)
                return self._cache[client_id]
        loaders = self._data_fn(client_id)  # type: ignore[call-arg]
        with self._lock:
            self._cache[client_id] = loaders
            while len(self._cache) > self.max_cached_clients:
                self._cache.popitem(last=False)
        return loaders

    def __getstate__(self) -> dict[str, Any]:
        # Sent to Ray actors inside the client app: without the lock or the loaders cached here.
        state = dict(self.__dict__)
        state["_cache"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def train(self, model: nn.Module, loader: DataLoader[Any], config: Mapping[str, Any]) -> Metrics:
        epochs = int(config.get("local_epochs", 1))
        max_steps = int(config.get("max_steps", 0)) or None
        mu = float(config.get("proximal_mu", 0.0))
        correction: Mapping[str, torch.Tensor] | None = self.placement.move(config.get("grad_correction"))
        named = dict(model.named_parameters()) if mu > 0 or correction is not None else {}
        anchor = {k: p.detach().clone() for k, p in named.items()} if mu > 0 else None
        params = list(model.parameters())
        optimizer = self.optimizer_fn([p for p in params if p.requires_grad])
        place, scaler = self.placement, self.placement.scaler()
        moves, autocast = place.explicit, place.autocast()  # one context, entered once per step (it re-enters)
        plain = scaler is None and correction is None  # backward and step directly, no scaled_step around them
        _train_mode(model)
        loss_fn = self.loss_fn
        steps = 0
        # The loss metric is summed in float64 in step order. On the CPU each step's loss is read at once (no
        # device to wait for); elsewhere the losses are kept where they are and read once at the end (no host
        # sync per step). Both give the same bits (see _train_metrics).
        host = (params[0].device if params else device_of(model)).type == "cpu"  # device_of, from the list
        if plain and anchor is None and not moves and host and place.precision == "32":
            return _cpu_loop(model, loader, optimizer, loss_fn, epochs=epochs, max_steps=max_steps)
        total, count = 0.0, 0
        losses: list[torch.Tensor] = []
        sizes: list[int] = []
        for _ in range(epochs):
            for batch in loader:
                xb, yb = place.move(batch) if moves else batch
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss = loss_fn(model(xb), yb)
                objective = loss
                if anchor is not None:
                    prox = sum((named[k] - anchor[k]).pow(2).sum() for k in anchor)
                    objective = loss + 0.5 * mu * prox
                if plain:
                    objective.backward()  # type: ignore[no-untyped-call]
                    optimizer.step()
                else:
                    with scaled_step(scaler, optimizer, objective):
                        if correction is not None:
                            for k, p in named.items():
                                if p.grad is not None and k in correction:
                                    p.grad.add_(correction[k])
                steps += 1
                n = len(yb)
                if host:
                    total += loss.item() * n
                    count += n
                else:
                    losses.append(loss.detach())
                    sizes.append(n)
                if max_steps is not None and steps >= max_steps:
                    return _host_metrics(total, count, steps) if host else _train_metrics(losses, sizes)
        return _host_metrics(total, count, steps) if host else _train_metrics(losses, sizes)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader[Any]) -> tuple[float, Metrics]:
        model.eval()
        total, count = 0.0, 0
        outs, ys = [], []
        for batch in loader:
            xb, yb = self.placement.move(batch)
            with self.placement.autocast():
                out = model(xb)
                total += float(self.loss_fn(out, yb)) * len(yb)
            count += len(yb)
            outs.append(out if self.placement.precision == "32" else out.float())
            ys.append(yb)
        if count == 0:
            return float("nan"), {}
        logits, y = torch.cat(outs), torch.cat(ys)
        return total / count, {name: fn(logits, y) for name, fn in self.metrics.items()}


def _train_mode(model: nn.Module) -> None:
    """`model.train()`, skipped where it would change nothing: every module already in training mode and none
    overriding `train` (an override may do more than set the flag). The check reads a flag per module; `train()`
    sets one through `nn.Module.__setattr__`, a few times slower."""
    for m in model.modules():
        if not m.training or type(m).train is not _MODULE_TRAIN:
            model.train()
            return


_MODULE_TRAIN = nn.Module.train


def _cpu_loop(model: nn.Module, loader: DataLoader[Any], optimizer: torch.optim.Optimizer, loss_fn: LossFn, *,
              epochs: int, max_steps: int | None) -> Metrics:
    """`SupervisedTask.train`'s loop in its most common case (CPU, float32; no device moves, FedProx anchor,
    gradient correction or GradScaler): the same steps and the same loss bits, with nothing else per step (each
    statement in the loop runs after a step has evicted the interpreter's caches: a few cost microseconds)."""
    total, count, steps = 0.0, 0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            n = len(yb)
            total += loss.item() * n
            count += n
            steps += 1
            if steps == max_steps:
                return _host_metrics(total, count, steps)
    return _host_metrics(total, count, steps)


def _train_metrics(losses: list[torch.Tensor], sizes: list[int]) -> Metrics:
    """Mean loss per example over the steps: one host sync, then the float64 sum of loss * rows in step order
    (the same bits as a running float64 sum on the device)."""
    total = 0.0
    if losses:
        stacked = torch.stack(losses).double().reshape(-1)
        if stacked.device.type == "meta":
            total = scalar(stacked.sum())
        else:
            for value, n in zip(stacked.tolist(), sizes, strict=True):
                total += value * n
    return {"loss": total / max(sum(sizes), 1), "steps": float(len(losses))}


def _host_metrics(total: float, count: int, steps: int) -> Metrics:
    """_train_metrics of losses already read one by one: `total` is their float64 sum of loss * rows."""
    return {"loss": total / max(count, 1), "steps": float(steps)}


def _positional_arity(fn: Callable[..., Any]) -> int:
    """How many positional arguments `fn` accepts (a *args function counts as many)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume the current two-argument form
        return 2
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 2
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def task_get_params(task: Task, model: nn.Module) -> Params:
    return task.get_params(model) if isinstance(task, SelectsParams) else get_params(model)


def task_set_params(task: Task, model: nn.Module, params: Params) -> None:
    if isinstance(task, SelectsParams):
        task.set_params(model, params)
    else:
        set_params(model, params)
