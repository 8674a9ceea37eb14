"""A checkpoint that decodes but has the wrong structure is refused with a ConfigError naming the file and the fix,
never a KeyError/TypeError traceback from half-way through loading it."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tessera.core import serde
from tessera.core.errors import ConfigError
from tessera.horizontal.server import CHECKPOINT
from tessera.horizontal.simulation import simulate
from tessera.horizontal.strategies import FedAdam
from tessera.privacy import DPSGD

from .helpers import make_parts


def _drop(key: str) -> Callable[[dict[str, Any]], Any]:
    def f(s: dict[str, Any]) -> Any:
        del s[key]
        return s
    return f


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    def f(s: dict[str, Any]) -> Any:
        s[key] = value
        return s
    return f


def _reshape_first(s: dict[str, Any]) -> Any:
    name = next(iter(s["params"]))
    s["params"][name] = torch.zeros(7, 3)
    return s


def _drop_param(s: dict[str, Any]) -> Any:
    s["params"].pop(next(iter(s["params"])))
    return s


def _strategy_moments_missing(s: dict[str, Any]) -> Any:
    s["strategy"] = {"nonsense": 1}
    return s


def _dp_ledger_wrong(s: dict[str, Any]) -> Any:
    s["extensions"]["dp"]["ledger"] = {"accountant": "rdp"}
    return s


def _dp_not_a_map(s: dict[str, Any]) -> Any:
    s["extensions"]["dp"] = [1, 2]
    return s


MALFORMED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "not_a_map": lambda s: [s["round"]],
    "missing_params": _drop("params"),
    "missing_round": _drop("round"),
    "missing_extensions": _drop("extensions"),
    "round_is_text": _set("round", "two"),
    "round_is_bool": _set("round", True),
    "params_is_list": _set("params", [1, 2]),
    "params_holds_numbers": _set("params", {"w": 1.0}),
    "history_is_map": _set("history", {"a": 1}),
    "history_holds_numbers": _set("history", [1, 2]),
    "strategy_is_text": _set("strategy", "adam"),
    "scheduling_is_list": _set("scheduling", []),
    "negative_round": _set("round", -1),
    "params_wrong_shape": _reshape_first,
    "params_missing_tensor": _drop_param,
    "strategy_state_malformed": _strategy_moments_missing,
    "dp_ledger_malformed": _dp_ledger_wrong,
    "dp_section_not_a_map": _dp_not_a_map,
}


def run(out: Path, *, resume: bool = False) -> None:
    simulate(make_parts(FedAdam(eta=0.05)), rounds=2, seed=3, output_dir=out, resume=resume,
             plugins=[DPSGD(noise_multiplier=1.0, reproducible=True)])


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("good")
    run(out)
    return (out / CHECKPOINT).read_bytes()


@pytest.mark.parametrize("shape", list(MALFORMED))
def test_a_checkpoint_of_the_wrong_structure_is_a_config_error_naming_the_file(
        tmp_path: Path, written: bytes, shape: str) -> None:
    # Prepare: a real checkpoint (FedAdam moments, a DP ledger), decoded, damaged, re-encoded: it still decodes
    state = serde.loads(written)
    (tmp_path / CHECKPOINT).write_bytes(serde.dumps(MALFORMED[shape](state)))
    # Execute / Assert: one ConfigError that names the file and says what to do
    with pytest.raises(ConfigError) as info:
        run(tmp_path, resume=True)
    assert str(tmp_path / CHECKPOINT) in str(info.value)
    assert "fresh output_dir" in str(info.value)


def test_the_untouched_checkpoint_still_resumes(tmp_path: Path, written: bytes) -> None:
    (tmp_path / CHECKPOINT).write_bytes(serde.dumps(serde.loads(written)))
    run(tmp_path, resume=True)  # the oracle for the test above: only the damage makes it fail
