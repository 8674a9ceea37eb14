"""The SecAgg+ wire messages and the client's per-round state: frozen dataclasses registered with `@message`.

Stages (Bonawitz et al. 2017, with Bell et al. 2020's sparse graph and malicious-server variant), one
`backend.exchange` each:
    SETUP        server -> SetupIns (public round config)       client -> KeysRes (two X25519 keys, signed)
    SHARE_KEYS   server -> ShareKeysIns (neighbours' signed keys) client -> ShareKeysRes (sealed Shamir shares)
    COLLECT      server -> MaskedInputIns (FitIns + its shares)  client -> MaskedInputRes (masked update)
    CONSISTENCY  server -> ConsistencyIns (survivors, dropped)   client -> ConsistencyRes (its signature on them)
    UNMASK       server -> UnmaskIns (the same + neighbours' signatures)
                                                                client -> UnmaskRes (shares of b_u / of s_u^SK)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from tessera.core import serde
from tessera.core.serde import decode_message, message
from tessera.core.types import Params, Scalar


class Stage(StrEnum):
    SETUP = "setup"
    SHARE_KEYS = "share_keys"
    COLLECT = "collect"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"


STAGES = (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT, Stage.CONSISTENCY, Stage.UNMASK)


@message
@dataclass(frozen=True)
class SetupIns:
    """The public configuration of one secure-aggregation round (identical for every client)."""

    round: int
    clients: tuple[str, ...]  # everyone asked to take part; Shamir x coordinate = position + 1
    threshold: int  # shares needed to reconstruct a secret
    degree: int  # neighbours per client in the SecAgg+ graph
    graph_seed: int
    bits: int
    clip: float
    levels: int
    max_weight: float
    dim: int  # masked vector length (update coordinates + 1 weight coordinate)
    session: int = 0  # fresh per attempt: a coordinator may restart an abandoned round, never replay one
    l2_clip: float = 0.0  # > 0: honest clients scale their update to this L2 norm first (unverifiable once masked)
    prg: str = "chacha20"  # the mask PRG every party of the round expands ("aes-128-ctr" | "chacha20")


@message
@dataclass(frozen=True)
class KeysRes:
    round: int
    c_pk: bytes  # X25519 public key for share encryption
    s_pk: bytes  # X25519 public key for pairwise mask agreement
    sig: bytes = b""  # the party's signature over `keys_statement` (the coordinator cannot swap the keys)
    cert: bytes = b""  # what proves the signing key is the party's (its certificate in deployments; PKI.credential)


@message
@dataclass(frozen=True)
class ShareKeysIns:
    """The public keys of the client's neighbours that advertised (and the client's own, to check the server)."""

    round: int
    c_pks: dict[str, bytes]
    s_pks: dict[str, bytes]
    sigs: dict[str, bytes] = field(default_factory=dict)  # each neighbour's KeysRes.sig
    certs: dict[str, bytes] = field(default_factory=dict)  # each neighbour's KeysRes.cert


@message
@dataclass(frozen=True)
class ShareKeysRes:
    round: int
    shares: dict[str, bytes]  # receiver -> AEAD-sealed shares of this client's b_u and s_u^SK


@message
@dataclass(frozen=True)
class MaskedInputIns:
    """The fit request of the round plus the sealed shares other clients addressed to this one."""

    round: int
    params: Params
    config: dict[str, Scalar] = field(default_factory=dict)
    shares: dict[str, bytes] = field(default_factory=dict)  # sender -> sealed shares


@message
@dataclass(frozen=True)
class MaskedInputRes:
    round: int
    masked: torch.Tensor  # int8/int16/int32/int64 (narrowest for bits), length dim, uniform in Z_{2^bits}
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@message
@dataclass(frozen=True)
class ConsistencyIns:
    """The survivor story: every client is told the same one, signs it, and checks its neighbours signed it too."""

    round: int
    survivors: tuple[str, ...]  # sent a masked input: reveal shares of their self-mask seeds
    dropped: tuple[str, ...]  # shared keys but sent no masked input: reveal shares of their mask keys


@message
@dataclass(frozen=True)
class ConsistencyRes:
    round: int
    sig: bytes  # over `survivors_statement`


@message
@dataclass(frozen=True)
class UnmaskIns:
    round: int
    survivors: tuple[str, ...]  # must be exactly the signed ConsistencyIns story
    dropped: tuple[str, ...]
    sigs: dict[str, bytes] = field(default_factory=dict)  # neighbours' ConsistencyRes.sig


@message
@dataclass(frozen=True)
class UnmaskRes:
    round: int
    b_shares: dict[str, bytes]
    sk_shares: dict[str, bytes]


@message
@dataclass(frozen=True)
class ClientState:
    """What a client remembers between the stages of one round (kept in ClientContext.state, wiped at the end)."""

    stage: str
    setup_blob: bytes  # the round's SetupIns, encoded (messages do not nest)
    c_sk: bytes
    s_sk: bytes
    b_seed: bytes = b""
    c_pks: dict[str, bytes] = field(default_factory=dict)
    s_pks: dict[str, bytes] = field(default_factory=dict)
    held_b: dict[str, bytes] = field(default_factory=dict)  # shares of others' (and own) b_u, by owner
    held_sk: dict[str, bytes] = field(default_factory=dict)  # shares of others' (and own) s_u^SK, by owner
    masked_with: tuple[str, ...] = ()
    statement: bytes = b""  # the survivor statement this client signed (consistency stage)
    certs: dict[str, bytes] = field(default_factory=dict)  # neighbours' credentials, to check their signatures
    share_keys: dict[str, bytes] = field(default_factory=dict)  # AEAD keys agreed with each share holder

    @functools.cached_property
    def setup(self) -> SetupIns:
        out = decode_message(self.setup_blob, expected=(SetupIns,))
        assert isinstance(out, SetupIns)
        return out


def keys_statement(setup: SetupIns, party: str, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a client signs in the setup stage: its two round keys, bound to the round, attempt and its name."""
    return serde.dumps(["tessera-secagg-keys", setup.round, setup.session, party, c_pk, s_pk])


def survivors_statement(setup: SetupIns, survivors: tuple[str, ...], dropped: tuple[str, ...]) -> bytes:
    """What a client signs in the consistency stage: the survivor story it was told, for this round and attempt."""
    return serde.dumps(["tessera-secagg-survivors", setup.round, setup.session, list(survivors), list(dropped)])


REQUESTS = {Stage.SETUP: SetupIns, Stage.SHARE_KEYS: ShareKeysIns, Stage.COLLECT: MaskedInputIns,
            Stage.CONSISTENCY: ConsistencyIns, Stage.UNMASK: UnmaskIns}
REPLIES = {Stage.SETUP: KeysRes, Stage.SHARE_KEYS: ShareKeysRes, Stage.COLLECT: MaskedInputRes,
           Stage.CONSISTENCY: ConsistencyRes, Stage.UNMASK: UnmaskRes}
