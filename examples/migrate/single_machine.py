"""A typical single-machine PyTorch script: digits, an MLP, SGD. (The starting point of the migration.)"""

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main(epochs: int = 10) -> float:
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.2, random_state=0)
    train = DataLoader(TensorDataset(torch.tensor(x_tr, dtype=torch.float32), torch.tensor(y_tr)), batch_size=32,
                       shuffle=True)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(epochs):
        for xb, yb in train:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(torch.tensor(x_te, dtype=torch.float32)).argmax(1) == torch.tensor(y_te)).float().mean()
    print(f"centralised accuracy: {acc:.3f}")
    return float(acc)


if __name__ == "__main__":
    main()
