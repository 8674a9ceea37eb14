"""split_sequential and the fuse modules against the unsplit model's own outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tessera.core.errors import ConfigError
from tessera.core.models import MLP
from tessera.vertical import ConcatFuse, SplitModel, SumFuse, split_sequential


def test_split_sequential_recomposes_to_the_original_model() -> None:
    model = MLP(30, 2, hidden=(16, 8))
    x = torch.randn(5, 30)
    base, fuse = split_sequential(model, at="act0")
    assert [n for n, _ in base.named_children()] == ["fc0", "act0"]
    assert [n for n, _ in fuse.head.named_children()] == ["fc1", "act1", "fc2"]
    torch.testing.assert_close(fuse([base(x)]), model(x), rtol=0, atol=0)
    assert base.fc0.weight is not model.fc0.weight  # deep copies: training the split leaves the original alone


def test_split_sequential_refusals() -> None:
    with pytest.raises(ConfigError, match=r"choose one of \['fc0', 'act0', 'fc1'\]"):
        split_sequential(MLP(4, 2, hidden=(3,)), at="fc9")
    with pytest.raises(ConfigError, match="last layer"):
        split_sequential(MLP(4, 2, hidden=(3,)), at="fc1")
    with pytest.raises(ConfigError, match=r"needs an nn\.Sequential"):
        split_sequential(nn.Linear(3, 2), at="x")


def test_fuse_modules_and_split_model_forward() -> None:
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    head = nn.Linear(8, 1)
    torch.testing.assert_close(ConcatFuse(head)([a, b]), head(torch.cat([a, b], 1)))
    torch.testing.assert_close(SumFuse()([a, b]), a + b)
    model = SplitModel({"bob": nn.Identity(), "carol": nn.Identity()}, "sum", label_party="alice")
    assert model.parties == ["bob", "carol", "alice"] and model.owners == ["bob", "carol"]
    torch.testing.assert_close(model({"bob": a, "carol": b}), a + b)
    with pytest.raises(ConfigError, match="needs a head"):
        SplitModel({"bob": nn.Identity()}, "concat", label_party="alice")
