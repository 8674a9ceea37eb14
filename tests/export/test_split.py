"""Split models: only the label party exports the fused model; owners export their own base; ONNX of the fusion."""

from pathlib import Path

import pytest
import torch
from torch import nn

from tessera.core.errors import ExportError
from tessera.core.models import MLP
from tessera.export import SplitInference, export_onnx, fused_model, load_bundle, save_bundle, verify_bundle
from tessera.export.manifest import read_manifest
from tessera.vertical.model import ConcatFuse, SumFuse

G = torch.Generator().manual_seed(2)
XS = {"alice": torch.randn(20, 4, generator=G), "bob": torch.randn(20, 3, generator=G)}


def parts() -> tuple[dict[str, nn.Module], nn.Module]:
    bases: dict[str, nn.Module] = {"alice": nn.Sequential(nn.Linear(4, 5), nn.ReLU()),
                                   "bob": MLP(3, 2, [6])}
    return bases, ConcatFuse(nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 2)))


def composed(bases: dict[str, nn.Module], fuse: nn.Module, xs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Oracle: the split forward written out by hand, fuse over the embeddings in base order."""
    return fuse([bases[p](xs[p]) for p in bases])


def test_label_party_exports_the_fused_model_and_it_predicts_the_same(tmp_path: Path) -> None:
    bases, fuse = parts()
    model = fused_model(base_models=bases, fuse_model=fuse, label_party="alice", party="alice")
    save_bundle(model, tmp_path / "b", example_inputs={"alice": XS["alice"][:4], "bob": XS["bob"][:4]}, party="alice")
    m = read_manifest(tmp_path / "b")
    assert m["split"] == {"role": "fused", "label_party": "alice", "parties": ["alice", "bob"]}
    assert {p["name"].split(".")[1] for p in m["params"] if p["name"].startswith("bases.")} == {"alice", "bob"}
    loaded = load_bundle(tmp_path / "b")  # rebuilt without the vertical trainer: tessera classes are allowlisted
    assert isinstance(loaded, SplitInference) and loaded.parties == ["alice", "bob"]
    want = composed(bases, fuse, XS)
    assert torch.equal(loaded(XS), want)  # one dict
    assert torch.equal(loaded(alice=XS["alice"], bob=XS["bob"]), want)  # keywords
    assert torch.equal(loaded([XS["alice"], XS["bob"]]), want)  # a list in party order
    assert verify_bundle(tmp_path / "b").exact


def test_a_data_owner_cannot_export_the_fused_model(tmp_path: Path) -> None:
    bases, fuse = parts()
    with pytest.raises(ExportError, match=r"party 'bob' may not export .* only the label party 'alice'.*"
                                          r"export its own base alone"):
        fused_model(base_models=bases, fuse_model=fuse, label_party="alice", party="bob")
    model = SplitInference(bases=bases, fuse=fuse, label_party="alice")
    with pytest.raises(ExportError, match="only the label party 'alice'"):
        save_bundle(model, tmp_path / "b", example_inputs=XS, party="bob")
    with pytest.raises(ExportError, match="needs party="):
        save_bundle(model, tmp_path / "b", example_inputs=XS)
    assert not (tmp_path / "b").exists()


def test_an_owner_exports_its_own_base_alone(tmp_path: Path) -> None:
    bases, _ = parts()
    save_bundle(bases["bob"], tmp_path / "bob", example_inputs=XS["bob"][:4], party="bob")
    m = read_manifest(tmp_path / "bob")
    assert m["split"] == {"role": "base", "party": "bob"}
    assert not any(p["name"].startswith(("fuse", "bases")) for p in m["params"])
    assert torch.equal(load_bundle(tmp_path / "bob")(XS["bob"]), bases["bob"](XS["bob"]))


def test_label_party_assembles_the_fused_model_from_owner_bundles(tmp_path: Path) -> None:
    """The owners hand their bases over; the label party loads them and exports the fusion."""
    bases, _ = parts()
    for p, base in bases.items():
        save_bundle(base, tmp_path / p, example_inputs=XS[p][:2], party=p)
    received = {p: load_bundle(tmp_path / p) for p in bases}
    sum_fuse = SumFuse(nn.Linear(5, 2))  # needs equal widths: put bob's base through a projection
    received["bob"] = nn.Sequential(received["bob"], nn.Linear(2, 5))
    save_bundle(fused_model(base_models=received, fuse_model=sum_fuse, label_party="alice", party="alice"),
                tmp_path / "fused", example_inputs=XS, party="alice")
    loaded = load_bundle(tmp_path / "fused")
    assert torch.equal(loaded(XS), composed(received, sum_fuse, XS))


def test_onnx_of_the_fused_model_matches_pytorch(tmp_path: Path) -> None:
    bases, fuse = parts()
    model = fused_model(base_models=bases, fuse_model=fuse, label_party="alice", party="alice")
    save_bundle(model, tmp_path / "b", example_inputs={p: x[:4] for p, x in XS.items()}, party="alice")
    entry = export_onnx(tmp_path / "b")
    assert entry["file"] == "model.onnx" and entry["max_abs_error"] < 1e-5
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "b" / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input.kwargs.alice": XS["alice"].numpy(), "input.kwargs.bob": XS["bob"].numpy()})
    torch.testing.assert_close(torch.from_numpy(got), composed(bases, fuse, XS).detach(), rtol=1e-5, atol=1e-6)
    report = verify_bundle(tmp_path / "b")  # 20 rows vs 4 at export: the batch axis is dynamic
    assert [c.runtime for c in report.checks] == ["torch", "onnxruntime"] and report.ok


def test_trained_slmodel_exports_and_predicts_the_same(tmp_path: Path) -> None:
    from tessera import SLModel

    bases, fuse = parts()
    y = (XS["alice"][:, 0] > 0).long()
    sl = SLModel(base_models=bases, fuse_model=fuse, label_party="alice", loss_fn=nn.CrossEntropyLoss(),
                 optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1))
    before = sl.predict(x=XS).clone()
    sl.fit(x=XS, y=y, epochs=2, batch_size=10)
    after = sl.predict(x=XS)
    assert not torch.equal(before, after)  # training changed the model that is exported
    with pytest.raises(ExportError, match="party 'bob' may not export"):
        save_bundle(sl, tmp_path / "owner", example_inputs=XS, party="bob")
    save_bundle(sl, tmp_path / "b", example_inputs={p: x[:4] for p, x in XS.items()}, party="alice")
    loaded = load_bundle(tmp_path / "b")
    assert torch.equal(loaded(XS), after)
    prov = read_manifest(tmp_path / "b")["provenance"]
    assert (prov["strategy"], prov["parties"]) == ("split learning", ["alice", "bob"])
