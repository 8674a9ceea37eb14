"""`[dp]` in job.toml: each mode builds its plugin; bad keys and values are refused with the key named."""

from typing import Any

import pytest

from tessera.cli.jobs import build_plugins
from tessera.core.config import JobConfig, validate
from tessera.core.errors import ConfigError
from tessera.privacy import DPSGD, ClientLevelDP, plugin


def test_dpsgd_and_client_modes_build_their_plugins() -> None:
    p = plugin({"noise_multiplier": 1.1, "max_grad_norm": 0.5, "budget": 3.0, "clipping": "per_layer"})
    assert isinstance(p, DPSGD)
    assert (p.config.noise_multiplier, p.config.max_grad_norm, p.ledger.budget, p.config.clipping) == \
        (1.1, 0.5, 3.0, "per_layer")
    t = plugin({"mode": "dpsgd", "target_epsilon": 2.0, "planned_rounds": 10, "accountant": "prv"})
    assert isinstance(t, DPSGD) and t.ledger.budget == 2.0 and t.ledger.accountant.value == "prv"
    c = plugin({"mode": "client", "clip": 0.5, "noise_multiplier": 1.0, "kind": "distributed", "delta": 1e-6})
    assert isinstance(c, ClientLevelDP) and (c.clip, c.z, c.mode, c.ledger.delta) == (0.5, 1.0, "distributed", 1e-6)


def test_job_toml_dp_section_reaches_build_plugins() -> None:
    cfg = validate(JobConfig, {"dp": {"mode": "client", "clip": 1.0, "noise_multiplier": 0.5}}, source="job.toml")
    (p,) = build_plugins(cfg)
    assert isinstance(p, ClientLevelDP)


@pytest.mark.parametrize(("spec", "match"), [
    ({"noise_multiplier": 1.0, "nosie": 2}, "dp: nosie: unknown key"),
    ({"noise_multiplier": -1.0}, "dp: noise_multiplier"),
    ({"noise_multiplier": 1.0, "max_grad_norm": 0}, "dp: max_grad_norm"),
    ({"noise_multiplier": 1.0, "delta": 2.0}, "dp: delta"),
    ({"noise_multiplier": 1.0, "accountant": "moments"}, "dp: accountant"),
    ({"noise_multiplier": 1.0, "clipping": "adaptive"}, "dp: clipping"),
    ({"mode": "sample"}, "dp.mode: unknown mode 'sample'"),
    ({}, "exactly one of noise_multiplier and target_epsilon"),
    ({"noise_multiplier": 1.0, "target_epsilon": 3.0}, "exactly one"),
    ({"target_epsilon": 3.0}, "dp.planned_rounds"),
    ({"noise_multiplier": 0.0, "budget": 3.0}, "no privacy"),
    ({"mode": "client", "noise_multiplier": 1.0}, "dp: clip"),
    ({"mode": "client", "clip": 1.0, "noise_multiplier": 1.0, "kind": "local"}, "dp: kind"),
    ({"mode": "client", "clip": 1.0, "noise_multiplier": 1.0, "max_grad_norm": 1.0}, "dp: max_grad_norm: unknown"),
])
def test_bad_dp_keys_are_refused_naming_the_key(spec: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        plugin(spec)
