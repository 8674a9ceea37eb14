"""CKKS homomorphic aggregation in the horizontal round: the `CKKS` plugin, its client mod and `Aggregation`.

Trust model (vs SecAgg+): every client of a round holds the same secret key; the server holds only the public
context, sums ciphertexts, and asks one surviving client to decrypt the sum. Dropouts after encryption cost
nothing (no unmasking). But the server together with any one client can decrypt every update, and a client
asked to decrypt cannot tell a sum from a single update: an honest-but-curious server is assumed. SecAgg+
instead tolerates up to t - 1 colluding clients together with the server.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import tenseal as ts
import torch
from pydantic import Field

from tessera.core import serde
from tessera.core.config import PluginConfig
from tessera.core.errors import ConfigError, ProtocolError, RoundFailed
from tessera.core.types import Params
from tessera.horizontal.aggregation import FitOutcome
from tessera.horizontal.job import Contribution, Plugin
from tessera.runtime.backend import Backend, ClientFailure, FailureKind, InProcessBackend
from tessera.runtime.messages import FitIns
from tessera.secagg.ckks_protocol import (
    CKKSClientState,
    CKKSDecryptIns,
    CKKSDecryptRes,
    CKKSFitIns,
    CKKSFitRes,
    CKKSKeygenIns,
    CKKSKeygenRes,
    CKKSKeyRes,
    CKKSSetupIns,
    client_step,
    public_context,
)
from tessera.secagg.plus import flatten, mean_outcome, run_stage, settings_of, unflatten

if TYPE_CHECKING:
    from tessera.horizontal.client import CallNext, ClientContext
    from tessera.horizontal.job import JobParts
    from tessera.horizontal.strategies.base import Strategy

STATE_KEY = "secagg_ckks"


class CKKSSettings(PluginConfig):
    """CKKS's settings and their bounds: validates job.toml's `[secagg]` (kind = "ckks") and `CKKS(...)` alike."""

    SECTION: ClassVar[str] = "secagg"

    clip: float = Field(8.0, gt=0, allow_inf_nan=False)
    max_weight: float = Field(10_000.0, gt=0)
    poly_modulus_degree: Literal[8192, 16384] = 8192
    scale_bits: int = Field(40, ge=20, le=50)


@dataclass(frozen=True)
class CKKS(Plugin):
    """Homomorphic aggregation with CKKS (TenSEAL); see the module docstring for its trust model.

    >>> simulate(parts, rounds=10, plugins=[CKKS(clip=8.0)])
    """

    name = "ckks"

    clip: float = 8.0
    max_weight: float = 10_000.0
    poly_modulus_degree: int = 8192
    scale_bits: int = 40

    def __post_init__(self) -> None:
        CKKSSettings(**settings_of(self))  # the one validation, shared with job.toml's [secagg] kind = "ckks"

    def setup(self, rnd: int, clients: list[str], *, dim: int) -> CKKSSetupIns:
        if len(clients) < 2:
            raise ConfigError("secure aggregation needs at least 2 clients per round; raise strategy.min_fit_clients")
        return CKKSSetupIns(round=rnd, clients=tuple(clients), poly_modulus_degree=self.poly_modulus_degree,
                            scale_bits=self.scale_bits, clip=self.clip, max_weight=float(self.max_weight), dim=dim,
                            session=secrets.randbits(62))

    def contribute(self, parts: JobParts) -> Contribution:
        # The encrypting mod runs outermost: it encrypts what every other mod produced.
        return Contribution(plugin=self.name, roles=frozenset({"secure_aggregation"}),
                            aggregation=CKKSAggregation(self), outer_mods=(ckks_mod,), needs_mean_strategy=True)


class CKKSServer:
    """Runs the four CKKS stages; holds only the public context (`context.is_private()` is False).

    A malformed reply (wrong type or round, an undecodable context or ciphertext, the wrong number or size of
    ciphertexts, a wrong-shaped or non-finite decryption) is that client's failure, never the end of the round."""

    def __init__(self, setup: CKKSSetupIns) -> None:
        self.setup = setup
        self.context: ts.Context | None = None
        self.failures: dict[str, ClientFailure] = {}
        self.meta: dict[str, tuple[int, dict[str, float]]] = {}

    def _fail(self, client: str, why: str) -> None:
        self.failures[client] = ClientFailure(client, why, FailureKind.MALFORMED)

    def _reply(self, client: str, reply: Any, want: type) -> Any:
        if isinstance(reply, ClientFailure):
            self.failures[client] = reply
            return None
        if not isinstance(reply, want) or getattr(reply, "round", None) != self.setup.round:
            self._fail(client, f"{type(reply).__name__} is out of stage or for another round")
            return None
        return reply

    def _ciphertexts(self, client: str, res: CKKSFitRes) -> list[Any] | None:
        s = self.setup
        slots = s.poly_modulus_degree // 2
        sizes = [min(slots, s.dim - i) for i in range(0, s.dim, slots)]
        if len(res.chunks) != len(sizes):
            self._fail(client, f"{len(res.chunks)} ciphertexts, expected {len(sizes)}")
            return None
        try:
            cts = [ts.ckks_vector_from(self.context, b) for b in res.chunks]
        except Exception as exc:  # TenSEAL raises several unrelated types for garbage bytes
            self._fail(client, f"undecodable ciphertext ({type(exc).__name__})")
            return None
        if [v.size() for v in cts] != sizes:
            self._fail(client, "ciphertexts of the wrong length")
            return None
        return cts

    def _keygen(self, backend: Backend, pks: dict[str, bytes], timeout: float | None) -> tuple[str, CKKSKeygenRes]:
        s = self.setup
        for leader in pks:  # the first responder generates the key; if it vanishes or misbehaves, the next one does
            got = backend.exchange({leader: CKKSKeygenIns(s.round, pks)}, timeout=timeout)[leader]
            keygen = self._reply(leader, got, CKKSKeygenRes)
            if keygen is None:
                continue
            try:
                self.context = public_context(keygen.public_context)
            except ProtocolError as exc:
                self._fail(leader, str(exc))
                continue
            return leader, keygen
        raise RoundFailed(f"round {s.round}: the CKKS key ceremony failed (no key leader answered)")

    def run(self, backend: Backend, fit: dict[str, FitIns], *, timeout: float | None) -> tuple[np.ndarray, float]:
        s = self.setup
        replies = backend.exchange({c: s for c in s.clients}, timeout=timeout)
        pks = {c: r.pk for c, r in replies.items() if self._reply(c, r, CKKSKeyRes) is not None}
        if len(pks) < 2:
            raise RoundFailed(f"round {s.round}: {len(pks)} client(s) advertised a key; a sum needs 2")
        leader, keygen = self._keygen(backend, pks, timeout)
        asked = {c: CKKSFitIns(s.round, fit[c].params, dict(fit[c].config), leader, keygen.sealed.get(c, b""),
                               pks[leader]) for c in pks}
        total: list[Any] | None = None
        for c, r in backend.exchange(asked, timeout=timeout).items():
            res = self._reply(c, r, CKKSFitRes)
            cts = None if res is None else self._ciphertexts(c, res)
            if res is None or cts is None:
                continue
            try:
                total = cts if total is None else [a + b for a, b in zip(total, cts, strict=True)]
            except Exception as exc:  # a ciphertext at another scale or level
                self._fail(c, f"ciphertext does not add up ({type(exc).__name__})")
                continue
            self.meta[c] = (res.num_examples, dict(res.metrics))
        if total is None or len(self.meta) < 2:
            raise RoundFailed(f"round {s.round}: {len(self.meta)} encrypted update(s) arrived; a sum needs 2")
        blobs = [v.serialize() for v in total]
        for c in self.meta:  # any survivor can decrypt the sum; try them in turn
            dec = self._reply(c, backend.exchange({c: CKKSDecryptIns(s.round, blobs)}, timeout=timeout)[c],
                              CKKSDecryptRes)
            if dec is None:
                continue
            if tuple(dec.values.shape) != (s.dim,) or not bool(dec.values.isfinite().all()):
                self._fail(c, f"decryption of shape {tuple(dec.values.shape)}, expected ({s.dim},) finite values")
                continue
            vals = dec.values.double().numpy()
            return vals[:-1], float(vals[-1])
        raise RoundFailed(f"round {s.round}: no surviving client decrypted the sum")


def ckks_mod(msg: Any, ctx: ClientContext, call_next: CallNext) -> Any:
    """Client mod: key ceremony, encrypt the (weighted, clipped) update, decrypt the sum when asked."""
    return run_stage(msg, ctx, call_next, protocol="tessera.secagg.ckks_protocol", state_key=STATE_KEY,
                     state_type=CKKSClientState, transition=client_step, protect="encrypting")


class CKKSAggregation:
    def __init__(self, config: CKKS) -> None:
        self.config = config
        self.last: CKKSServer | None = None

    def run(self, rnd: int, plan: list[tuple[str, FitIns]], backend: Backend, strategy: Strategy,
            current: Params, *, timeout: float | None) -> FitOutcome:
        clients = [c for c, _ in plan]
        server = CKKSServer(self.config.setup(rnd, clients, dim=sum(t.numel() for t in current.values()) + 1))
        self.last = server
        values, weight = server.run(backend, dict(plan), timeout=timeout)
        return mean_outcome(rnd, strategy, current, meta=server.meta, failures=server.failures,
                            values=torch.from_numpy(values), weight=weight)


class _Parties:
    def __init__(self, updates: Sequence[Params], drop: Set[str]) -> None:
        self.updates = updates
        self.state: dict[str, bytes] = {}
        self.drop = drop

    def handle(self, client: str, msg: Any) -> Any:
        if client in self.drop and isinstance(msg, CKKSFitIns):
            raise ConnectionError("client went offline")
        raw = self.state.get(client)
        state = serde.decode_message(raw, expected=(CKKSClientState,)) if raw is not None else None
        update = self.updates[int(client.removeprefix("client"))]
        new, reply = client_step(state, msg, client, lambda m: (flatten(update), 1, {}))
        self.state[client] = serde.encode_message(new)
        return reply


def simulate_ckks_round(updates: Sequence[Params], *, dropouts: Set[int], clip: float = 8.0,
                        poly_modulus_degree: int = 8192) -> tuple[Params, CKKSServer, InProcessBackend]:
    """One CKKS round among in-process clients (those in `dropouts` vanish before encrypting); returns the
    decrypted SUM (float64) of the others' updates, the server (public context only) and the backend."""
    clients = [f"client{i}" for i in range(len(updates))]
    cfg = CKKS(clip=clip, max_weight=1.0, poly_modulus_degree=poly_modulus_degree)
    server = CKKSServer(cfg.setup(1, clients, dim=sum(t.numel() for t in updates[0].values()) + 1))
    backend = InProcessBackend(_Parties(updates, {clients[i] for i in dropouts}))
    values, _ = server.run(backend, {c: FitIns(round=1, params={}) for c in clients}, timeout=None)
    return unflatten(torch.from_numpy(values), updates[0]), server, backend
