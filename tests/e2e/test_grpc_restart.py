"""A DP-SGD job with a budget over loopback gRPC + mTLS, one client party killed (SIGKILL) and restarted twice.

alice trains round r, then dies on the evaluation request of round r (r = 1, 2: her privacy is spent, her process
is gone) and is restarted; the coordinator waits for her at the next round (`rejoin_wait_s`). The budget (6.0)
fits three rounds of 8 steps at q = 64/479 (epsilon 5.73) but not four (6.40).

- with `--state-dir`: each restarted alice continues her ledger from her state file, which at the end holds the
  same history as the coordinator's mirror;
- without it: each restarted alice starts from epsilon 0 and would train on, but the coordinator's own books stop
  her with the others;
- in both: three rounds are recorded, every recorded epsilon is within the budget, alice's equals the others'
  (no round of hers was lost from the books), and the run stops cleanly before round 4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tessera.horizontal.checkpoint import load_checkpoint
from tessera.horizontal.state_store import ClientStateStore
from tessera.privacy.ledger import Accountant, compute_epsilon
from tests.e2e.grpc_helpers import FAULT_ENV, Party, free_port, make_certs, parties, write_federation, write_job

pytestmark = pytest.mark.slow
BUDGET = 6.0
DP = ("\n[dp]\nmode = \"dpsgd\"\nnoise_multiplier = 1.0\nmax_grad_norm = 1.0\ndelta = 1e-5\nreproducible = true\n"
      f"budget = {BUDGET}\n")


@pytest.mark.parametrize("persist", [True, False], ids=["state_dir", "no_state_dir"])
def test_budget_holds_when_a_client_is_killed_and_restarted(tmp_path: Path, persist: bool) -> None:
    # Prepare
    make_certs(tmp_path / "certs", ("server", "alice", "bob", "carol"))
    fed = write_federation(tmp_path / "federation.toml", port=free_port(), extra="rejoin_wait_s = 60")
    job = write_job(tmp_path / "job.toml", out=tmp_path / "out", rounds=6)
    job.write_text(job.read_text() + DP)

    def client(name: str, fault: str | None = None) -> Party:
        args = ("--state-dir", str(tmp_path / "state" / name)) if persist else ()
        return Party(fed, name, job, args=args, env={FAULT_ENV: fault} if fault else None)

    # Execute: alice dies after training rounds 1 and 2; each time a fresh process replaces her
    with parties() as ps:
        coord = Party(fed, "server", job)
        ps.append(coord)
        coord.expect("listening on port")
        ps += [client("alice", "kill:EvaluateIns:1"), client("bob"), client("carol")]
        for r in (1, 2):
            assert ps[-3 if r == 1 else -1].wait() == -9  # SIGKILL, from the fault hook
            ps.append(client("alice", "kill:EvaluateIns:2" if r == 1 else None))
            if persist:
                ps[-1].expect("continues its state from")
        coord.expect("run stopped before round")
        assert coord.wait() == 0, coord.output()
        said = " ".join(coord.output().split())  # the console wraps long lines
        for p in (ps[-1], *[p for p in ps if p.name in ("bob", "carol")]):
            assert p.wait() == 0, p.output()

    # Assert: three rounds recorded, the fourth refused by the coordinator for all three (alice included)
    assert "run stopped before round 4" in said and "only 0 of the 3 sampled" in said
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(eps <= BUDGET for r in records for eps in r["epsilon"].values())
    mirror = load_checkpoint(tmp_path / "out")["extensions"]["dp"]["ledger"]["history"]
    (z, q, steps), = mirror["client0"]
    assert mirror == {c: [[z, q, steps]] for c in ("client0", "client1", "client2")} and steps == 24
    assert records[-1]["epsilon"]["client0"] == pytest.approx(
        compute_epsilon(Accountant.RDP, [(z, q, steps)], 1e-5), abs=1e-12)
    assert compute_epsilon(Accountant.RDP, [(z, q, steps + 8)], 1e-5) > BUDGET  # why round 4 was refused
    if persist:  # alice's own books continued through both restarts: they hold what the coordinator holds
        state = ClientStateStore(tmp_path / "state" / "alice").load("client0")
        assert state is not None and state["dp"]["ledger"]["history"] == {"client0": [[z, q, steps]]}
    else:
        assert not (tmp_path / "state").exists()
