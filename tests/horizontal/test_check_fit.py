"""check_fit's finiteness check (`core.types.is_finite`: one fused norm call, the exact check per tensor where a
norm is not finite) answers exactly as the elementwise reference."""

import torch

from tessera.core.types import is_finite
from tessera.horizontal.aggregation import check_fit
from tessera.runtime.backend import FailureKind
from tessera.runtime.messages import FitRes

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool]


def _random_params(g: torch.Generator, trial: int) -> dict[str, torch.Tensor]:
    params = {}
    for i in range(int(torch.randint(0, 5, (1,), generator=g))):
        dtype = _DTYPES[int(torch.randint(0, len(_DTYPES), (1,), generator=g))]
        rows = int(torch.randint(0, 6, (1,), generator=g))
        magnitude = 10.0 ** int(torch.randint(0, 40, (1,), generator=g))  # up to overflowing norms and casts
        t = (torch.randn(rows, 3, generator=g) * magnitude).to(dtype)
        if t.is_floating_point() and t.numel() and float(torch.rand(1, generator=g)) < 0.2:
            t.view(-1)[int(torch.randint(0, t.numel(), (1,), generator=g))] = (float("nan"), float("inf"),
                                                                                 -float("inf"))[trial % 3]
        params[f"k{i}"] = t.t() if float(torch.rand(1, generator=g)) < 0.3 else t  # some not contiguous
    return params


def _reference(params: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in params.values() if t.is_floating_point())


def test_is_finite_equals_the_elementwise_reference_on_random_params() -> None:
    g = torch.Generator().manual_seed(0)
    answers = set()
    for trial in range(2000):
        params = _random_params(g, trial)
        answers.add(want := _reference(params))
        assert is_finite(params) is want, params
    assert answers == {True, False}


def test_a_finite_tensor_whose_norm_overflows_is_finite_and_a_lone_nan_is_not() -> None:
    big = torch.full((4,), 3e38)  # finite elements, the norm overflows float32: the exact check answers
    assert is_finite({"w": big}) and _reference({"w": big})
    half = torch.full((10,), 60000.0, dtype=torch.float16)
    assert is_finite({"h": half})
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.zeros(1000)
        t[617] = bad
        assert not is_finite({"a": torch.ones(3), "b": t})
    assert is_finite({}) and is_finite({"i": torch.arange(3), "e": torch.empty(0)})


def test_check_fit_rejects_a_non_finite_update() -> None:
    current = {"w": torch.zeros(2, 2)}
    bad = FitRes(params={"w": torch.tensor([[0.0, float("nan")], [0.0, 0.0]])}, num_examples=3)
    failure = check_fit("c0", bad, current)
    assert failure is not None and failure.kind is FailureKind.REJECTED and "NaN" in failure.reason
    assert check_fit("c0", FitRes(params={"w": torch.ones(2, 2)}, num_examples=3), current) is None
