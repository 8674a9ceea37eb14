"""SecAgg+ over the Ray backend: client state travels with each request between the actor pool and the driver's
store, so the four stages run unchanged; the result is identical to the in-process run (same seeds)."""

import pytest

from tessera.horizontal.simulation import simulate
from tessera.horizontal.strategies import FedAvg
from tessera.secagg import SecAggPlus
from tests.fixtures import digits_job


@pytest.mark.slow
def test_secagg_over_ray_equals_inprocess(ray_cluster: None) -> None:
    pytest.importorskip("ray")

    def run(backend: str) -> tuple:  # type: ignore[type-arg]
        parts = digits_job(FedAvg(fraction_evaluate=0.0, min_available=2), num_clients=4, dropout=0.25)
        return simulate(parts, rounds=2, seed=0, plugins=[SecAggPlus()], backend=backend)

    h0, p0 = run("inprocess")
    h1, p1 = run("ray")
    assert all(float((p0[k] - p1[k]).abs().max()) == 0.0 for k in p0)  # same quantisation seeds, same sum
    assert [r["secagg"] for r in h1.records] == [r["secagg"] for r in h0.records]
    assert all(r["secagg"]["masks_rebuilt_for"] == 1 for r in h1.records)  # one client dropped mid-round
