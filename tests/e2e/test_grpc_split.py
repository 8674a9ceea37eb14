"""Split learning deployed as three OS processes over loopback gRPC + mTLS: the label party (coordinator) and two
data owners.

Oracles: the fuse params in the label party's checkpoint, each owner's base in its own saved state, and the loss
of every epoch equal the same split app run in one process (`run_split_inprocess`), bit for bit; an owner that
goes silent fails the step with exit code 2 and the checkpoint of the last whole epoch, from which --resume
finishes with the same result.
"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from tessera.core import serde
from tessera.core.errors import ConfigError
from tessera.core.types import get_params
from tessera.runtime.grpc import load_federation
from tessera.vertical.deploy import load_split_app, run_split_inprocess
from tests.e2e.grpc_helpers import Party, SplitApp, free_port, make_certs, parties, write_federation

pytestmark = pytest.mark.slow
APP = "tests.e2e.grpc_helpers:SplitApp"
OWNERS = ("alice", "bob")


def _run(fed: Path, tmp: Path, *, resume: bool = False, env: dict[str, dict[str, str]] | None = None,
         ) -> tuple[Party, list[Party]]:
    extra = ("--resume",) if resume else ()
    coord = Party(fed, "server", args=("--split", APP, "--out", str(tmp / "server"), *extra))
    coord.expect("listening on port")
    owners = [Party(fed, n, args=("--split", APP, "--out", str(tmp / n)), env=(env or {}).get(n)) for n in OWNERS]
    return coord, owners


def _deployed(tmp: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The label party's checkpoint and each owner's base from the state the checkpoint names (hash-checked)."""
    state = serde.loads((tmp / "server" / "checkpoint.tsr").read_bytes())
    bases = {}
    for o in OWNERS:
        blob = (tmp / o / f"{state['tag']}.tsr").read_bytes()
        assert hashlib.sha256(blob).hexdigest() == state["owners"][o]
        bases[o] = serde.loads(blob)["base"]
    return state, bases


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        assert torch.equal(got[k], w), f"{k} differs by {float((got[k] - w).abs().max())}"


def _assert_like_in_process(tmp: Path) -> None:
    oracle = run_split_inprocess(SplitApp, label="server", owners=list(OWNERS), out=tmp / "sim")
    state, bases = _deployed(tmp)
    assert state["label"]["epoch"] == 3 and state["label"]["step"] == 9
    _assert_equal(state["label"]["fuse"], get_params(oracle.fuse))
    for o in OWNERS:
        _assert_equal(bases[o], get_params(oracle.backend.handler.owners[o].base))
    records = [json.loads(line) for line in (tmp / "server" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in records] == [r["train_loss"] for r in oracle.history.records]


def _train_deployed(tmp_path: Path) -> Path:
    """Certificates, a federation file and one whole deployed training run (every party exits 0)."""
    make_certs(tmp_path / "certs", ("server", *OWNERS))
    fed = write_federation(tmp_path / "federation.toml", port=free_port(), clients=OWNERS)
    with parties() as ps:
        coord, owners = _run(fed, tmp_path)
        ps += [coord, *owners]
        assert coord.wait() == 0, coord.output()
        for p in owners:
            assert p.wait() == 0, p.output()
    return fed


def test_split_learning_over_grpc_equals_the_in_process_split_trainer(tmp_path: Path) -> None:
    _train_deployed(tmp_path)
    _assert_like_in_process(tmp_path)
    traffic = json.loads((tmp_path / "server" / "transport.json").read_text())
    assert set(traffic["per_client"]) == set(OWNERS) and traffic["refused"] == []


def test_a_silent_owner_fails_the_step_cleanly_and_resume_finishes_like_in_process(tmp_path: Path) -> None:
    make_certs(tmp_path / "certs", ("server", *OWNERS))
    fed = write_federation(tmp_path / "federation.toml", port=free_port(), clients=OWNERS, rpc_deadline=3)
    with parties() as ps:
        # bob freezes (SIGSTOP: connection open, nothing answered) on the forward of step 4, in epoch 2
        coord, owners = _run(fed, tmp_path, env={"bob": {"TESSERA_TEST_FAULT": "stop:ForwardIns:4"}})
        ps += [coord, *owners]
        assert coord.wait() == 2, coord.output()
        out = " ".join(coord.output().split())
        assert "split step 4 failed" in out and "party bob sent no reply within 3" in out
        assert "checkpoint holds epoch 1" in out and "--resume" in out
        assert owners[0].wait() == 0, owners[0].output()  # alice was told the run is over
        owners[1].kill()
        assert owners[1].wait() == -signal.SIGKILL
    state, _ = _deployed(tmp_path)
    assert (state["label"]["epoch"], state["label"]["step"]) == (1, 3)

    with parties() as ps:
        coord, owners = _run(fed, tmp_path, resume=True)
        ps += [coord, *owners]
        assert coord.wait() == 0, coord.output()
        for p in owners:
            assert p.wait() == 0, p.output()
    _assert_like_in_process(tmp_path)


def test_split_apps_load_from_a_file_or_module_and_bad_ones_name_the_fix(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "deployment"
    app = load_split_app(str(example / "split_app.py"))
    fed = load_federation(example / "federation_split.toml")
    assert list(app.COLUMNS) == fed.client_names and app.FIT["epochs"] >= 1
    assert load_split_app(APP) is SplitApp
    bad = tmp_path / "bad_app.py"
    bad.write_text("def owner(name, out):\n    return None\n")
    with pytest.raises(ConfigError, match=r"missing \['label_party', 'FIT'\]"):
        load_split_app(str(bad))
    with pytest.raises(ConfigError, match=r"cannot load 'no\.such\.module'"):
        load_split_app("no.such.module")


def test_sigterm_at_the_label_party_finishes_the_epoch_and_resume_finishes_like_in_process(tmp_path: Path) -> None:
    make_certs(tmp_path / "certs", ("server", *OWNERS))
    fed = write_federation(tmp_path / "federation.toml", port=free_port(), clients=OWNERS)
    with parties() as ps:
        coord, owners = _run(fed, tmp_path, env={"bob": {"TESSERA_TEST_FAULT": "stop:ForwardIns:4"}})
        ps += [coord, *owners]
        coord.expect("epoch 1 done")
        owners[1].wait_stopped()  # epoch 2 is in flight
        coord.signal(signal.SIGTERM)
        owners[1].signal(signal.SIGCONT)
        assert coord.wait() == 0, coord.output()
        assert "stopped on signal after epoch 2" in coord.output()
        for p in owners:
            assert p.wait() == 0, p.output()
    state, _ = _deployed(tmp_path)
    assert (state["label"]["epoch"], state["label"]["step"]) == (2, 6)

    with parties() as ps:
        coord, owners = _run(fed, tmp_path, resume=True)
        ps += [coord, *owners]
        assert coord.wait() == 0, coord.output()
    _assert_like_in_process(tmp_path)


def test_serve_mode_predicts_like_the_in_process_model_and_owners_log_requests(tmp_path: Path) -> None:
    fed = _train_deployed(tmp_path)
    serve = ("--serve", "--serve-split", "train")
    with parties() as ps:
        coord = Party(fed, "server", args=("--split", APP, "--out", str(tmp_path / "server"), *serve))
        coord.expect("listening on port")
        owners = [Party(fed, n, args=("--split", APP, "--out", str(tmp_path / n), *serve)) for n in OWNERS]
        ps += [coord, *owners]
        assert coord.wait() == 0, coord.output()
        for p in owners:
            assert p.wait() == 0, p.output()
    got = serde.loads((tmp_path / "server" / "predictions.tsr").read_bytes())["predictions"]
    oracle = run_split_inprocess(SplitApp, label="server", owners=list(OWNERS), out=tmp_path / "sim")
    assert torch.equal(got, oracle.outputs("train", batch_size=1024))
    for o in OWNERS:  # each owner's request log: which rows, when, who asked
        log = [json.loads(line) for line in (tmp_path / o / "requests.jsonl").read_text().splitlines()]
        assert [e["rows"] for e in log] == [list(range(48))] and log[0]["by"] == "server" and log[0]["at"] > 0
