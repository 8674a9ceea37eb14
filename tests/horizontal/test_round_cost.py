"""What a round costs beyond a plain loop, cut without changing an answer: the dry run runs the forward pass once
per model structure and batch shape (a mismatching party still fails), the NaN/Inf check of a reply is one sum,
and the float64 fold and server step widen chunk by chunk with the same bits as torch's mixed-dtype kernels."""

import pytest
import torch
from torch import nn

from tessera.core.errors import ConfigError, ShapeMismatch
from tessera.core.types import is_finite
from tessera.horizontal import checks
from tessera.horizontal.checks import dry_run
from tessera.horizontal.strategies import base
from tessera.horizontal.strategies.base import add_rounded, fold_wide, sub_wide


class Counted(nn.Module):
    def __init__(self, features: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(features, classes)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out: torch.Tensor = self.fc(x)
        return out


def _batch(rows: int = 8, features: int = 5, top: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, features, generator=g), torch.randint(0, top + 1, (rows,), generator=g))]


def test_the_forward_runs_once_per_structure_and_shape_yet_every_party_is_checked() -> None:
    checks._PASSED.clear()
    model, loss = Counted(), nn.CrossEntropyLoss()
    first = dry_run(model, _batch(), party="alice", loss_fn=loss)
    again = dry_run(Counted(), _batch(seed=1), party="bob", loss_fn=loss)  # another instance, same structure
    assert model.calls == 1 and first is not None and again is not None
    assert again.output_shape == first.output_shape == (8, 3)
    bad = _batch(seed=2)
    bad[0][1][-1] = 7  # labels beyond the class count: refused on the cached path too
    with pytest.raises(ShapeMismatch, match=r"party 'carol'.*labels run from 0 to 7.*3 logits"):
        dry_run(model, bad, party="carol", loss_fn=loss)
    nan = _batch(seed=3)
    nan[0][0][0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"party 'dan'.*x holds NaN/inf"):
        dry_run(model, nan, party="dan", loss_fn=loss)
    with pytest.raises(ShapeMismatch, match=r"party 'erin'.*x of shape \[8, 4\].*in_features=5"):
        dry_run(model, _batch(features=4), party="erin", loss_fn=loss)  # other shapes: the forward runs again
    with pytest.raises(ShapeMismatch, match=r"party 'fay'.*x of shape \[8, 5\].*in_features=6"):
        dry_run(Counted(features=6), _batch(), party="fay", loss_fn=loss)  # another structure
    assert model.calls == 2  # alice's pass and erin's failed one


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_one_sum_finite_check_agrees_with_the_elementwise_one(dtype: torch.dtype) -> None:
    big = torch.full((64,), torch.finfo(dtype).max, dtype=dtype)  # finite, but its sum overflows
    cases = [torch.randn(10).to(dtype), big, torch.empty(0, dtype=dtype), torch.arange(5)]
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(10).to(dtype)
        t[3] = bad
        cases.append(t)
    both = torch.randn(4).to(dtype)
    both[0], both[1] = float("inf"), float("-inf")
    cases.append(both)
    for t in cases:
        elementwise = bool(torch.isfinite(t).all())
        assert is_finite({"a": torch.zeros(2), "t": t}) == elementwise


@pytest.mark.parametrize("n", [1, 999, 1000, 1001, 4321])
def test_chunked_widening_gives_the_bits_of_the_mixed_dtype_kernels(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "WIDE_CHUNK", 1000)
    monkeypatch.setattr(base, "WIDE_DIRECT", 0)  # the chunked path even for these small tensors
    g = torch.Generator().manual_seed(n)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = (torch.randn(n, generator=g) * 100).to(dtype).reshape(-1, 1)
        acc = torch.randn(n, 1, dtype=torch.float64, generator=g)
        assert torch.equal(acc.clone().add_(x, alpha=0.37), fold_wide(acc.clone(), x, 0.37))
        assert torch.equal(acc.clone().sub_(x), sub_wide(acc.clone(), x))
        assert torch.equal(torch.add(acc, x, out=torch.empty_like(x)), add_rounded(acc, x))


def _masked_reference(y: torch.Tensor, classes: int, ignore_index: int) -> bool:
    """The label check before its one-reduction path: refused iff a label not ignored is outside [0, classes)."""
    valid = y[y != ignore_index]
    return bool(valid.numel() and (valid.min() < 0 or valid.max() >= classes))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_the_label_range_check_refuses_exactly_what_the_masked_check_refused(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    out = torch.zeros(6, 4)
    seen = set()
    for trial in range(300):
        ignore = -100 if trial % 2 else 2  # the default ignore_index, and one that is a real class
        y = torch.randint(0, 4, (6,), generator=g)
        odd = [4, 5, 255] if dtype is torch.uint8 else [-100, -100, -1, 4, 5]  # ignored or out of range
        for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
            y[int(torch.randint(0, 6, (1,), generator=g))] = odd[int(torch.randint(0, len(odd), (1,), generator=g))]
        y = y.to(dtype)
        refused = _masked_reference(y, 4, ignore)
        seen.add(refused)
        loss = nn.CrossEntropyLoss(ignore_index=ignore)
        if refused:
            with pytest.raises(ShapeMismatch, match="labels run from"):
                checks._check_targets(loss, out, y, None, "p")
        else:
            checks._check_targets(loss, out, y, None, "p")
    assert seen == {True, False}
