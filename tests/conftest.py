"""Test-wide settings: offline, headless, single-threaded torch (2-core CI), deterministic."""

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip cleanly on a machine without CUDA (make gpu-check runs them where there is one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run make gpu-check on one; docs/gpu.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray for every test that needs it (each start costs seconds); backends inside reuse it."""
    from pathlib import Path

    from tessera.runtime.ray import ray_session

    # Actors unpickle test modules' mods and helpers by reference: let worker processes import `tests`.
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    with ray_session(num_cpus=2, object_store_memory="100MiB"):
        yield


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A federation CA and certificates for server, alice, bob and carol (fresh per test module)."""
    from tessera.runtime.grpc.certs import init_ca, issue

    d = tmp_path_factory.mktemp("certs")
    init_ca(d)
    for n in ("server", "alice", "bob", "carol"):
        issue(d, n)
    return d
