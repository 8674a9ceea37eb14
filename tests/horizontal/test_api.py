"""FLModel: the array API is a thin layer over the same engine (same result as simulate)."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import tessera
from tessera.core.errors import ConfigError
from tessera.core.models import MLP
from tessera.horizontal.simulation import JobParts, simulate
from tessera.horizontal.strategies import FedAvg

from .helpers import make_data, make_task


def test_flmodel_equals_the_task_engine_and_accepts_numpy_and_pandas() -> None:
    data = make_data(num_clients=2)
    torch.manual_seed(0)
    fl = tessera.FLModel(parties=["c0", "c1"], model=MLP(5, 3, (8,)), loss_fn=nn.CrossEntropyLoss(),
                         optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1), seed=0)
    xs = [data["c0"][0].numpy(), pd.DataFrame(data["c1"][0].numpy())]
    ys = [data["c0"][1].numpy(), pd.Series(data["c1"][1].numpy())]
    history = fl.fit(x=xs, y=ys, rounds=3, batch_size=8)
    _, ref = simulate(JobParts(task=make_task(data), strategy=FedAvg(fraction_evaluate=0.0), clients=["c0", "c1"]),
                      rounds=3, seed=0)
    got = fl.model.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert len(history) == 3
    out = fl.predict(np.concatenate([xs[0], xs[0]]))
    assert out.shape == (2 * len(xs[0]), 3)
    ev = fl.evaluate(x=[xs[0], xs[0]], y=[ys[0], ys[0]])
    assert ev["parties"]["c0"]["accuracy"] == pytest.approx(ev["accuracy"])


def test_fit_continues_round_numbering() -> None:
    data = make_data(num_clients=2)
    fl = tessera.FLModel(parties=["a", "b"], model=MLP(5, 3, (8,)), loss_fn=nn.CrossEntropyLoss(),
                         optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1))
    x, y = [d[0] for d in data.values()], [d[1] for d in data.values()]
    fl.fit(x=x, y=y, rounds=2)
    assert [r["round"] for r in fl.fit(x=x, y=y, rounds=2)] == [3, 4]


def test_bad_arrays_are_refused_with_the_fix() -> None:
    fl = tessera.FLModel(parties=["a", "b"], model=MLP(5, 3), loss_fn=nn.CrossEntropyLoss(),
                         optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1))
    x = np.zeros((4, 5), np.float32)
    with pytest.raises(ConfigError, match="one array per party"):
        fl.fit(x=[x], y=[np.zeros(4)], rounds=1)
    with pytest.raises(ConfigError, match="labels"):
        fl.fit(x=[x, x], y=[np.zeros(4, np.int64), np.zeros(3, np.int64)], rounds=1)
    with pytest.raises(ConfigError, match="unique"):
        tessera.FLModel(parties=["a", "a"], model=MLP(5, 3), loss_fn=nn.CrossEntropyLoss(),
                        optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1))
