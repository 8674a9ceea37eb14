"""Oracle: FedAvg over one full-batch SGD step per client equals one centralised full-batch step on the union."""

import torch
from torch import nn

from tessera.core.models import MLP
from tessera.core.types import get_params
from tessera.horizontal.simulation import JobParts, simulate
from tessera.horizontal.strategies import FedAvg

from .helpers import make_data, make_task


def test_fedsgd_equals_centralised_full_batch_step() -> None:
    data = make_data(num_clients=4, rows=20)
    big = max(len(y) for _, y in data.values())
    task = make_task(data, batch_size=big, lr=0.5, shuffle=False)
    strategy = FedAvg(local_config={"local_epochs": 1}, fraction_evaluate=0.0)
    history, fed = simulate(JobParts(task=task, strategy=strategy, clients=list(data)), rounds=1, seed=3)

    torch.manual_seed(3)  # simulate() builds the initial global model under the job seed
    model = MLP(5, 3, (8,))
    initial = get_params(model)
    x = torch.cat([d[0] for d in data.values()])
    y = torch.cat([d[1] for d in data.values()])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    nn.CrossEntropyLoss()(model(x), y).backward()  # mean over the union = example-weighted mean of client means
    opt.step()
    central = get_params(model)

    for k in central:
        assert torch.allclose(fed[k], central[k], atol=1e-6, rtol=0), k
    assert (fed["fc0.weight"] - initial["fc0.weight"]).abs().max() > 1e-3  # a real step was taken
    assert history.last["clients_succeeded"] == 4
