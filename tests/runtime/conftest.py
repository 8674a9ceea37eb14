"""Fixtures shared by the runtime tests."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.runtime.test_grpc_failures import _Running


@pytest.fixture
def start(certs: Path) -> Iterator[Callable[..., _Running]]:
    """Starts a coordinator and client parties on loopback (`start(("alice", "bob"), ...)`); all closed after."""
    made: list[_Running] = []

    def make(names: tuple[str, ...], **kw: Any) -> _Running:
        made.append(_Running(certs, names, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()
