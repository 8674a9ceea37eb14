"""Migration rough edges: metrics chosen from the loss, the dry run before round 1, foreign argument spellings."""

import functools
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import tessera
from tessera.core.errors import ConfigError, ShapeMismatch
from tessera.horizontal.checks import dry_run
from tessera.horizontal.task import SupervisedTask, mae, mse, r2

SGD = functools.partial(torch.optim.SGD, lr=0.05)


def regression(rows: int, features: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    y = x @ np.arange(1, features + 1, dtype=np.float32) + 0.1 * rng.normal(size=rows).astype(np.float32)
    return x, y.reshape(-1, 1)


def classes(rows: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, 5)).astype(np.float32), rng.integers(0, num_classes, rows)


def fl(model: nn.Module, loss_fn: nn.Module, **kw: object) -> tessera.FLModel:
    return tessera.FLModel(parties=["alice", "bob"], model=model, loss_fn=loss_fn, optimizer_fn=SGD, **kw)


# ------------------------------------------------------------------------------------------- default metrics
@pytest.mark.parametrize(("loss_fn", "names"), [
    (nn.CrossEntropyLoss(), ["accuracy"]), (nn.NLLLoss(), ["accuracy"]), (nn.BCEWithLogitsLoss(), ["accuracy"]),
    (nn.BCELoss(), ["accuracy"]), (F.cross_entropy, ["accuracy"]),
    (functools.partial(F.cross_entropy, label_smoothing=0.1), ["accuracy"]),
    (nn.MSELoss(), ["mse", "mae", "r2"]), (nn.L1Loss(), ["mse", "mae", "r2"]), (nn.HuberLoss(), ["mse", "mae", "r2"]),
    (nn.SmoothL1Loss(), ["mse", "mae", "r2"]), (F.mse_loss, ["mse", "mae", "r2"]),
    (lambda out, y: (out - y).abs().max(), []),
])
def test_default_metrics_follow_the_loss(loss_fn: object, names: list[str]) -> None:
    task = SupervisedTask(model_fn=lambda: nn.Linear(3, 1), loss_fn=loss_fn, optimizer_fn=SGD,  # type: ignore[arg-type]
                          data_fn=lambda cid: (DataLoader([]), None))
    assert list(task.metrics) == names
    chosen = SupervisedTask(model_fn=lambda: nn.Linear(3, 1), loss_fn=nn.MSELoss(), optimizer_fn=SGD,
                            data_fn=lambda cid: (DataLoader([]), None), metrics={"mae": mae})
    assert list(chosen.metrics) == ["mae"]


def test_regression_metrics_match_sklearn_on_the_same_predictions() -> None:
    rng = np.random.default_rng(1)
    y = rng.normal(size=(50, 2))
    pred = y + rng.normal(scale=0.5, size=(50, 2))
    p, t = torch.tensor(pred, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    assert mse(p, t) == pytest.approx(skm.mean_squared_error(t.numpy(), p.numpy()), rel=1e-6)
    assert mae(p, t) == pytest.approx(skm.mean_absolute_error(t.numpy(), p.numpy()), rel=1e-6)
    assert r2(p, t) == pytest.approx(skm.r2_score(t.numpy(), p.numpy()), rel=1e-6)
    const = torch.ones(4, 1)
    assert r2(const, const) == skm.r2_score(const.numpy(), const.numpy()) == 1.0
    assert r2(const + 1, const) == skm.r2_score(const.numpy(), const.numpy() + 1) == 0.0


def test_flmodel_scores_a_linear_regression_with_mse_mae_r2_never_accuracy() -> None:
    (xa, ya), (xb, yb) = regression(64, seed=0), regression(48, seed=1)
    torch.manual_seed(0)
    model = fl(nn.Linear(3, 1), nn.MSELoss())
    history = model.fit(x=[xa, xb], y=[ya, yb], rounds=3, batch_size=16, validation_data=([xa, xb], [ya, yb]))
    assert set(history.last["eval_metrics"]) == {"mse", "mae", "r2"}
    assert "accuracy" not in history.last.get("train_metrics", {})
    ev = model.evaluate(x=[xa, xb], y=[ya, yb])
    assert "accuracy" not in ev
    for name, x, y in (("alice", xa, ya), ("bob", xb, yb)):
        pred = model.predict(x).numpy()
        assert ev["parties"][name]["mse"] == pytest.approx(skm.mean_squared_error(y, pred), rel=1e-5)
        assert ev["parties"][name]["mae"] == pytest.approx(skm.mean_absolute_error(y, pred), rel=1e-5)
        assert ev["parties"][name]["r2"] == pytest.approx(skm.r2_score(y, pred), rel=1e-5)
    assert ev["r2"] > 0.5  # three rounds of SGD already explain most of y = x @ [1, 2, 3]


# ----------------------------------------------------------------------------------------------- dry run
def test_a_broadcasting_regression_loss_is_refused_before_round_one() -> None:
    (xa, ya), (xb, yb) = regression(32), regression(32, seed=1)
    net = nn.Linear(3, 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:  # what plain PyTorch does: warn once and train anyway
        warnings.simplefilter("always")
        nn.MSELoss()(net(torch.tensor(xb[:8])), torch.tensor(yb[:8, 0]))
    assert any("target size" in str(w.message) for w in caught)
    with pytest.raises(ShapeMismatch, match=r"party 'bob'.*output \[8, 1\] vs y \[8\].*\[8, 8\].*reshape\(-1, 1\)"):
        fl(net, nn.MSELoss()).fit(x=[xa, xb], y=[ya, yb[:, 0]], rounds=1, batch_size=8)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing trained


def test_a_broadcasting_loss_unknown_by_name_is_caught_by_its_warning() -> None:
    x, y = regression(16)
    loader = DataLoader(TensorDataset(torch.tensor(x), torch.tensor(y[:, 0])), batch_size=8)
    with pytest.raises(ShapeMismatch, match=r"party 'alice'.*\[8, 1\].*\[8\].*broadcasts"):
        dry_run(nn.Linear(3, 1), loader, party="alice", loss_fn=lambda out, t: F.mse_loss(out, t) * 2)


def test_a_model_built_for_other_columns_is_refused_naming_both_shapes() -> None:
    (xa, ya), (xb, yb) = regression(16, features=5), regression(16, features=5, seed=1)
    with pytest.raises(ShapeMismatch, match=r"party 'alice'.*x of shape \[8, 5\].*in_features=4.*in_features=5"):
        fl(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)), nn.MSELoss()).fit(
            x=[xa, xb], y=[ya, yb], rounds=1, batch_size=8)


def test_labels_beyond_the_class_count_are_refused_even_past_the_first_batch() -> None:
    (xa, ya), (xb, yb) = classes(40, 3), classes(40, 3, seed=1)
    yb[-1] = 4  # one row far from the first batch: the check sees all of bob's labels
    with pytest.raises(ShapeMismatch, match=r"party 'bob'.*labels run from 0 to 4 \(5 classes\).*3 logits"):
        fl(nn.Linear(5, 3), nn.CrossEntropyLoss()).fit(x=[xa, xb], y=[ya, yb], rounds=1, batch_size=8)
    with pytest.raises(ShapeMismatch, match=r"party 'alice'.*labels reach 2.*binary"):
        fl(nn.Linear(5, 1), nn.BCEWithLogitsLoss()).fit(x=[xa, xb], y=[ya.reshape(-1, 1).astype(np.float32),
                                                                      ya.reshape(-1, 1).astype(np.float32)], rounds=1)


def test_dtype_mistakes_name_the_dtype_and_the_conversion() -> None:
    (xa, ya), (xb, yb) = classes(16, 3), classes(16, 3, seed=1)
    with pytest.raises(ConfigError, match=r"party 'alice'.*float32.*integer class labels.*astype\(np.int64\)"):
        fl(nn.Linear(5, 3), nn.CrossEntropyLoss()).fit(x=[xa, xb], y=[ya.astype(np.float32), yb], rounds=1)
    with pytest.raises(ConfigError, match=r"party 'alice'.*\(torch.int64\).*parameters are torch.float32"):
        fl(nn.Linear(5, 3), nn.CrossEntropyLoss()).fit(x=[xa.astype(np.int64), xb], y=[ya, yb], rounds=1)


def test_validation_data_is_dry_run_too() -> None:
    (xa, ya), (xb, yb) = regression(16), regression(16, seed=1)
    with pytest.raises(ShapeMismatch, match=r"party 'bob \(validation_data\)'"):
        fl(nn.Linear(3, 1), nn.MSELoss()).fit(x=[xa, xb], y=[ya, yb], rounds=1,
                                             validation_data=([xa, xb], [ya, yb[:, 0]]))


def test_dry_run_of_a_task_changes_no_rng_and_no_parameter() -> None:
    x, y = classes(32, 3)
    data = TensorDataset(torch.tensor(x), torch.tensor(y))
    task = SupervisedTask(model_fn=lambda: nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 3)),
                          loss_fn=nn.CrossEntropyLoss(), optimizer_fn=SGD,
                          data_fn=lambda cid: (DataLoader(data, batch_size=8, shuffle=True), None))
    state = torch.get_rng_state()
    report = dry_run(task, task.data_fn("alice", 1)[0], party="alice")
    assert torch.equal(torch.get_rng_state(), state)
    assert report is not None and (report.x_shape, report.output_shape, report.y_shape) == ((8, 5), (8, 3), (8,))
    assert report.loss == pytest.approx(float(np.log(3)), rel=0.5)
    model = nn.Linear(5, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dry_run(model, [(torch.tensor(x[:8]), torch.tensor(y[:8]))], party="alice", loss_fn=nn.CrossEntropyLoss())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------------ foreign spellings
def test_epochs_is_answered_with_rounds_or_local_epochs() -> None:
    (xa, ya), (xb, yb) = regression(8), regression(8, seed=1)
    with pytest.raises(ConfigError, match=r"epochs=: did you mean rounds= \(federated rounds\) or local_epochs= "
                                          r"\(passes over local data per round\)\?"):
        fl(nn.Linear(3, 1), nn.MSELoss()).fit(x=[xa, xb], y=[ya, yb], epochs=10)


@pytest.mark.parametrize(("where", "kwargs", "hint"), [
    ("fit", {"num_rounds": 3}, r"num_rounds=: did you mean fit\(rounds=...\)"),
    ("fit", {"n_rounds": 3}, r"did you mean fit\(rounds=...\)"),
    ("fit", {"batchsize": 8}, r"did you mean fit\(batch_size=...\)"),
    ("fit", {"lr": 0.1}, r"optimizer_fn=lambda params: torch.optim.SGD\(params, lr=0.1\)"),
    ("fit", {"validation_split": 0.2}, r"validation_data="),
    ("fit", {"roundz": 3}, r"roundz=: did you mean rounds=\?"),
    ("fit", {"local_epoch": 2, "verbose": 1}, r"local_epoch=: did you mean fit\(local_epochs=...\).*verbose=.*progr"),
    ("init", {"lr": 0.1}, r"FLModel\(\.\.\.\) got unknown.*optimizer_fn="),
    ("init", {"epochs": 3}, r"did you mean rounds="),
    ("init", {"stratgy": None}, r"stratgy=: did you mean strategy=\?"),
    ("init", {"tensorboard": True}, r"loggers=\['tensorboard'\]"),
])
def test_foreign_spellings_name_the_tessera_argument(where: str, kwargs: dict[str, object], hint: str) -> None:
    (xa, ya), (xb, yb) = regression(8), regression(8, seed=1)
    with pytest.raises(ConfigError, match=hint):
        if where == "fit":
            fl(nn.Linear(3, 1), nn.MSELoss()).fit(x=[xa, xb], y=[ya, yb], rounds=1, **kwargs)  # type: ignore[arg-type]
        else:
            fl(nn.Linear(3, 1), nn.MSELoss(), **kwargs)


def test_fit_without_rounds_says_so() -> None:
    (xa, ya), (xb, yb) = regression(8), regression(8, seed=1)
    with pytest.raises(ConfigError, match="fit needs rounds="):
        fl(nn.Linear(3, 1), nn.MSELoss()).fit(x=[xa, xb], y=[ya, yb])


@pytest.mark.slow
def test_migration_doc_snippets_run(capsys: pytest.CaptureFixture[str]) -> None:
    doc = Path(__file__).resolve().parents[1] / "docs" / "migration.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 4
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)  # our own documentation
    printed = capsys.readouterr().out
    assert "['mae', 'mse', 'r2']" in printed
    assert "party 'alice': model output [32, 1] vs y [32]" in printed
    assert "epochs=: did you mean rounds=" in printed
    assert namespace["history"].last["eval_metrics"]["r2"] > 0.9  # type: ignore[attr-defined]
