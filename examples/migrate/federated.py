"""The same script, federated: the rows now live at three hospitals that cannot pool them."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import tessera
from tessera.horizontal.strategies import FedAvg


def main(rounds: int = 10) -> float:
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.2, random_state=0)
    # Each party keeps its own rows (here: a split of the training set, as three organisations would hold).
    parts = np.array_split(np.arange(len(y_tr)), 3)
    xs, ys = [x_tr[p] for p in parts], [y_tr[p] for p in parts]

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    fl = tessera.FLModel(parties=["alice", "bob", "carol"], model=model, loss_fn=nn.CrossEntropyLoss(),
                         optimizer_fn=lambda params: torch.optim.SGD(params, lr=0.1), strategy=FedAvg(), seed=0)
    history = fl.fit(x=xs, y=ys, rounds=rounds, local_epochs=1, batch_size=32)
    acc = (fl.predict(x_te).argmax(1) == torch.tensor(y_te)).float().mean()
    print(f"federated accuracy after {len(history)} rounds: {acc:.3f}")
    return float(acc)


if __name__ == "__main__":
    main()
