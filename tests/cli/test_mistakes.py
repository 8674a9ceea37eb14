"""The mistakes table: each bad input a user can give the `tessera` command, run through the real CLI in a
subprocess. Oracle for every row: exit code 2, exactly ONE line on stderr that contains the named key, flag or
file, no traceback, and no file of an existing finished run changed. docs/troubleshooting.md lists the same
messages (checked below), so the doc cannot drift from what the CLI says.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tessera.runtime.grpc.certs import init_ca, issue

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "troubleshooting.md"

JOB = """[job]
name = "mistakes"
rounds = 1
seed = 3
output_dir = "{out}"
tensorboard = true

[data]
dataset = "digits"
num_clients = 2
partition = "iid"

[model]
name = "mlp"
hidden = [8]

[train]
local_epochs = 1
batch_size = 128
lr = 0.1

[strategy]
name = "fedavg"
"""

FED = """[federation]
ca_cert = "certs/ca.crt"
certs_dir = "certs"
round_deadline_s = 30
quorum_deadline_s = 30

[federation.retry]
max_attempts = 3
initial_backoff_s = 0.1
max_backoff_s = 0.2

[[parties]]
name = "server"
role = "coordinator"
address = "127.0.0.1:{port}"
{server_extra}
[[parties]]
name = "alice"
role = "client"

[[parties]]
name = "bob"
role = "client"
"""


def cli(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    env.pop("TESSERA_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "tessera", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class World:
    """Built once per module: certificates, a finished 1-round run (with TensorBoard on), federation files."""

    root: Path
    run: Path  # the finished run's folder: job.toml and out/
    busy_port: int
    busy: socket.socket
    files: dict[str, str] = field(default_factory=dict)

    def fill(self, text: str, tmp: Path) -> str:
        return text.format(run=self.run, root=self.root, tmp=tmp, busy_port=self.busy_port)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("world")
    certs = root / "certs"
    init_ca(certs)
    for name in ("server", "alice", "bob"):
        issue(certs, name)
    (root / "fed.toml").write_text(FED.format(port=free_port(), server_extra=""))
    (root / "badkey.toml").write_text(FED.format(port=free_port(), server_extra='key = "certs/alice.key"'))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()  # "another program" holding the port
    port = int(busy.getsockname()[1])
    (root / "busy.toml").write_text(FED.format(port=port, server_extra=""))
    run = root / "run"
    run.mkdir()
    (run / "job.toml").write_text(JOB.format(out=(run / "out").as_posix()))
    r = cli(["simulate", str(run / "job.toml")], root)
    assert r.returncode == 0, r.stderr
    try:
        yield World(root, run, port, busy)
    finally:
        busy.close()


def job_text(tmp: Path, *, replace: tuple[tuple[str, str], ...] = ()) -> str:
    text = JOB.format(out=(tmp / "out").as_posix())
    for old, new in replace:
        assert old in text, old
        text = text.replace(old, new)
    return text


@dataclass(frozen=True)
class Mistake:
    id: str
    args: tuple[str, ...]  # {run}, {root}, {tmp}, {busy_port} are filled in
    needles: tuple[str, ...]  # each must be in the one stderr line; the first is the message docs list
    job: tuple[tuple[str, str], ...] | None = None  # write {tmp}/job.toml with these replacements
    files: tuple[tuple[str, str], ...] = ()  # extra files under {tmp}
    cwd: str = "{tmp}"


PARTY = ("party", "--federation", "{root}/fed.toml", "--name", "server")
SPLIT = ("split-simulate", "tests.e2e.grpc_helpers:SplitApp", "--label", "server", "--owner", "alice", "--owner", "bob",
         "--out", "{tmp}/split")
LOADER = "import numpy as np\n\ndef load():\n    return np.zeros((20, 4), np.float32), np.arange(20) % 2\n"

MISTAKES = [
    # runs are never overwritten or silently mixed
    Mistake("simulate-finished-run", ("simulate", "{run}/job.toml"), ("already holds a run", "--resume",
                                                                      "--overwrite", "job.output_dir")),
    Mistake("simulate-resume-without-checkpoint", ("simulate", "{tmp}/job.toml", "--resume"),
            ("--resume: no checkpoint",), job=()),
    Mistake("resume-and-overwrite", ("simulate", "{run}/job.toml", "--resume", "--overwrite"),
            ("--resume and --overwrite: choose one",)),
    Mistake("party-finished-run", (*PARTY, "--job", "{run}/job.toml"), ("already holds a run", "--overwrite")),
    Mistake("party-resume-without-checkpoint", (*PARTY, "--job", "{tmp}/job.toml", "--resume"),
            ("--resume: no checkpoint",), job=()),
    Mistake("split-finished-run", SPLIT, ("already holds a run", "--out"),
            files=(("split/server/metrics.jsonl", '{"epoch": 1}\n'),)),
    Mistake("split-resume-without-checkpoint", (*SPLIT, "--resume"), ("--resume: no checkpoint",)),
    # ports
    Mistake("busy-port", ("party", "--federation", "{root}/busy.toml", "--name", "server", "--job", "{tmp}/job.toml"),
            ("is in use by another process", "port {busy_port}"), job=()),
    # the model does not fit the data
    Mistake("model-shape", ("simulate", "{tmp}/job.toml"), ("does not fit [data]", "[model]", "in_features=64"),
            job=(('name = "mlp"\nhidden = [8]', 'name = "torch.nn:Linear"\nkwargs = {in_features = 5, '
                                                'out_features = 10}'),)),
    Mistake("class-count", ("simulate", "{tmp}/job.toml"), ("logits per row", "[model]"),
            job=(('name = "mlp"\nhidden = [8]', 'name = "torch.nn:Linear"\nkwargs = {in_features = 64, '
                                                'out_features = 3}'),)),
    Mistake("party-model-shape", (*PARTY[:4], "alice", "--job", "{tmp}/job.toml"), ("does not fit [data]",),
            job=(('name = "mlp"\nhidden = [8]', 'name = "torch.nn:Linear"\nkwargs = {in_features = 5, '
                                                'out_features = 10}'),)),
    # data loaders next to job.toml (imported from the job's folder, whatever the working directory)
    Mistake("loader-missing-function", ("simulate", "{tmp}/job.toml"), ("has no 'nosuch'", "data.dataset"),
            job=(('dataset = "digits"', 'dataset = "mydata:nosuch"'),), files=(("mydata.py", LOADER),),
            cwd="{root}"),
    Mistake("loader-missing-module", ("simulate", "{tmp}/job.toml"), ("no module 'nodata'", "data.dataset"),
            job=(('dataset = "digits"', 'dataset = "nodata:load"'),)),
    # certificates
    Mistake("key-not-the-certificate", ("party", "--federation", "{root}/badkey.toml", "--name", "server", "--job",
                                        "{tmp}/job.toml"), ("does not match the certificate", "alice.key"), job=()),
    # files that do not exist
    Mistake("plot-missing-metrics", ("plot", "nosuch.jsonl"), ("nosuch.jsonl: no such file",)),
    Mistake("scale-report-missing-metrics", ("scale-report", "nosuch.jsonl"), ("nosuch.jsonl: no such file",)),
    Mistake("dp-plot-missing-metrics", ("dp-plot", "nosuch.jsonl"), ("nosuch.jsonl: no such file",)),
    Mistake("dp-plot-not-a-dp-run", ("dp-plot", "{run}/out/metrics.jsonl"), ("no round has an 'epsilon' record",)),
    Mistake("lora-missing-path", ("lora", "--arch", "local", "--path", "nosuch"), ("--path nosuch: does not exist",)),
    Mistake("lora-local-without-path", ("lora", "--arch", "local"), ("--arch local needs --path",)),
    Mistake("lora-unknown-arch", ("lora", "--arch", "gpt9"), ("--arch gpt9: unknown architecture",)),
    Mistake("verify-missing-bundle", ("verify", "nosuch"), ("bundle nosuch does not exist",)),
    Mistake("missing-federation", (*PARTY[:2], "nofed.toml", *PARTY[3:], "--job", "{run}/job.toml"),
            ("--federation nofed.toml: no such file", "federation.toml")),
    Mistake("missing-job", ("simulate", "nojob.toml"), ("nojob.toml: no such file", "job.toml")),
    Mistake("export-before-training", ("export", "{tmp}/job.toml", "--out", "{tmp}/bundle"),
            ("checkpoint.tsr does not exist",), job=()),
    # job.toml keys
    Mistake("near-miss-key", ("simulate", "{tmp}/job.toml"), ("train.local_epoch: unknown key",
                                                              "did you mean 'local_epochs'?"),
            job=(("local_epochs = 1", "local_epoch = 1"),)),
    Mistake("top-level-key", ("simulate", "{tmp}/job.toml"), ("rounds: a key of [job]", "move it under [job]"),
            job=(("[job]", "rounds = 3\n[job]"),)),
    Mistake("bad-value", ("simulate", "{tmp}/job.toml"), ("job.rounds:", "greater than or equal to 1"),
            job=(("rounds = 1", "rounds = 0"),)),
    Mistake("invalid-toml", ("simulate", "{tmp}/job.toml"), ("not valid TOML",), job=(("[train]", "[train"),)),
    # flags
    Mistake("unknown-flag", ("simulate", "{run}/job.toml", "--round", "3"), ("No such option: --round",)),
]


@pytest.mark.parametrize("m", MISTAKES, ids=[m.id for m in MISTAKES])
def test_a_mistake_is_one_line_naming_the_fix(world: World, tmp_path: Path, m: Mistake) -> None:
    if m.job is not None:
        (tmp_path / "job.toml").write_text(job_text(tmp_path, replace=m.job))
    for name, text in m.files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = snapshot(world.run)
    r = cli([world.fill(a, tmp_path) for a in m.args], Path(world.fill(m.cwd, tmp_path)))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, r.stderr
    for needle in m.needles:
        assert world.fill(needle, tmp_path) in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert snapshot(world.run) == before
    assert not (tmp_path / "out" / "checkpoint.tsr").exists()  # nothing was trained


def test_debug_shows_the_traceback_behind_the_line(tmp_path: Path) -> None:
    r = cli(["--debug", "plot", "nosuch.jsonl"], tmp_path)
    assert r.returncode == 2 and "Traceback" in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error:")


def test_the_finished_run_has_tensorboard_events(world: World) -> None:
    assert list((world.run / "out" / "tensorboard").glob("events.out.tfevents.*"))


def test_missing_sections_are_named_and_print_config_shows_their_defaults(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[job]\nrounds = 2\noutput_dir = "out"\n')
    r = cli(["simulate", str(job), "--print-config"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "has no [data], [model], [train], [strategy]: the defaults below" in r.stdout
    assert '[data]\ndataset = "digits"\nnum_clients = 10' in r.stdout and "rounds = 2" in r.stdout
    assert not (tmp_path / "out").exists()


def test_the_example_job_lists_every_default_of_a_missing_section() -> None:
    """examples/hfl/job.toml's comments carry every key and default of every section (what --print-config shows
    for a job that leaves them out)."""
    from tessera.core.config import JobConfig, to_toml

    example = (ROOT / "examples" / "hfl" / "job.toml").read_text()
    for line in to_toml(JobConfig()).splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition(" = ")
            assert re.search(rf"#.*\b{key} = {re.escape(value)}", example), line


def _coordinator(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tessera", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_listening(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    seen = []
    for line in p.stdout:  # bounded: the process ends (and the pipe closes) if it cannot listen
        seen.append(line)
        if "listening on port" in line:
            return "".join(seen)
    raise AssertionError("".join(seen))


@pytest.mark.slow
def test_a_stray_resumed_coordinator_leaves_a_finished_run_byte_for_byte(world: World, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    job = run / "job.toml"
    job.write_text(job.read_text().replace(str(world.run), str(run)))
    (tmp_path / "certs").symlink_to(world.root / "certs")
    shutil.copy(world.root / "fed.toml", tmp_path / "fed.toml")
    before = snapshot(run / "out")
    p = _coordinator(["party", "--federation", "fed.toml", "--name", "server", "--job", str(job), "--resume"],
                     tmp_path)
    try:
        _wait_listening(p)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
    finally:
        p.kill()
    assert snapshot(run / "out") == before


@pytest.mark.slow
def test_two_coordinators_on_one_port_the_second_refuses(world: World, tmp_path: Path) -> None:
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    for d in (first_dir, second_dir):
        d.mkdir()
        (d / "job.toml").write_text(job_text(d))
    args = ["party", "--federation", str(world.root / "fed.toml"), "--name", "server", "--job"]
    p = _coordinator([*args, str(first_dir / "job.toml")], world.root)
    try:
        _wait_listening(p)
        r = cli([*args, str(second_dir / "job.toml")], world.root)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        port = re.search(r":(\d+)", (world.root / "fed.toml").read_text().split("address")[1])
        assert port is not None and f"port {port.group(1)}" in r.stderr and "is in use" in r.stderr
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
    finally:
        p.kill()
    assert not (first_dir / "out" / "checkpoint.tsr").exists()  # a start and stop wrote no round-0 run
    assert not (second_dir / "out").exists() or not any((second_dir / "out").iterdir())


def _doc_messages() -> list[str]:
    """The message column of the table in docs/troubleshooting.md (the first backticked text of each row)."""
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| `")]
    return [re.match(r"\| `([^`]+)`", line).group(1) for line in rows]  # type: ignore[union-attr]


def test_troubleshooting_lists_every_message_of_the_table_and_nothing_else() -> None:
    documented = _doc_messages()
    wanted = {re.sub(r"\{[a-z_]+\}", "", m.needles[0]) for m in MISTAKES}
    missing = [w for w in wanted if not any(w in d or d in w for d in documented)]
    assert not missing, f"add these messages to {DOC}: {missing}"
    stale = [d for d in documented if not any(w in d or d in w for w in wanted)]
    assert not stale, f"{DOC} lists messages no mistake produces: {stale}"
