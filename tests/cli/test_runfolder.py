"""Run-folder ownership (fresh / --resume / --overwrite) and transport.json over several sessions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tessera.core.errors import ConfigError
from tessera.core.runfolder import Start, claim
from tessera.runtime.backend import Traffic
from tessera.runtime.grpc.process import write_transport


def test_fresh_folder_is_claimed_and_a_run_is_refused_without_a_choice(tmp_path: Path) -> None:
    assert claim(tmp_path / "new", resume=False, overwrite=False) is Start.FRESH
    (tmp_path / "notes.txt").write_text("mine")
    assert claim(tmp_path, resume=False, overwrite=False) is Start.FRESH  # other files are not a run
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
    with pytest.raises(ConfigError, match=r"already holds a run \(2 round\(s\) recorded\); pass --resume .* "
                                          r"--overwrite"):
        claim(tmp_path, resume=False, overwrite=False)
    with pytest.raises(ConfigError, match="--resume: no checkpoint"):
        claim(tmp_path, resume=True, overwrite=False)
    with pytest.raises(ConfigError, match="choose one"):
        claim(tmp_path, resume=True, overwrite=True)


def test_overwrite_removes_the_run_files_only(tmp_path: Path) -> None:
    for name in ("checkpoint.tsr", "metrics.jsonl", "transport.json", "notes.txt",
                 "checkpoint-a1b2-00001-of-00002.safetensors", "checkpoint-a1b2-00002-of-00002.safetensors"):
        (tmp_path / name).write_text("x")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events").write_text("x")
    assert claim(tmp_path, resume=True, overwrite=False) is Start.RESUME
    assert claim(tmp_path, resume=False, overwrite=True) is Start.OVERWRITE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


class _Refusal:
    def __init__(self, claimed: str, reason: str) -> None:
        self.claimed, self.reason = claimed, reason


class _Backend:
    def __init__(self, up: int, down: int, refused: list[Any]) -> None:
        self.traffic = Traffic()
        self.traffic.add("client0", down=down, up=up)
        self.refused = refused


def test_transport_json_covers_every_session_labelled(tmp_path: Path) -> None:
    write_transport(tmp_path, _Backend(10, 100, [_Refusal("mallory", "unknown")]), label={"rounds": [1, 2]})  # type: ignore[arg-type]
    write_transport(tmp_path, _Backend(5, 50, []), label={"rounds": [3, 3]})  # type: ignore[arg-type]
    report = json.loads((tmp_path / "transport.json").read_text())
    assert (report["bytes_up"], report["bytes_down"]) == (15, 150)
    assert report["per_client"] == {"client0": [150, 15]}
    assert report["refused"] == [{"claimed": "mallory", "reason": "unknown", "session": 1}]
    assert [(s["session"], s["rounds"], s["bytes_up"]) for s in report["sessions"]] == [(1, [1, 2], 10), (2, [3, 3], 5)]


def test_a_transport_json_from_before_sessions_counts_as_session_one(tmp_path: Path) -> None:
    (tmp_path / "transport.json").write_text(json.dumps({"bytes_up": 1, "bytes_down": 2, "per_client": {"c": [2, 1]},
                                                         "refused": []}))
    write_transport(tmp_path, _Backend(3, 4, []), label={"rounds": [2, 2]})  # type: ignore[arg-type]
    report = json.loads((tmp_path / "transport.json").read_text())
    assert [s["session"] for s in report["sessions"]] == [1, 2] and report["bytes_up"] == 4
