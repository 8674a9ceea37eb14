"""Generated, non-IID client text: each client writes mostly about its own topic.

Sentences come from topic-specific templates and word lists, drawn with a seeded numpy RNG, so every party can
regenerate exactly its own share of the corpus and no file ships with tessera. `client_corpus` gives one client's
train and held-out sentences with their topic labels (the labels are the sequence-classification targets).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from tessera.core.errors import ConfigError

# Each topic: sentence templates with {a} {b} {c} slots filled from its own word lists.
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "cooking": (
        ("stir the {a} into the {b} and simmer for {c} minutes.", "bake the {a} with {b} until golden, about {c} "
         "minutes.", "chop the {a}, add the {b} and season after {c} minutes."),
        ("onion", "garlic", "butter", "flour", "tomato", "pepper"),
        ("sauce", "dough", "broth", "pan", "oven", "salad"),
        ("five", "ten", "twenty", "thirty"),
    ),
    "weather": (
        ("expect {a} over the {b} with winds near {c} knots.", "a {a} front moves across the {b} by {c} o'clock.",
         "the {b} will see {a} skies and gusts of {c} knots."),
        ("rain", "snow", "cloudy", "sunny", "stormy", "foggy"),
        ("coast", "valley", "hills", "north", "plains", "city"),
        ("ten", "twelve", "fifteen", "forty"),
    ),
    "finance": (
        ("the {a} index rose as {b} yields fell {c} percent.", "investors sold {a} shares while {b} bonds gained "
         "{c} percent.", "quarterly {a} earnings beat {b} forecasts by {c} percent."),
        ("bank", "tech", "energy", "retail", "market", "stock"),
        ("treasury", "government", "analyst", "corporate", "dollar", "credit"),
        ("one", "two", "three", "four"),
    ),
    "space": (
        ("the {a} probe reached the {b} after {c} years in orbit.", "astronomers saw a {a} near the {b} {c} light "
         "years away.", "a {a} launch sent the crew toward the {b} for {c} days."),
        ("mars", "lunar", "comet", "rocket", "nebula", "saturn"),
        ("moon", "galaxy", "planet", "station", "asteroid", "star"),
        ("six", "nine", "eleven", "seven"),
    ),
    "medicine": (
        ("the patient took {a} for the {b} twice a day for {c} weeks.", "doctors treated the {b} with {a} over "
         "{c} weeks.", "a dose of {a} eased the {b} within {c} days."),
        ("aspirin", "insulin", "antibiotics", "vitamins", "ibuprofen", "saline"),
        ("fever", "infection", "headache", "injury", "cough", "rash"),
        ("two", "three", "eight", "six"),
    ),
    "sports": (
        ("the {a} scored in the {b} minute to win by {c} goals.", "a {a} pass set up the {b} goal, {c} to nil.",
         "the {a} team held the {b} lead for {c} rounds."),
        ("striker", "keeper", "captain", "winger", "coach", "rookie"),
        ("final", "first", "second", "last", "opening", "extra"),
        ("two", "three", "four", "five"),
    ),
}


@dataclass(frozen=True)
class ClientText:
    """One client's sentences: train and held-out splits, each with the topic index of every sentence."""

    train: list[str]
    train_labels: list[int]
    test: list[str]
    test_labels: list[int]


def topic_names(num_topics: int) -> list[str]:
    if not 1 <= num_topics <= len(TOPICS):
        raise ConfigError(f"num_topics must be in 1..{len(TOPICS)}, got {num_topics}")
    return list(TOPICS)[:num_topics]


def sentence(topic: str, rng: np.random.Generator) -> str:
    """One sentence about `topic`, its slots drawn from `rng`."""
    templates, a, b, c = TOPICS[topic]
    t = templates[int(rng.integers(len(templates)))]
    return t.format(a=a[int(rng.integers(len(a)))], b=b[int(rng.integers(len(b)))], c=c[int(rng.integers(len(c)))])


def client_topic_mix(client_index: int, *, num_topics: int, skew: float) -> np.ndarray:
    """Topic probabilities of a client: `skew` on topic `client_index % num_topics`, the rest spread evenly."""
    if not 0.0 <= skew <= 1.0:
        raise ConfigError(f"skew must be in [0, 1], got {skew}")
    p = np.full(num_topics, (1.0 - skew) / max(num_topics - 1, 1)) if num_topics > 1 else np.ones(1)
    if num_topics > 1:
        p[client_index % num_topics] = skew
    out: np.ndarray = p / p.sum()
    return out


def client_corpus(client: str, client_index: int, *, train_size: int, test_size: int, num_topics: int = 4,
                  skew: float = 0.9, seed: int = 0) -> ClientText:
    """A client's generated text; the same (client, seed) always gives the same sentences, on any machine."""
    names = topic_names(num_topics)
    p = client_topic_mix(client_index, num_topics=num_topics, skew=skew)
    rng = np.random.default_rng([seed, zlib.crc32(client.encode())])
    labels = rng.choice(num_topics, size=train_size + test_size, p=p)
    texts = [sentence(names[int(k)], rng) for k in labels]
    return ClientText(train=texts[:train_size], train_labels=[int(k) for k in labels[:train_size]],
                      test=texts[train_size:], test_labels=[int(k) for k in labels[train_size:]])
