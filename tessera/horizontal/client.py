"""The client side of a horizontal round: ClientApp dispatches messages through mods to a Task-driven client.

Mods are Flower-style middleware `(msg, ctx, call_next) -> reply` for cross-cutting concerns (secure aggregation
masking, client-level DP noise, update clipping). `ClientContext.state` is per-client state that outlives a round
(SCAFFOLD's control variate, a DP accountant); it must hold only serde-encodable values (tensors, numbers,
strings, maps, lists) because backends persist it between rounds and checkpoints carry it.
"""

from __future__ import annotations

import contextlib
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from tessera.core.errors import ProtocolError
from tessera.core.types import Params, get_params, set_params
from tessera.horizontal.checks import dry_run
from tessera.horizontal.task import HasLoss, SelectsParams, Task
from tessera.runtime.messages import EvaluateIns, EvaluateRes, FitIns, FitRes


@dataclass
class ClientContext:
    """`state` persists across rounds; `train_config` is filled by mods for this message only (e.g. SCAFFOLD's
    `grad_correction`) and merged into the config the Task trains with."""

    client: str
    state: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)


CallNext = Callable[[Any, ClientContext], Any]
Mod = Callable[[Any, ClientContext, CallNext], Any]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for a block and restore it after. (torch.manual_seed would also queue lazy
    CUDA/MTIA seeding, which formats a stack trace per call: ~8 ms, more than a small client's training.)"""
    saved = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(saved)


def client_seed(seed: int, rnd: int, client: str) -> int:
    """The seed a client trains with in a round: the same whichever backend or process runs it."""
    return int(np.random.SeedSequence([seed, rnd, zlib.crc32(client.encode())]).generate_state(1)[0])


class TaskClient:
    """Trains and evaluates a Task's model on one client's data; one model per thread, shared by clients.

    The client's data comes from `task.data_fn(client, round)` for every message (the Task decides what to cache).
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        # Protocol isinstance checks cost ~20 us each (typing walks the protocol's attributes): once, not per fit.
        self._selects = isinstance(task, SelectsParams)
        self._loss_fn = task.loss_fn if isinstance(task, HasLoss) else None
        self._local = threading.local()
        # Lent replies carry the model's own tensors (no copy): only for a transport that reads or copies them
        # before this thread's next message (the in-process backend turns it on; see runtime.backend).
        self.lend = False
        self._checked: set[str] = set()  # clients whose first batch passed the dry run
        self._lock = threading.Lock()

    def model(self) -> nn.Module:
        m = getattr(self._local, "model", None)
        if m is None:
            m = self._local.model = self.task.model_fn()
        return m

    def data(self, client: str, rnd: int) -> tuple[DataLoader[Any], DataLoader[Any] | None]:
        return self.task.data_fn(client, rnd)

    def _get(self, model: nn.Module) -> Params:
        """The model's params, sharing its memory unless the Task selects (and so builds) them itself."""
        return self.task.get_params(model) if self._selects else get_params(model, copy=False)  # type: ignore[attr-defined]

    def _set(self, model: nn.Module, params: Params) -> None:
        if self._selects:
            self.task.set_params(model, params)  # type: ignore[attr-defined]
            return
        # core.types.set_params only reads `params` (shape checks, copy_): received read-only tensors can skip
        # their per-op write check here (three Python hook calls per tensor per round otherwise).
        with torch._C.DisableTorchFunctionSubclass():
            set_params(model, params)

    def fit(self, ins: FitIns, ctx: ClientContext) -> FitRes:
        model = self.model()  # built once per thread; params are copied into it in place (copy_), never rebuilt
        self._set(model, ins.params)
        train, _ = self.data(ctx.client, ins.round)
        self._dry_run(model, train, ctx.client)
        config: dict[str, Any] = dict(ins.config)
        config.update(ctx.train_config)
        with seeded(int(config.get("seed", 0))):
            metrics = self.task.train(model, train, config)
        for p in model.parameters():  # the next fit starts from zero grads anyway: free them now, not later
            p.grad = None
        params = self._get(model)
        if not self.lend:  # the reply must outlive this model's next round: own its memory
            own = {v.untyped_storage().data_ptr() for v in model.state_dict().values()}
            params = {k: v.clone() if v.untyped_storage().data_ptr() in own else v for k, v in params.items()}
        return FitRes(params=params, num_examples=_size(train), metrics=dict(metrics))

    def _dry_run(self, model: nn.Module, train: DataLoader[Any], client: str) -> None:
        """Before a client's first round, one batch through the model and loss: a shape or dtype mistake is one
        error naming the client and both shapes (ShapeMismatch/ConfigError), not a traceback from round 1."""
        with self._lock:
            if client in self._checked:
                return
        dry_run(model, train, party=client, loss_fn=self._loss_fn)
        with self._lock:
            self._checked.add(client)

    def evaluate(self, ins: EvaluateIns, ctx: ClientContext) -> EvaluateRes:
        model = self.model()
        self._set(model, ins.params)
        _, test = self.data(ctx.client, ins.round)
        if test is None:
            raise ProtocolError(f"client {ctx.client} has no test data; set fraction_evaluate=0 or give test data")
        loss, metrics = self.task.evaluate(model, test)
        return EvaluateRes(loss=loss, num_examples=_size(test), metrics=dict(metrics))


def _size(loader: DataLoader[Any]) -> int:
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return sum(len(b[-1]) for b in loader)


class ClientApp:
    """Handles one message for one client: runs the mods, then dispatches Fit/Evaluate to the client."""

    def __init__(self, client: TaskClient, mods: Sequence[Mod] = ()) -> None:
        self.client = client
        self.mods = list(mods)
        self.contexts: dict[str, ClientContext] = {}

    def context(self, client: str) -> ClientContext:
        if client not in self.contexts:
            self.contexts[client] = ClientContext(client)
        return self.contexts[client]

    def _dispatch(self, msg: Any, ctx: ClientContext) -> Any:
        if isinstance(msg, FitIns):
            return self.client.fit(msg, ctx)
        if isinstance(msg, EvaluateIns):
            return self.client.evaluate(msg, ctx)
        raise ProtocolError(f"client {ctx.client} got an unexpected {type(msg).__name__}; no mod handles it")

    def handle(self, client: str, msg: Any) -> Any:
        ctx = self.context(client)
        ctx.train_config = {}
        call: CallNext = self._dispatch
        for mod in reversed(self.mods):
            call = _bind(mod, call)
        return call(msg, ctx)

    # runtime.LendingHandler: the in-process backend folds or copies each reply before the next message.
    def lend_replies(self, lend: bool) -> None:
        self.client.lend = lend

    # runtime.ClientStateHandler: a backend that serves any client from any worker (Ray) carries the state.
    def set_client_state(self, client: str, state: dict[str, Any]) -> None:
        self.contexts = {client: ClientContext(client, dict(state))}

    def take_client_state(self, client: str) -> dict[str, Any] | None:
        ctx = self.contexts.pop(client, None)
        self.contexts.clear()
        return ctx.state if ctx is not None else None

    # In simulation the server's checkpoint carries every client's context (see job.ClientStates).
    def state_dict(self) -> dict[str, Any]:
        return {c: ctx.state for c, ctx in self.contexts.items() if ctx.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.contexts = {c: ClientContext(c, dict(s)) for c, s in state.items()}


def _bind(mod: Mod, call_next: CallNext) -> CallNext:
    return lambda msg, ctx: mod(msg, ctx, call_next)
