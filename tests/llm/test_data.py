"""Generated client text: deterministic per (client, seed), and non-IID (topics differ between clients)."""

import numpy as np
import pytest

from tessera.core.errors import ConfigError
from tessera.llm import client_corpus
from tessera.llm.data import client_topic_mix


def test_each_client_mostly_writes_about_its_own_topic() -> None:
    for i in range(4):
        text = client_corpus(f"c{i}", i, train_size=200, test_size=50, num_topics=4, skew=0.9)
        share = np.bincount(text.train_labels, minlength=4) / 200
        assert share.argmax() == i and share[i] > 0.8
        assert np.bincount(text.test_labels, minlength=4).argmax() == i


def test_same_client_and_seed_give_the_same_text_and_other_seeds_do_not() -> None:
    a = client_corpus("alice", 0, train_size=20, test_size=5)
    assert a == client_corpus("alice", 0, train_size=20, test_size=5)
    assert a.train != client_corpus("alice", 0, train_size=20, test_size=5, seed=1).train


def test_topic_mix_is_a_distribution_with_the_skew_on_the_own_topic() -> None:
    p = client_topic_mix(5, num_topics=4, skew=0.7)
    assert p.sum() == pytest.approx(1.0)
    assert p[1] == pytest.approx(0.7) and p[0] == pytest.approx(0.1)
    with pytest.raises(ConfigError):
        client_topic_mix(0, num_topics=4, skew=1.5)
    with pytest.raises(ConfigError):
        client_corpus("x", 0, train_size=1, test_size=1, num_topics=99)
