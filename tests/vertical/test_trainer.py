"""Split training against its oracle: centralised training of the composed model on the joined data."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import tessera
from tessera.core import serde
from tessera.core.errors import ConfigError, ProtocolError, ShapeMismatch
from tessera.runtime.backend import InProcessBackend
from tessera.vertical import ConcatFuse, EarlyStopping, SumFuse
from tessera.vertical.messages import Backward, Forward, ForwardIns
from tessera.vertical.metrics import classification_metrics

from .helpers import COLUMNS, composed, make_data, make_split, train_central

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
}


def sl_model(bases: dict[str, nn.Module], fuse: nn.Module, opt: Callable[[Any], torch.optim.Optimizer],
             **kw: Any) -> Any:
    return tessera.SLModel(base_models=bases, fuse_model=fuse, label_party="alice",
                           loss_fn=nn.BCEWithLogitsLoss(), optimizer_fn=opt, **kw)


def assert_params_close(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_split_training_equals_centralised_training(opt_name: str) -> None:
    # Prepare: the same initial bases/fuse for split training and for the composed model
    x, y = make_data()
    bases, fuse = make_split()
    central = composed(bases, fuse)
    opt = OPTIMIZERS[opt_name]
    # Execute
    sl = sl_model(bases, fuse, opt)
    history = sl.fit(x=x, y=y, epochs=3, batch_size=16, validation_data=(x, y))
    losses = train_central(central, x, y, epochs=3, batch_size=16, optimizer_fn=opt)
    # Assert: params, per-epoch losses, predictions and AUC all agree
    assert_params_close(sl.model, central)
    assert history["train_loss"] == pytest.approx(losses, abs=1e-6)
    central.eval()
    with torch.no_grad():
        ref = central(x)
    pred = sl.predict(x=x)
    torch.testing.assert_close(pred, ref, atol=1e-6, rtol=0)
    assert sl.evaluate(x=x, y=y)["auc"] == pytest.approx(classification_metrics(ref, y)["auc"], abs=1e-12)
    assert history.last["eval_metrics"]["auc"] == pytest.approx(classification_metrics(ref, y)["auc"], abs=1e-12)
    assert history.last["bytes_up"] > 0 and history.last["bytes_down"] > 0


def test_label_party_without_base_and_sum_fuse_match_centralised() -> None:
    x, y = make_data(rows=40)
    torch.manual_seed(1)
    bases: dict[str, nn.Module] = {p: nn.Linear(c, 5) for p, c in COLUMNS.items()}
    fuse = SumFuse(nn.Sequential(nn.ReLU(), nn.Linear(5, 1)))
    central = copy.deepcopy(nn.ModuleDict(bases)), copy.deepcopy(fuse)
    ref = tessera.vertical.SplitModel(dict(central[0].items()), central[1], label_party="carol")
    sl = tessera.SLModel(base_models=bases, fuse_model=fuse, label_party="carol", loss_fn=nn.BCEWithLogitsLoss(),
                         optimizer_fn=OPTIMIZERS["sgd"])
    sl.fit(x=x, y=y, epochs=2, batch_size=8)
    train_central(ref, x, y, epochs=2, batch_size=8, optimizer_fn=OPTIMIZERS["sgd"])
    assert sl.trainer.owners == ["alice", "bob"] and sl.trainer.local_base is None
    assert_params_close(sl.model, ref)


def test_concat_width_mismatch_names_party_and_shapes_before_training() -> None:
    x, y = make_data()
    bases, _ = make_split(emb=3)
    fuse = ConcatFuse(nn.Linear(7, 1))  # 3 + 3 = 6 arrive
    before = copy.deepcopy(bases["bob"].state_dict())
    sl = sl_model(bases, fuse, OPTIMIZERS["sgd"])
    with pytest.raises(ShapeMismatch, match=r"expects a concatenated width of 7 but got 6 \(alice: \(4, 3\), bob: "):
        sl.fit(x=x, y=y, epochs=1, batch_size=16)
    assert sl.trainer.step == 0
    assert all(torch.equal(before[k], v) for k, v in bases["bob"].state_dict().items())


def test_sum_fuse_mismatch_and_label_shape_mismatch() -> None:
    x, y = make_data()
    bases = {"alice": nn.Linear(4, 3), "bob": nn.Linear(6, 2)}
    with pytest.raises(ShapeMismatch, match=r"shaped like alice's \(4, 3\), but bob sends \(4, 2\)"):
        sl_model(bases, SumFuse(), OPTIMIZERS["sgd"]).fit(x=x, y=y, epochs=1)
    bases2, _ = make_split()
    wrong_head = ConcatFuse(nn.Linear(6, 2))  # two logits against (n, 1) float labels
    with pytest.raises(ShapeMismatch, match=r"loss at alice: fuse output \(4, 2\) does not fit labels \(4, 1\)"):
        sl_model(bases2, wrong_head, OPTIMIZERS["sgd"]).fit(x=x, y=y, epochs=1)


def test_user_fuse_module_error_becomes_shape_mismatch() -> None:
    class Bilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bl = nn.Bilinear(3, 4, 1)

        def forward(self, embs: list[torch.Tensor]) -> torch.Tensor:
            return self.bl(embs[0], embs[1])  # type: ignore[no-any-return]

    x, y = make_data()
    bases, _ = make_split(emb=3)
    with pytest.raises(ShapeMismatch, match=r"fuse at alice cannot take the embeddings \(alice: \(4, 3\), bob: "):
        sl_model(bases, Bilinear(), OPTIMIZERS["sgd"]).fit(x=x, y=y, epochs=1)


def test_missing_party_and_row_mismatch_are_refused() -> None:
    x, y = make_data()
    bases, fuse = make_split()
    with pytest.raises(ConfigError, match=r"missing party \['bob'\]"):
        sl_model(bases, fuse, OPTIMIZERS["sgd"]).fit(x={"alice": x["alice"]}, y=y, epochs=1)
    short = {"alice": x["alice"], "bob": x["bob"][:50]}
    with pytest.raises(ConfigError, match=r"party bob holds 50 'train' rows but the label party alice has 60"):
        sl_model(bases, fuse, OPTIMIZERS["sgd"]).fit(x=short, y=y, epochs=1)


def test_messages_round_trip_the_wire_format() -> None:
    rows = torch.tensor([3, 1, 2])
    for msg in (ForwardIns(step=2, split="train", rows=rows), Forward(step=2, embedding=torch.ones(3, 2)),
                Backward(step=2, grad=torch.zeros(3, 2))):
        back = serde.decode_message(serde.encode_message(msg))
        assert type(back) is type(msg) and back.step == 2


def test_owner_refuses_out_of_range_rows_and_out_of_order_backward() -> None:
    x, _ = make_data()
    owner = tessera.vertical.DataOwner("bob", nn.Linear(6, 3), OPTIMIZERS["sgd"], data={"train": x["bob"]})
    with pytest.raises(ProtocolError, match="int64 positions in"):
        owner.handle("bob", ForwardIns(step=0, split="train", rows=torch.tensor([0, 60])))
    with pytest.raises(ProtocolError, match="Backward for step 5"):
        owner.handle("bob", Backward(step=5, grad=torch.zeros(2, 3)))
    with pytest.raises(ProtocolError, match="reached data owner 'bob'"):
        owner.handle("alice", ForwardIns(step=0, split="train", rows=torch.tensor([0])))


@pytest.mark.parametrize("opt_name", ["adam"])
def test_checkpoint_resume_is_bit_identical(tmp_path: Path, opt_name: str) -> None:
    x, y = make_data()
    bases, fuse = make_split()
    opt = OPTIMIZERS[opt_name]
    straight = sl_model(copy.deepcopy(bases), copy.deepcopy(fuse), opt)
    h_straight = straight.fit(x=x, y=y, epochs=4, batch_size=16, validation_data=(x, y))
    # first process: 2 epochs, then a fresh process (new objects, same output_dir) resumes to 4
    first = sl_model(copy.deepcopy(bases), copy.deepcopy(fuse), opt, output_dir=tmp_path)
    first.fit(x=x, y=y, epochs=2, batch_size=16, validation_data=(x, y))
    assert (tmp_path / "checkpoint.tsr").exists() and (tmp_path / "parties" / "bob" / "ckpt-0.tsr").exists()
    second = sl_model(copy.deepcopy(bases), copy.deepcopy(fuse), opt, output_dir=tmp_path)
    h_resumed = second.fit(x=x, y=y, epochs=4, batch_size=16, resume=True, validation_data=(x, y))
    sa, sb = straight.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert h_resumed["train_loss"] == h_straight["train_loss"]
    assert h_resumed["eval_metrics.auc"] == h_straight["eval_metrics.auc"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "loss.png").exists() and (tmp_path / "score.png").exists()


def test_resume_refuses_an_owner_state_from_another_step(tmp_path: Path) -> None:
    x, y = make_data()
    bases, fuse = make_split()
    sl_model(copy.deepcopy(bases), copy.deepcopy(fuse), OPTIMIZERS["sgd"], output_dir=tmp_path).fit(
        x=x, y=y, epochs=1, batch_size=16)
    (tmp_path / "parties" / "bob" / "ckpt-1.tsr").write_bytes((tmp_path / "parties" / "bob" / "ckpt-1.tsr")
                                                               .read_bytes() + b"\0")
    fresh = sl_model(copy.deepcopy(bases), copy.deepcopy(fuse), OPTIMIZERS["sgd"], output_dir=tmp_path)
    with pytest.raises(ProtocolError, match=r"data owner bob failed .*not the one the label party's checkpoint"):
        fresh.fit(x=x, y=y, epochs=2, batch_size=16, resume=True)


def test_early_stopping_stops_and_restores_the_best_epoch() -> None:
    x, y = make_data()
    bases, fuse = make_split()
    sl = sl_model(bases, fuse, lambda p: torch.optim.SGD(p, lr=3.0))  # too high: validation loss bounces
    es = EarlyStopping(patience=1, monitor="eval_loss")
    history = sl.fit(x=x, y=y, epochs=12, batch_size=8, validation_data=(x, y), early_stopping=es)
    losses = history["eval_loss"]
    best = min(losses)
    assert len(losses) < 12  # stopped early ...
    assert losses[-1] > best  # ... after an epoch that did not improve (patience 1)
    assert history.last["epochs_without_improvement"] == 1
    assert sl.evaluate(x=x, y=y)["loss"] == pytest.approx(best, abs=1e-6)


def test_inprocess_backend_is_the_seam() -> None:
    # the owners' side is a plain handler; any Backend carrying @message dataclasses can drive it
    x, y = make_data()
    bases, fuse = make_split()
    made: list[InProcessBackend] = []

    def factory(handler: Any) -> InProcessBackend:
        made.append(InProcessBackend(handler, max_workers=2))
        return made[-1]

    sl = sl_model(bases, fuse, OPTIMIZERS["sgd"], backend=factory)
    assert made and sl.backend is made[0] and isinstance(made[0].handler, tessera.vertical.OwnerGroup)
    sl.fit(x=x, y=y, epochs=1, batch_size=30)
    sl.close()
    assert set(sl.backend.traffic.per_client) == {"bob"}


def test_predict_twice_with_a_label_party_that_owns_no_base() -> None:
    x, y = make_data(rows=40)
    bases: dict[str, nn.Module] = {p: nn.Linear(c, 2) for p, c in COLUMNS.items()}
    sl = tessera.SLModel(base_models=bases, fuse_model=SumFuse(), label_party="carol",
                         loss_fn=nn.CrossEntropyLoss(), optimizer_fn=OPTIMIZERS["sgd"])
    ylong = y[:, 0].long()
    sl.fit(x=x, y=ylong, epochs=1, batch_size=8)
    ref = sl.model.eval()(x)
    torch.testing.assert_close(sl.predict(x=x), ref)
    torch.testing.assert_close(sl.predict(x={p: v[:7] for p, v in x.items()}), ref[:7])
    with pytest.raises(ConfigError, match=r"party bob holds 6 'predict' rows but alice holds 7"):
        sl.predict(x={"alice": x["alice"][:7], "bob": x["bob"][:6]})
    assert set(sl.evaluate(x=x, y=ylong)) == {"loss", "accuracy", "auc"}


def test_three_parties_on_a_threaded_backend_match_centralised() -> None:
    # owners answer concurrently (as remote parties would); the result is still centralised training's
    g = torch.Generator().manual_seed(3)
    cols = {"alice": 3, "bob": 4, "carol": 5}
    x = {p: torch.randn(48, c, generator=g) for p, c in cols.items()}
    y = (x["bob"][:, :1] + x["carol"][:, :1] > 0).float()
    torch.manual_seed(2)
    bases: dict[str, nn.Module] = {p: nn.Linear(c, 2) for p, c in cols.items()}
    fuse = ConcatFuse(nn.Linear(6, 1))
    ref = composed(bases, fuse)
    owners = [tessera.vertical.DataOwner(p, bases[p], OPTIMIZERS["adam"], data={"train": x[p]})
              for p in ("bob", "carol")]
    backend = InProcessBackend(tessera.vertical.OwnerGroup(owners), max_workers=2)
    trainer = tessera.vertical.SplitTrainer(fuse=fuse, loss_fn=nn.BCEWithLogitsLoss(),
                                            optimizer_fn=OPTIMIZERS["adam"], label_party="alice",
                                            order=list(cols), backend=backend, local_base=bases["alice"])
    trainer.add_split("train", y=y, x=x["alice"])
    history = trainer.fit(epochs=2, batch_size=10)
    trainer.close()
    losses = train_central(ref, x, y, epochs=2, batch_size=10, optimizer_fn=OPTIMIZERS["adam"])
    assert history["train_loss"] == pytest.approx(losses, abs=1e-6)
    for p in cols:
        assert_params_close(bases[p], ref.bases[p])
    assert_params_close(fuse, ref.fuse)
    assert set(backend.traffic.per_client) == {"bob", "carol"}


def test_non_finite_embedding_is_refused() -> None:
    x, y = make_data()
    bases, fuse = make_split()
    x = {**x, "bob": x["bob"].clone()}
    x["bob"][5, 0] = float("nan")
    with pytest.raises(ProtocolError, match="data owner bob sent an embedding with NaN or Inf"):
        sl_model(bases, fuse, OPTIMIZERS["sgd"]).fit(x=x, y=y, epochs=1, batch_size=60)
