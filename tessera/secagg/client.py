"""The client side of SecAgg+ as an explicit stage machine: `step(state, msg, train) -> (state, reply)`.

A message is accepted only in its stage and for the round the client is in; anything else (out of stage, a replay,
another round's share, a server that asks for both secrets of one client) raises ProtocolError and the client
leaves the round, which the server sees as a dropout.

Against a malicious coordinator (Bell et al. 2020) a client also refuses: a neighbour key without its party's
signature (the coordinator could substitute its own), fewer than t - 1 neighbours' shares (the coordinator could
leave it masked by b_u alone), and an unmask request whose survivor story differs from the one it signed, or
that fewer than t share holders of its own neighbourhood signed (the coordinator could tell neighbours different
stories and collect shares of a client's self mask from some and of its neighbours' mask keys from others).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tessera.core import serde
from tessera.core.errors import ProtocolError
from tessera.core.logging import get_logger
from tessera.core.types import Scalar
from tessera.secagg import crypto, shamir
from tessera.secagg.graph import neighbours_of
from tessera.secagg.messages import (
    ClientState,
    ConsistencyIns,
    ConsistencyRes,
    KeysRes,
    MaskedInputIns,
    MaskedInputRes,
    SetupIns,
    ShareKeysIns,
    ShareKeysRes,
    Stage,
    UnmaskIns,
    UnmaskRes,
    keys_statement,
    survivors_statement,
)
from tessera.secagg.pki import PKI
from tessera.secagg.prg import (
    PRG_NAME,
    SEED_BYTES,
    add_masks,
    check_prg,
    for_chunks,
    keystream_chunk,
    parallel_map,
    reduce,
    to_wire,
    word,
)

log = get_logger(__name__)

# train(params, config) -> (update vector of length dim - 1, float32 or float64, num_examples, metrics)
TrainFn = Callable[[MaskedInputIns], tuple[torch.Tensor, int, dict[str, float]]]


def _expect(state: ClientState | None, stage: Stage, msg: Any) -> ClientState:
    name = type(msg).__name__
    if state is None:
        raise ProtocolError(f"{name} arrived before SetupIns; a round starts with the setup stage")
    if msg.round != state.setup.round:
        raise ProtocolError(f"{name} is for round {msg.round} but this client is in round {state.setup.round}")
    if state.stage != stage:
        raise ProtocolError(f"{name} arrived in stage {state.stage!r} (expected in {stage.value!r}): "
                            "out of stage or replayed")
    return state


def aad(rnd: int, sender: str, receiver: str) -> bytes:
    return serde.dumps(["tessera-secagg-share", rnd, sender, receiver])


def on_setup(state: ClientState | None, msg: SetupIns, me: str, pki: PKI) -> tuple[ClientState, KeysRes]:
    if state is not None:
        last = state.setup
        # A new attempt at an unfinished round is allowed (the coordinator restarted it; fresh keys, so nothing
        # of the abandoned attempt is reusable); a finished round, an older one, or the same attempt is not.
        if last.round > msg.round or (last.round == msg.round and (state.stage == Stage.DONE.value
                                                                    or last.session == msg.session)):
            raise ProtocolError(f"SetupIns for round {msg.round} (this client is at round {last.round}, stage "
                                f"{state.stage}): replayed or stale setup")
    if me not in msg.clients or len(set(msg.clients)) != len(msg.clients):
        raise ProtocolError("SetupIns does not list this client exactly once")
    if not (msg.degree + 1) / 2 < msg.threshold <= msg.degree + 1:
        # A threshold of half the holders or less would let a server unmask b_u and s_u^SK from disjoint groups.
        raise ProtocolError(f"SetupIns threshold {msg.threshold} must exceed half of the {msg.degree + 1} share "
                            "holders and not exceed them; refusing to take part")
    check_prg(msg.prg)
    c_sk, c_pk = crypto.keypair()
    s_sk, s_pk = crypto.keypair()
    new = ClientState(stage=Stage.SHARE_KEYS.value, setup_blob=serde.encode_message(msg), c_sk=c_sk, s_sk=s_sk)
    sig = pki.sign(me, keys_statement(msg, me, c_pk, s_pk))
    return new, KeysRes(round=msg.round, c_pk=c_pk, s_pk=s_pk, sig=sig, cert=pki.credential(me))


def on_share_keys(state: ClientState | None, msg: ShareKeysIns, me: str,
                  pki: PKI) -> tuple[ClientState, ShareKeysRes]:
    st = _expect(state, Stage.SHARE_KEYS, msg)
    setup = st.setup
    if msg.c_pks.get(me) != crypto.public_of(st.c_sk) or msg.s_pks.get(me) != crypto.public_of(st.s_sk):
        raise ProtocolError("ShareKeysIns carries a wrong public key for this client; the server swapped keys")
    near = set(neighbours_of(setup.clients, me, degree=setup.degree, graph_seed=setup.graph_seed))
    holders = [c for c in setup.clients if c in msg.c_pks]
    if set(msg.c_pks) != set(msg.s_pks) or any(c != me and c not in near for c in holders):
        raise ProtocolError("ShareKeysIns lists clients that are not this client's neighbours")
    keys = list(msg.c_pks.values()) + list(msg.s_pks.values())
    if len(set(keys)) != len(keys):
        raise ProtocolError("ShareKeysIns repeats a public key; refusing to share secrets")

    def signed(c: str) -> bool:
        return pki.verify(c, keys_statement(setup, c, msg.c_pks[c], msg.s_pks[c]), msg.sigs.get(c, b""),
                          msg.certs.get(c, b""))

    others = [c for c in holders if c != me]
    for c, ok in zip(others, parallel_map(signed, others), strict=True):  # signature checks on the thread pool
        if not ok:
            raise ProtocolError(f"the keys forwarded for {c!r} are not signed by {c!r}; the coordinator may have "
                                "substituted them; refusing to share secrets")
    if len(holders) < setup.threshold:
        raise ProtocolError(f"only {len(holders)} share holders for threshold {setup.threshold}; leaving the round")
    b_seed = os.urandom(SEED_BYTES)
    xs = [setup.clients.index(c) + 1 for c in holders]
    b_sh = shamir.split(b_seed, xs=xs, threshold=setup.threshold)
    sk_sh = shamir.split(st.s_sk, xs=xs, threshold=setup.threshold)
    sealed: dict[str, bytes] = {}
    enc = crypto.agree_many(st.c_sk, {c: msg.c_pks[c] for c in holders if c != me}, info=crypto.SHARE_INFO)
    for c, x in zip(holders, xs, strict=True):
        if c == me:
            continue
        key = enc[c]
        body = serde.dumps({"round": setup.round, "sender": me, "receiver": c, "b": b_sh[x], "sk": sk_sh[x]})
        sealed[c] = crypto.seal(key, body, aad=aad(setup.round, me, c))
    x_me = setup.clients.index(me) + 1
    new = dataclasses.replace(st, stage=Stage.COLLECT.value, b_seed=b_seed, c_pks=dict(msg.c_pks),
                              s_pks=dict(msg.s_pks), held_b={me: b_sh[x_me]}, held_sk={me: sk_sh[x_me]},
                              certs={c: msg.certs.get(c, b"") for c in holders if c != me}, share_keys=enc)
    return new, ShareKeysRes(round=setup.round, shares=sealed)


def _open_shares(st: ClientState, msg: MaskedInputIns, me: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    held_b, held_sk = dict(st.held_b), dict(st.held_sk)
    rnd = st.setup.round
    if any(sender == me or sender not in st.share_keys for sender in msg.shares):
        raise ProtocolError("received a share from a client that is not a neighbour in this round")
    for sender, blob in msg.shares.items():
        key = st.share_keys[sender]  # agreed with every share holder in the share-keys stage
        body = serde.loads(crypto.open_sealed(key, blob, aad=aad(rnd, sender, me)))
        if not (isinstance(body, dict) and body.get("round") == rnd and body.get("sender") == sender
                and body.get("receiver") == me and isinstance(body.get("b"), bytes)
                and isinstance(body.get("sk"), bytes)):
            raise ProtocolError("a share is for another round, sender or receiver; leaving the round")
        held_b[sender], held_sk[sender] = body["b"], body["sk"]
    return held_b, held_sk


def check_enough_shares(received: int, threshold: int) -> None:
    """Masked by b_u and fewer than t - 1 pairwise masks, honest unmasking would hand the coordinator this update
    (it withheld the other shares): leave the round before masking (Bonawitz et al.: abort when |U2| < t)."""
    if received + 1 < threshold:
        raise ProtocolError(f"only {received} neighbours' shares arrived (threshold {threshold} holders including "
                            "this client); leaving the round before masking")


def mask_vector(vector: torch.Tensor, num_examples: int, seed: Scalar | None, *, st: ClientState, me: str,
                partners: tuple[str, ...]) -> torch.Tensor:
    """q + PRG(b_u) + sum_v +-PRG(s_uv) in Z_{2^bits} (+ if u comes before v in the client list, - after), with q
    the quantised update (`encode_words`), as the wire tensor (int32 for bits <= 32, else int64). The pool threads
    start expanding masks while this thread quantises: numpy's passes overlap the keystream, which holds the GIL."""
    setup = st.setup
    if vector.numel() != setup.dim - 1:
        raise ProtocolError(f"update has {vector.numel()} values but the round expects {setup.dim - 1}")
    me_i = setup.clients.index(me)
    seeds = crypto.agree_many(st.s_sk, {v: st.s_pks[v] for v in partners}, info=crypto.MASK_INFO)
    masks = [(st.b_seed, 1)] + [(seeds[v], 1 if me_i < setup.clients.index(v) else -1) for v in partners]
    acc = np.empty(setup.dim, dtype=word(setup.bits))

    def quantise() -> None:
        encode_words(vector, num_examples, setup, seed, out=acc, threads=False)

    add_masks(acc, masks, bits=setup.bits, prg=setup.prg, fill=quantise)
    return to_wire(reduce(acc, bits=setup.bits), bits=setup.bits)


def encode_words(vector: torch.Tensor, num_examples: int, setup: SetupIns, seed: Scalar | None, *,
                 out: np.ndarray | None = None, threads: bool = True) -> np.ndarray:
    """Clip the update (L2 to `l2_clip` if set, then each coordinate to [-clip, clip]), fold the FedAvg weight
    w = min(n, max_weight) / max_weight into it and quantise to [0, levels] with stochastic rounding (randomness
    from the PRG keyed by `seed`, or fresh); w travels as the last coordinate. Unsigned ring words (into `out` if
    given), chunk by chunk on the thread pool (on this thread where `threads` is False)."""
    if vector.numel() != setup.dim - 1:
        raise ProtocolError(f"update has {vector.numel()} values but the round expects {setup.dim - 1}")
    flat = vector.detach().reshape(-1)
    if flat.dtype != torch.float32 or setup.l2_clip > 0:
        flat = flat.double()  # (float32 is widened chunk by chunk below, exactly)
    v = flat.numpy()
    scale = 1.0
    if setup.l2_clip > 0:
        scale = min(1.0, setup.l2_clip / max(float(np.linalg.norm(v)), 1e-300))
    if num_examples > setup.max_weight:
        log.warning("num_examples exceeds secagg.max_weight: this client's FedAvg weight is capped")
    w = min(float(num_examples), setup.max_weight) / setup.max_weight
    key = (hashlib.sha256(b"tessera/secagg/rounding|%d" % int(seed)).digest() if isinstance(seed, int)
           else os.urandom(SEED_BYTES))
    if out is None:
        out = np.empty(setup.dim, dtype=word(setup.bits))
    assert out.shape == (setup.dim,) and out.dtype == word(setup.bits)
    to_unit = setup.levels / (2.0 * setup.clip)
    # Every step below is monotone in the value, so the largest y is that of a value at +clip: when it does not
    # exceed levels, neither does floor(y) + 1 (y == levels has no fraction to round up) and the clamp is a no-op.
    clamp = ((setup.clip * w if w != 1.0 else setup.clip) + setup.clip) * to_unit > setup.levels
    top = out.dtype.type(setup.levels)
    # float32 clipped against a bound that is itself a float32 gives the same values as clipping the widened
    # float64, in half the bytes; the widening is then a plain copy.
    clip32 = np.float32(setup.clip)
    narrow = v.dtype == np.float32 and scale == 1.0 and float(clip32) == setup.clip

    def chunk(start: int, stop: int) -> None:
        y, low = np.empty(stop - start), np.empty(stop - start)  # float64
        if narrow:
            clipped = low.view(np.float32)[: stop - start]  # low's memory, unused until the floor below
            np.clip(v[start:stop], -clip32, clip32, out=clipped)
            np.copyto(y, clipped)  # exact widening
        elif scale != 1.0:
            np.multiply(v[start:stop], scale, out=y)
            np.clip(y, -setup.clip, setup.clip, out=y)
        else:  # copy and clip in one pass, in float64
            np.clip(v[start:stop], -setup.clip, setup.clip, out=y, dtype=np.float64)
        if w != 1.0:  # y * 1.0 == y exactly
            y *= w
        y += setup.clip
        y *= to_unit  # in [0, levels]
        np.floor(y, out=low)
        y -= low
        y *= 2.0**32  # round up with probability frac: a uniform 32-bit word below frac * 2^32
        up = np.less(keystream_chunk(key, start, stop, np.uint32, prg=PRG_NAME), y)
        words = out[start:stop]
        words[...] = low  # exact: integers in [0, levels]
        np.add(words, up, out=words)
        if clamp:
            np.minimum(words, top, out=words)

    for_chunks(setup.dim - 1, chunk, threads=threads)
    last = keystream_chunk(key, setup.dim - 1, setup.dim, np.uint32, prg=PRG_NAME)[0]
    y = w * setup.levels
    out[-1] = min(math.floor(y) + (int(last) < (y - math.floor(y)) * 2.0**32), setup.levels)
    return out


def encode_input(vector: torch.Tensor, num_examples: int, setup: SetupIns, seed: Scalar | None) -> torch.Tensor:
    """`encode_words` as an int64 tensor: the client's quantised input before masking (the tests' oracle)."""
    return torch.from_numpy(encode_words(vector, num_examples, setup, seed).astype(np.int64))


def on_masked_input(state: ClientState | None, msg: MaskedInputIns, me: str,
                    train: TrainFn) -> tuple[ClientState, MaskedInputRes]:
    st = _expect(state, Stage.COLLECT, msg)
    check_enough_shares(len(msg.shares), st.setup.threshold)
    held_b, held_sk = _open_shares(st, msg, me)
    index = st.setup.clients.index
    partners = tuple(sorted(msg.shares, key=index))  # neighbours that shared keys: their masks are recoverable
    vector, n, metrics = train(msg)
    wire = mask_vector(vector, n, msg.config.get("seed"), st=st, me=me, partners=partners)  # int32 or int64
    new = dataclasses.replace(st, stage=Stage.CONSISTENCY.value, held_b=held_b, held_sk=held_sk,
                              masked_with=partners)
    return new, MaskedInputRes(round=st.setup.round, masked=wire, num_examples=n, metrics=metrics)


def check_neighbourhood(setup: SetupIns, me: str, survivors: set[str]) -> None:
    """At least t of this client's share holders (itself and its neighbours) survived: counted in its own
    neighbourhood, never over the whole round (a coordinator could pad the list with far-away clients)."""
    near = set(neighbours_of(setup.clients, me, degree=setup.degree, graph_seed=setup.graph_seed)) | {me}
    alive = len(near & survivors)
    if alive < setup.threshold:
        raise ProtocolError(f"only {alive} of this client's share holders survived (threshold {setup.threshold}); "
                            "refusing to reveal shares")


def check_confirmations(st: ClientState, msg: UnmaskIns, me: str, pki: PKI) -> None:
    """Every neighbour's signature forwarded is over the very story this client signed, and at least t holders of
    its neighbourhood (itself included) signed it: the coordinator told them all the same story."""
    setup = st.setup
    near = set(neighbours_of(setup.clients, me, degree=setup.degree, graph_seed=setup.graph_seed))
    alive = set(msg.survivors)

    def confirmed(v: str) -> bool:
        return v in near and v in alive and pki.verify(v, st.statement, msg.sigs[v], st.certs.get(v, b""))

    names = list(msg.sigs)
    for v, ok in zip(names, parallel_map(confirmed, names), strict=True):  # signature checks on the thread pool
        if not ok:
            raise ProtocolError(f"{v!r} did not sign the survivor story this client was told: the coordinator tells "
                                "clients different stories; refusing to reveal shares")
    if len(msg.sigs) + 1 < setup.threshold:
        raise ProtocolError(f"only {len(msg.sigs)} neighbours confirmed the survivor story (threshold "
                            f"{setup.threshold} holders including this client); refusing to reveal shares")


def on_consistency(state: ClientState | None, msg: ConsistencyIns, me: str,
                   pki: PKI) -> tuple[ClientState, ConsistencyRes]:
    """Check the survivor story against this client's own neighbourhood, then sign it (once per round)."""
    st = _expect(state, Stage.CONSISTENCY, msg)
    setup = st.setup
    surv, drop = set(msg.survivors), set(msg.dropped)
    if surv & drop or len(surv) != len(msg.survivors) or len(drop) != len(msg.dropped):
        raise ProtocolError("the survivor story names a client twice or as both survivor and dropout: the server "
                            "would learn its update; refusing")
    if not (surv | drop) <= set(setup.clients) or me not in surv:
        raise ProtocolError("the survivor story omits this client or names clients outside the round; refusing")
    check_neighbourhood(setup, me, surv)
    if unnamed := [v for v in st.masked_with if v not in surv | drop]:
        raise ProtocolError(f"the survivor story names neither as survivor nor as dropped {unnamed[0]!r}, whose "
                            "pairwise mask is in this client's input; refusing (the sum could not be unmasked)")
    statement = survivors_statement(setup, msg.survivors, msg.dropped)
    new = dataclasses.replace(st, stage=Stage.UNMASK.value, statement=statement)
    return new, ConsistencyRes(round=setup.round, sig=pki.sign(me, statement))


def on_unmask(state: ClientState | None, msg: UnmaskIns, me: str, pki: PKI) -> UnmaskRes:
    st = _expect(state, Stage.UNMASK, msg)
    setup = st.setup
    if survivors_statement(setup, msg.survivors, msg.dropped) != st.statement:
        raise ProtocolError("UnmaskIns tells another survivor story than the one this client signed; refusing")
    check_confirmations(st, msg, me, pki)
    surv, drop = set(msg.survivors), set(msg.dropped)
    # surv and drop are disjoint (checked when signed): never both secrets of one client.
    return UnmaskRes(round=setup.round, b_shares={u: s for u, s in st.held_b.items() if u in surv},
                     sk_shares={u: s for u, s in st.held_sk.items() if u in drop})


def step(state: ClientState | None, msg: Any, me: str, train: TrainFn, pki: PKI) -> tuple[ClientState, Any]:
    """One transition of the client's stage machine (`pki` signs as `me` and checks the neighbours' signatures);
    secrets are wiped once the round is over."""
    if isinstance(msg, SetupIns):
        return on_setup(state, msg, me, pki)
    if isinstance(msg, ShareKeysIns):
        return on_share_keys(state, msg, me, pki)
    if isinstance(msg, MaskedInputIns):
        return on_masked_input(state, msg, me, train)
    if isinstance(msg, ConsistencyIns):
        return on_consistency(state, msg, me, pki)
    if isinstance(msg, UnmaskIns):
        reply = on_unmask(state, msg, me, pki)
        assert state is not None
        # Keep only the round number (to refuse replays); every secret of the round is dropped here.
        return ClientState(stage=Stage.DONE.value, setup_blob=state.setup_blob, c_sk=b"", s_sk=b""), reply
    raise ProtocolError(f"{type(msg).__name__} is not a SecAgg+ message")
