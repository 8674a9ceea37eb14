"""DP-SGD on the Ray backend: client ledgers follow clients from actor to actor (driver-side client state), so
epsilon and params equal the in-process run's."""


import pytest
import torch

from tessera.horizontal.simulation import simulate
from tessera.privacy import DPSGD

from .helpers import make_parts

pytestmark = pytest.mark.slow


def test_dpsgd_on_ray_equals_in_process(ray_cluster: None) -> None:
    ray_runtime = pytest.importorskip("tessera.runtime.ray")
    local, local_params = simulate(make_parts(), rounds=3, seed=0,
                                   plugins=[DPSGD(noise_multiplier=1.3, reproducible=True)])
    with ray_runtime.ray_session(num_cpus=2, object_store_memory="100MiB"):
        remote, remote_params = simulate(make_parts(), rounds=3, seed=0, backend="ray",
                                         backend_options={"num_actors": 2},
                                         plugins=[DPSGD(noise_multiplier=1.3, reproducible=True)])
    assert [r["epsilon"] for r in remote] == [r["epsilon"] for r in local]
    assert all(torch.equal(remote_params[k], v) for k, v in local_params.items())
