"""Masks expanded while the client quantises (`add_masks(fill=...)`): the same ring words as quantising first and
adding the masks after, whatever the number of masks per thread; a failing fill fails the call."""

import os

import numpy as np
import pytest
import torch

from tessera.core import serde
from tessera.core.errors import ProtocolError
from tessera.secagg.prg import CHUNK, PRG_NAME, add_masks, keystream, reduce, word


def _masks(k: int) -> list[tuple[bytes, int]]:
    return [(os.urandom(32), 1 if i % 3 else -1) for i in range(k)]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 22])
@pytest.mark.parametrize("bits", [16, 32, 40])
def test_masks_added_while_filling_equal_the_sum_of_keystreams(k: int, bits: int) -> None:
    n = CHUNK + 5
    start = (np.arange(n, dtype=np.uint64) * 2654435761).astype(word(bits))
    masks = _masks(k)
    acc = np.empty(n, dtype=word(bits))
    add_masks(acc, masks, bits=bits, prg=PRG_NAME, fill=lambda: np.copyto(acc, start))
    expected = start.copy()
    for seed, sign in masks:  # oracle: the whole keystream of each mask, added or subtracted in the word
        ks = keystream(seed, n, bits=bits, prg=PRG_NAME)
        expected = expected + ks if sign > 0 else expected - ks
    assert np.array_equal(reduce(acc, bits=bits), reduce(expected, bits=bits))


def test_a_failing_fill_fails_the_call() -> None:
    def fill() -> None:
        raise ProtocolError("bad update")

    with pytest.raises(ProtocolError, match="bad update"):
        add_masks(np.empty(CHUNK, dtype=np.uint32), _masks(12), bits=32, prg=PRG_NAME, fill=fill)


def test_the_clients_masked_input_is_its_quantised_update_plus_its_masks() -> None:
    from tessera.secagg import crypto
    from tessera.secagg.client import encode_words, mask_vector
    from tessera.secagg.messages import ClientState, Stage
    from tessera.secagg.plus import SecAggPlus

    clients = ["a", "b", "c", "d"]
    setup = SecAggPlus(clip=2.0, bits=32, max_weight=1.0).setup(1, clients, dim=CHUNK + 12, graph_seed=0, session=1)
    keys = {c: crypto.keypair() for c in clients}
    st = ClientState(stage=Stage.COLLECT.value, setup_blob=serde.encode_message(setup), c_sk=b"", s_sk=keys["b"][0],
                     b_seed=os.urandom(32), s_pks={c: pk for c, (_, pk) in keys.items()})
    vector = torch.randn(CHUNK + 11, generator=torch.Generator().manual_seed(3))
    wire = mask_vector(vector, 1, 17, st=st, me="b", partners=("a", "c", "d"))
    seeds = crypto.agree_many(st.s_sk, {v: st.s_pks[v] for v in ("a", "c", "d")}, info=crypto.MASK_INFO)
    expected = encode_words(vector, 1, setup, 17)  # quantised first (on the pool), masks added after
    add_masks(expected, [(st.b_seed, 1), (seeds["a"], -1), (seeds["c"], 1), (seeds["d"], 1)], bits=32, prg=setup.prg)
    assert np.array_equal(wire.numpy().view(np.uint32), expected)
    with pytest.raises(ProtocolError, match="round expects"):
        mask_vector(vector[:-1], 1, 17, st=st, me="b", partners=("a", "c", "d"))
