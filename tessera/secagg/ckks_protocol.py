"""CKKS homomorphic aggregation (TenSEAL): messages, the client's stage machine and the server's.

Stages, one `backend.exchange` each:
    SETUP    server -> CKKSSetupIns (round, participants, parameters)   client -> CKKSKeyRes (X25519 public key)
    KEYGEN   server -> CKKSKeygenIns (everyone's X25519 keys) to one client, the round's key leader
             leader -> CKKSKeygenRes (public context + the secret context sealed for each client with AEAD)
    FIT      server -> CKKSFitIns (FitIns + the client's sealed key)    client -> CKKSFitRes (ciphertext chunks)
    DECRYPT  server -> CKKSDecryptIns (the encrypted sum) to one survivor -> CKKSDecryptRes (the plain sum)
The key is fresh every round. The server only ever loads the public context, which cannot decrypt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tenseal as ts
import torch

from tessera.core import serde
from tessera.core.errors import ProtocolError
from tessera.core.serde import message
from tessera.core.types import Params, Scalar
from tessera.secagg import crypto

CKKS_INFO = b"tessera/secagg/ckks-key-transport"


@message
@dataclass(frozen=True)
class CKKSSetupIns:
    round: int
    clients: tuple[str, ...]
    poly_modulus_degree: int
    scale_bits: int
    clip: float
    max_weight: float
    dim: int
    session: int = 0  # fresh per attempt: an unfinished round may be restarted, never replayed


@message
@dataclass(frozen=True)
class CKKSKeyRes:
    round: int
    pk: bytes


@message
@dataclass(frozen=True)
class CKKSKeygenIns:
    round: int
    pks: dict[str, bytes]


@message
@dataclass(frozen=True)
class CKKSKeygenRes:
    round: int
    public_context: bytes
    sealed: dict[str, bytes]  # client -> AEAD(secret context) under X25519(leader, client)


@message
@dataclass(frozen=True)
class CKKSFitIns:
    round: int
    params: Params
    config: dict[str, Scalar] = field(default_factory=dict)
    leader: str = ""
    sealed_key: bytes = b""
    leader_pk: bytes = b""


@message
@dataclass(frozen=True)
class CKKSFitRes:
    round: int
    chunks: list[bytes]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@message
@dataclass(frozen=True)
class CKKSDecryptIns:
    round: int
    chunks: list[bytes]


@message
@dataclass(frozen=True)
class CKKSDecryptRes:
    round: int
    values: torch.Tensor


@message
@dataclass(frozen=True)
class CKKSClientState:
    round: int
    stage: str  # "keys" (advertised) -> "fit" (key received) -> "sent" (ciphertext sent)
    setup_blob: bytes
    sk: bytes
    secret_context: bytes = b""


def make_context(poly_modulus_degree: int, scale_bits: int) -> ts.Context:
    mid = [scale_bits] * (1 if poly_modulus_degree == 8192 else 2)
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=poly_modulus_degree,
                     coeff_mod_bit_sizes=[60, *mid, 60])
    ctx.global_scale = 2.0**scale_bits
    return ctx


def public_context(data: bytes) -> ts.Context:
    """Load a context the server may hold; refuses one that carries a secret key."""
    try:
        ctx = ts.context_from(data)
    except Exception as exc:  # TenSEAL raises several unrelated types
        raise ProtocolError(f"invalid CKKS context ({type(exc).__name__})") from None
    if ctx.is_private():
        raise ProtocolError("the key leader sent a CKKS context holding the secret key; refusing to keep it")
    return ctx


def _aad(rnd: int, leader: str, client: str) -> bytes:
    return serde.dumps(["tessera-ckks-key", rnd, leader, client])


def _setup(st: CKKSClientState) -> CKKSSetupIns:
    out = serde.decode_message(st.setup_blob, expected=(CKKSSetupIns,))
    assert isinstance(out, CKKSSetupIns)
    return out


def _expect(state: CKKSClientState | None, stage: str, msg: Any) -> CKKSClientState:
    if state is None or msg.round != state.round or state.stage != stage:
        raise ProtocolError(f"{type(msg).__name__} for round {msg.round} is out of stage or replayed")
    return state


def encrypt_vector(ctx: ts.Context, vector: np.ndarray, slots: int) -> list[bytes]:
    return [ts.ckks_vector(ctx, vector[i : i + slots].tolist()).serialize() for i in range(0, len(vector), slots)]


# train(request) -> (float64 update vector of length dim - 1, num_examples, metrics)
TrainFn = Callable[[CKKSFitIns], tuple[torch.Tensor, int, dict[str, float]]]


def client_step(state: CKKSClientState | None, msg: Any, me: str, train: TrainFn) -> tuple[CKKSClientState, Any]:
    if isinstance(msg, CKKSSetupIns):
        if state is not None and (state.round > msg.round or (state.round == msg.round and (
                state.stage == "done" or _setup(state).session == msg.session))):
            raise ProtocolError(f"CKKSSetupIns for round {msg.round} is stale or replayed")
        if me not in msg.clients:
            raise ProtocolError("CKKSSetupIns does not list this client")
        sk, pk = crypto.keypair()
        return CKKSClientState(msg.round, "keys", serde.encode_message(msg), sk), CKKSKeyRes(msg.round, pk)
    if isinstance(msg, CKKSKeygenIns):  # only the leader gets this
        st = _expect(state, "keys", msg)
        s = _setup(st)
        if msg.pks.get(me) != crypto.public_of(st.sk):
            raise ProtocolError("a key-generation request for a client that is not the round's key leader")
        ctx = make_context(s.poly_modulus_degree, s.scale_bits)
        secret = ctx.serialize(save_secret_key=True, save_relin_keys=False, save_galois_keys=False)
        sealed = {c: crypto.seal(crypto.agree(st.sk, pk, info=CKKS_INFO), secret, aad=_aad(s.round, me, c))
                  for c, pk in msg.pks.items() if c != me}
        ctx.make_context_public()
        pub = ctx.serialize(save_secret_key=False, save_relin_keys=False, save_galois_keys=False)
        new = dataclasses.replace(st, stage="fit", secret_context=secret)
        return new, CKKSKeygenRes(s.round, pub, sealed)
    if isinstance(msg, CKKSFitIns):
        st = state if state is not None and state.stage == "fit" else _expect(state, "keys", msg)
        s = _setup(st)
        # A client that led an abandoned key ceremony (the server replaced it) takes the new leader's key too.
        secret = st.secret_context if msg.leader == me and st.secret_context else crypto.open_sealed(
            crypto.agree(st.sk, msg.leader_pk, info=CKKS_INFO), msg.sealed_key, aad=_aad(s.round, msg.leader, me))
        vector, n, metrics = train(msg)
        w = min(float(n), s.max_weight) / s.max_weight
        flat = np.concatenate([w * vector.double().clamp(-s.clip, s.clip).numpy(), [w]])
        chunks = encrypt_vector(ts.context_from(secret), flat, s.poly_modulus_degree // 2)
        return dataclasses.replace(st, stage="sent", secret_context=secret), CKKSFitRes(s.round, chunks, n, metrics)
    if isinstance(msg, CKKSDecryptIns):
        st = _expect(state, "sent", msg)
        ctx = ts.context_from(st.secret_context)
        vals = np.concatenate([np.asarray(ts.ckks_vector_from(ctx, c).decrypt()) for c in msg.chunks])
        done = CKKSClientState(st.round, "done", st.setup_blob, b"")
        return done, CKKSDecryptRes(st.round, torch.from_numpy(vals[: _setup(st).dim].astype(np.float64)))
    raise ProtocolError(f"{type(msg).__name__} is not a CKKS aggregation message")
