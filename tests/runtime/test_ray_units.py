"""Ray backend parts that need no cluster: options, the shared-params split, the client state stores."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tessera.core import serde
from tessera.core.errors import ConfigError, SerdeError
from tessera.horizontal.strategies import Scaffold
from tessera.runtime.messages import EvaluateIns, FitIns
from tessera.runtime.ray import RayBackend, RayOptions
from tessera.runtime.ray.options import MIB
from tessera.runtime.ray.shared import decode, encode_shared, find_shared
from tessera.runtime.ray.store import DiskStore, MemoryStore, decode_state, encode_state

from ..horizontal.helpers import make_parts


def test_options_parse_sizes_and_refuse_unknown_keys() -> None:
    opts = RayOptions.model_validate({"object_store_memory": "100MiB", "actor_memory": "1.5GiB", "num_actors": 3,
                                      "actor_resources": {"accelerator": 0.5}})
    assert opts.object_store_memory == 100 * MIB
    assert opts.actor_options() == {"num_cpus": 1.0, "max_restarts": 0, "max_concurrency": 1,
                                    "memory": int(1.5 * 1024**3), "resources": {"accelerator": 0.5}}
    with pytest.raises(ConfigError, match="ray: num_actor: unknown key"):
        RayBackend(make_parts().client_app, num_actor=2)
    with pytest.raises(ConfigError, match="75MiB"):
        RayBackend(make_parts().client_app, object_store_memory="10MiB")
    with pytest.raises(ConfigError, match="object_store_memory must be a size"):
        RayBackend(make_parts().client_app, object_store_memory="lots")


def test_shared_params_travel_once_and_rebuild_each_message() -> None:
    # Prepare: SCAFFOLD's plan shares the global params (a field) and its control variate (an extras key).
    params = {"w": torch.randn(50, 40), "b": torch.randn(40)}
    strategy = Scaffold(local_lr=0.1)
    plan = dict(strategy.configure_fit(1, params, ["a", "b", "c"], np.random.default_rng(0)))
    plan["c"] = FitIns(round=1, params={k: v.clone() for k, v in params.items()}, config=plan["c"].config,
                       extras=plan["c"].extras)  # a client with its own params keeps them in its message
    assert set(find_shared(plan)) == {("params",), ("extras", "scaffold_c")}
    # Execute
    shared, blobs = encode_shared(plan)
    # Assert: params and c are in the shared blob once; only client c's message carries params itself.
    tensor_bytes = 4 * (50 * 40 + 40)
    assert shared is not None and tensor_bytes * 2 < len(shared) < tensor_bytes * 2 + 512
    assert len(blobs["a"]) < 512 and len(blobs["b"]) < 512 and tensor_bytes < len(blobs["c"]) < tensor_bytes + 1024
    for cid, blob in blobs.items():
        got, want = decode(blob, shared, max_bytes=10**8), plan[cid]
        assert got.config == want.config and list(got.extras) == list(want.extras)
        assert all(torch.equal(got.params[k], want.params[k]) for k in params)
        assert all(torch.equal(got.extras["scaffold_c"][k], want.extras["scaffold_c"][k]) for k in params)


def test_unshared_requests_are_plain_messages() -> None:
    shared, blobs = encode_shared({"a": EvaluateIns(round=1, params={"w": torch.ones(2)})})
    assert shared is None
    assert serde.decode_message(blobs["a"]).params["w"].tolist() == [1.0, 1.0]
    with pytest.raises(SerdeError):
        decode(serde.dumps({"left_out": [["params"]], "message": blobs["a"]}), serde.dumps({"paths": [],
               "values": []}), max_bytes=10**6)


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_state_store_round_trips_and_hides_client_ids(kind: str, tmp_path: Path) -> None:
    store = MemoryStore() if kind == "memory" else DiskStore(tmp_path)
    state = {"count": 3, "ci": {"w": torch.arange(4.0)}}
    store.put("alice@example", encode_state(state))
    store.put("bob", encode_state({}))  # no state: nothing kept
    got = decode_state(store.get("alice@example"))
    assert got["count"] == 3 and torch.equal(got["ci"]["w"], torch.arange(4.0))
    assert list(store.clients()) == ["alice@example"] and store.get("bob") is None
    if isinstance(store, DiskStore):
        names = [p.name for p in store.dir.iterdir()]
        assert len(names) == 1 and "alice" not in names[0]
        store.close()
        assert not store.dir.exists()
    with pytest.raises(SerdeError):
        decode_state(serde.dumps([1, 2]))


def test_a_dead_actors_later_call_reported_first_is_requeued_not_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray may report the call queued behind a dying one as failed before the dying one itself. The call behind
    never ran, so it goes back to the pending clients (not failed), exactly as when the head is reported first."""
    from collections import deque

    from tessera.runtime.backend import ClientFailure, FailureKind
    from tessera.runtime.ray import backend as rb

    backend = RayBackend(lambda: None)
    head, behind = object(), object()
    ex = rb._Exchange(pending=deque(["c4"]), queues={0: deque([(head, "c2"), (behind, "c3")])},
                      down={"c2": 1, "c3": 1}, on_reply=lambda c, r: r, owner={head: 0, behind: 0})
    monkeypatch.setattr(rb.ray, "wait", lambda refs, timeout=None: ([], refs))  # the head: not reported yet
    collected: list[str] = []

    def collect(ref: object, slot: int, client: str, *, down: int, borrow: bool) -> tuple[object, bool]:
        collected.append(client)
        return ClientFailure(client, "actor died", FailureKind.UNREACHABLE), True

    monkeypatch.setattr(backend, "_collect", collect)
    backend._drain(behind, ex)
    assert collected == ["c2"] and list(ex.out) == ["c2"]
    assert list(ex.pending) == ["c3", "c4"] and backend.requeued == 1 and ex.owner == {} and not ex.queues[0]


def test_a_failed_local_start_is_retried_once_then_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any failure of the first local start (not only Ray's start-up timeout) gets one more attempt; a second
    failure is a ConfigError naming the setting to check, with the second attempt's error."""
    from tessera.runtime.ray import backend

    calls: list[str] = []
    failures = ["GCS exited before writing its port"]  # one failure: the retry succeeds

    def init(**kwargs: object) -> None:
        calls.append("init")
        if failures:
            raise RuntimeError(failures.pop(0))

    monkeypatch.setattr(backend.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(backend.ray, "init", init)
    monkeypatch.setattr(backend.ray, "shutdown", lambda: calls.append("shutdown"))
    assert backend.connect(RayOptions()) is True
    assert calls == ["init", "shutdown", "init"]
    calls.clear()
    failures[:] = ["first", "second"]
    with pytest.raises(ConfigError, match=r"could not start or reach a local Ray \(RuntimeError: second\)"):
        backend.connect(RayOptions())
    assert calls == ["init", "shutdown", "init"]
