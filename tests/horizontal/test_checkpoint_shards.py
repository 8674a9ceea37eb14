"""Large-model checkpoints: params as safetensors shards beside checkpoint.tsr (the commit point), read by one
`load_checkpoint`. Oracles: resume from shards equals the uninterrupted run bit for bit; the shards hold exactly
the server's params; a crash mid-write leaves the previous checkpoint; a broken shard is a ConfigError naming it."""

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from tessera.core import serde
from tessera.core.errors import ConfigError
from tessera.core.io import atomic_write_parts
from tessera.horizontal import checkpoint
from tessera.horizontal.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from tessera.horizontal.simulation import JobParts, simulate
from tessera.horizontal.strategies import FedAdam, FedAvg

from .helpers import make_data, make_task, params_equal


def _parts(strategy_cls: type = FedAvg) -> JobParts:
    data = make_data(num_clients=4)
    return JobParts(task=make_task(data), strategy=strategy_cls(fraction_fit=0.75), clients=list(data))


def _shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("checkpoint-*.safetensors"))


@pytest.mark.parametrize("strategy_cls", [FedAvg, FedAdam])
def test_resume_from_shards_equals_the_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         strategy_cls: type) -> None:
    _, full = simulate(_parts(strategy_cls), rounds=4, seed=3, output_dir=tmp_path / "full")
    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 200)  # far below the test model: several shards
    simulate(_parts(strategy_cls), rounds=2, seed=3, output_dir=tmp_path / "cut")
    cut = tmp_path / "cut"
    shards = _shards(cut)
    assert len(shards) >= 2 and all("r000002-" in s for s in shards)  # only the last write's shards
    small = serde.loads((cut / CHECKPOINT).read_bytes())
    assert small["params"] == {} and [m["file"] for m in small["params_shards"]] == shards
    _, resumed = simulate(_parts(strategy_cls), rounds=4, seed=3, output_dir=cut, resume=True)
    assert params_equal(full, resumed)
    state = load_checkpoint(cut)
    assert state["round"] == 4 and params_equal(state["params"], resumed)
    assert list(state["params"]) == list(full)  # the manifest keeps the params' order


def test_a_single_file_checkpoint_still_loads_and_small_models_stay_one_file(tmp_path: Path) -> None:
    _, params = simulate(_parts(), rounds=1, seed=3, output_dir=tmp_path)
    assert _shards(tmp_path) == []
    state = load_checkpoint(tmp_path / CHECKPOINT)
    assert params_equal(state["params"], params)
    old = tmp_path / "old"
    old.mkdir()
    (old / CHECKPOINT).write_bytes(serde.dumps(state))  # as every earlier version wrote it
    assert params_equal(load_checkpoint(old)["params"], params) and load_checkpoint(old)["round"] == 1


def _written(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    params = {"a": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.ones(100, dtype=torch.bfloat16),
              "n": torch.tensor(7)}
    save_checkpoint(tmp_path, {"round": 1, "params": params, "history": []}, shard_bytes=300)
    return tmp_path, params


def test_shards_round_trip_every_dtype(tmp_path: Path) -> None:
    folder, params = _written(tmp_path)
    assert len(_shards(folder)) == 2
    got = load_checkpoint(folder)["params"]
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in params.items())


def test_a_missing_truncated_or_foreign_shard_is_named(tmp_path: Path) -> None:
    folder, _ = _written(tmp_path)
    first, second = (folder / s for s in _shards(folder))
    data = first.read_bytes()
    first.write_bytes(data[:-4])
    with pytest.raises(ConfigError, match=rf"{first.name} is truncated"):
        load_checkpoint(folder)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    forged = data.replace(b'"F32"', b'"I32"')  # same size, another dtype than the manifest says
    assert len(forged) == len(data) and header["a"]["dtype"] == "F32"
    first.write_bytes(forged)
    with pytest.raises(ConfigError, match=rf"{first.name}: 'a' is torch.int32 \[8, 8\] but .*F32"):
        load_checkpoint(folder)
    first.write_bytes(b"x" * len(data))
    with pytest.raises(ConfigError, match=rf"{first.name} is not a valid safetensors shard"):
        load_checkpoint(folder)
    second.unlink()
    first.write_bytes(data)
    with pytest.raises(ConfigError, match=rf"{second.name} is missing"):
        load_checkpoint(folder)


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, params = _written(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    calls = []

    def crash(path: Path, parts: Sequence[bytes | memoryview]) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        atomic_write_parts(path, parts)

    monkeypatch.setattr(checkpoint, "atomic_write_parts", crash)
    newer = {k: v + 1 for k, v in params.items()}
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(folder, {"round": 2, "params": newer, "history": []}, shard_bytes=300)
    got = load_checkpoint(folder)
    assert got["round"] == 1 and all(torch.equal(got["params"][k], v) for k, v in params.items())
    assert all((folder / name).read_bytes() == data for name, data in before.items())
