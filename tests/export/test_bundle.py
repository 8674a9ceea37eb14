"""save_bundle / load_bundle / verify_bundle: round trips against the original model's predictions, and refusals."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from tessera.core.errors import ExportError
from tessera.core.models import MLP
from tessera.export import Provenance, load_bundle, save_bundle, verify_bundle
from tessera.export.manifest import read_manifest, seal, sha256_file
from tests.export.models import Bare, Tower

X = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))


def trained_tower() -> Tower:
    model = Tower(6, width=5, classes=3)
    model.train()
    model(X)  # non-trivial BatchNorm running statistics, which are buffers the bundle must carry
    return model.eval()


def reseal(bundle: Path, edit) -> None:
    """Edit the manifest and recompute its self-hash and file hashes: what a careful attacker would do."""
    m = json.loads((bundle / "manifest.json").read_text())
    edit(m)
    for f in m["files"]:
        f["bytes"] = (bundle / f["file"]).stat().st_size
        f["sha256"] = sha256_file(bundle / f["file"])
    (bundle / "manifest.json").write_text(json.dumps(seal(m)))


def test_mlp_round_trip_is_bit_exact_and_manifest_describes_it(tmp_path: Path) -> None:
    model = MLP(6, 3, [8, 4])
    prov = Provenance(strategy="FedAvg", rounds=5, parties=("alice", "bob"), epsilon={"alice": 1.5}, delta=1e-5)
    save_bundle(model, tmp_path / "b", example_inputs=X[:4], provenance=prov)
    loaded = load_bundle(tmp_path / "b")
    assert type(loaded) is MLP and loaded.config == model.config
    assert torch.equal(loaded(X), model(X))
    m = read_manifest(tmp_path / "b")
    assert m["arch"]["ref"] == "tessera.core.models:MLP"
    assert [(p["name"], p["shape"], p["dtype"]) for p in m["params"]] == [
        (k, list(v.shape), "float32") for k, v in model.state_dict().items()]
    assert m["inputs"]["args"] == [{"shape": [4, 6], "dtype": "float32"}]
    assert m["provenance"]["epsilon"] == {"alice": 1.5} and m["provenance"]["rounds"] == 5
    assert {f["file"] for f in m["files"]} == {"model.safetensors", "reference.safetensors"}
    report = verify_bundle(tmp_path / "b")
    assert report.ok and report.exact and report.files_checked == 2


def test_user_class_with_config_round_trips_only_when_allowed(tmp_path: Path) -> None:
    model = trained_tower()
    scale = torch.full((1,), 2.0)
    save_bundle(model, tmp_path / "b", example_inputs=(X[:4], scale))
    with pytest.raises(ExportError, match="allowlist"):
        load_bundle(tmp_path / "b")
    loaded = load_bundle(tmp_path / "b", allow=["tests.export.models"])
    assert isinstance(loaded, Tower) and not loaded.training
    want, got = model(X, scale), loaded(X, scale)
    assert torch.equal(got["logits"], want["logits"]) and torch.equal(got["embedding"], want["embedding"])
    assert torch.equal(loaded.norm.running_mean, model.norm.running_mean)
    report = verify_bundle(tmp_path / "b", allow=["tests.export.models:Tower"])
    assert {c.name for c in report.checks} == {"output.logits", "output.embedding"} and report.exact


def test_model_without_constructor_kwargs_is_refused_with_the_fix(tmp_path: Path) -> None:
    model = Bare(6)
    with pytest.raises(ExportError, match="config"):
        save_bundle(model, tmp_path / "b", example_inputs=X[:2])
    save_bundle(model, tmp_path / "k", example_inputs=X[:2], kwargs={"features": 6})
    assert torch.equal(load_bundle(tmp_path / "k", allow=["tests.export"])(X), model(X))
    save_bundle(model, tmp_path / "n", example_inputs=X[:2], rebuildable=False)
    with pytest.raises(ExportError, match="model="):
        load_bundle(tmp_path / "n")
    assert torch.equal(load_bundle(tmp_path / "n", model=Bare(6))(X), model(X))


def test_plain_sequential_of_torch_layers_is_rebuilt_from_its_attributes(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(approximate="tanh"), nn.LayerNorm(5, eps=1e-3),
                          nn.Dropout(0.3), nn.Linear(5, 2, bias=False)).eval()
    save_bundle(model, tmp_path / "b", example_inputs=X[:3])
    loaded = load_bundle(tmp_path / "b")
    assert loaded[1].approximate == "tanh" and loaded[2].eps == 1e-3 and loaded[4].bias is None
    assert torch.equal(loaded(X), model(X))


def test_sharding_splits_weights_and_loads_them_back(tmp_path: Path) -> None:
    model = MLP(6, 3, [32, 32])  # bytes: fc0 768+128, fc1 4096+128, fc2 384+12
    save_bundle(model, tmp_path / "b", example_inputs=X[:2], max_shard_bytes=1500)
    m = read_manifest(tmp_path / "b")
    shards = [f["file"] for f in m["files"] if f["kind"] == "weights"]
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    by_shard = {s: [p["name"] for p in m["params"] if p["file"] == s] for s in shards}
    assert list(by_shard.values()) == [["fc0.weight", "fc0.bias"], ["fc1.weight"],  # a tensor over the limit alone
                                       ["fc1.bias", "fc2.weight", "fc2.bias"]]
    assert torch.equal(load_bundle(tmp_path / "b")(X), model(X))


def test_a_changed_byte_in_a_shard_or_the_manifest_is_refused(tmp_path: Path) -> None:
    save_bundle(MLP(6, 3, [8]), tmp_path / "b", example_inputs=X[:2], max_shard_bytes=200)
    shard = tmp_path / "b" / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="hash mismatch: model-00002"):
        load_bundle(tmp_path / "b")
    with pytest.raises(ExportError, match="hash mismatch"):
        verify_bundle(tmp_path / "b")

    save_bundle(MLP(6, 3, [8]), tmp_path / "c", example_inputs=X[:2])
    text = (tmp_path / "c" / "manifest.json").read_text()
    (tmp_path / "c" / "manifest.json").write_text(text.replace('"in_features": 6', '"in_features": 7'))
    with pytest.raises(ExportError, match=r"hash mismatch: .*manifest.json was modified"):
        load_bundle(tmp_path / "c")


def test_resealed_weight_change_is_caught_by_the_reference_outputs(tmp_path: Path) -> None:
    model = MLP(6, 3, [8])
    save_bundle(model, tmp_path / "b", example_inputs=X[:4])
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "b" / "model.safetensors")
    state["fc1.bias"] = state["fc1.bias"] + 0.01
    save_file(state, tmp_path / "b" / "model.safetensors")
    reseal(tmp_path / "b", lambda m: None)
    assert not torch.equal(load_bundle(tmp_path / "b")(X), model(X))  # hashes now agree with the change ...
    with pytest.raises(ExportError, match="differ from its reference"):
        verify_bundle(tmp_path / "b")  # ... but the outputs do not
    report = verify_bundle(tmp_path / "b", raise_on_mismatch=False)
    assert not report.ok and report.max_abs_error == pytest.approx(0.01, rel=1e-3)


def test_a_pickle_renamed_to_safetensors_is_never_unpickled(tmp_path: Path) -> None:
    save_bundle(MLP(6, 3, [8]), tmp_path / "b", example_inputs=X[:2])
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (marker.write_text, ("x",))

    (tmp_path / "b" / "model.safetensors").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ExportError, match="hash mismatch"):
        load_bundle(tmp_path / "b")
    reseal(tmp_path / "b", lambda m: None)
    torch.save(MLP(6, 3, [8]).state_dict(), tmp_path / "b" / "model.safetensors")
    reseal(tmp_path / "b", lambda m: None)
    with pytest.raises(ExportError, match="pickle"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(pickle.dumps(Exploit()))
    reseal(tmp_path / "b", lambda m: None)
    with pytest.raises(ExportError, match="never unpickles"):
        load_bundle(tmp_path / "b")
    assert not marker.exists()


@pytest.mark.parametrize(("ref", "match"), [
    ("subprocess:Popen", "not on the allowlist"),
    ("tessera.core.errors:ExportError", "not an nn.Module class"),
    ("tessera.core.models:NoSuchModel", "cannot be found"),
    ("torch.nn.modules.linear:Linear:x", "not of the form"),
])
def test_manifest_naming_a_foreign_or_unknown_class_is_refused(tmp_path: Path, ref: str, match: str) -> None:
    save_bundle(MLP(6, 3, [8]), tmp_path / "b", example_inputs=X[:2])

    def edit(m: dict) -> None:
        m["arch"]["ref"] = ref

    reseal(tmp_path / "b", edit)
    with pytest.raises(ExportError, match=match):
        load_bundle(tmp_path / "b")


def test_map_location_cpu_and_meta(tmp_path: Path) -> None:
    model = MLP(6, 3, [8])
    save_bundle(model, tmp_path / "b", example_inputs=X[:2])
    on_cpu = load_bundle(tmp_path / "b", map_location=torch.device("cpu"))
    assert all(p.device.type == "cpu" for p in on_cpu.parameters())
    shapes = load_bundle(tmp_path / "b", map_location="meta")
    assert all(p.is_meta for p in shapes.parameters())
    assert {k: v.shape for k, v in shapes.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.device("meta"):
        empty = MLP(6, 3, [8])
    filled = load_bundle(tmp_path / "b", model=empty)  # a meta model is materialised from the bundle
    assert not any(p.is_meta for p in filled.parameters()) and torch.equal(filled(X), model(X))


def test_loading_into_a_model_is_strict_about_names_and_shapes(tmp_path: Path) -> None:
    save_bundle(MLP(6, 3, [8]), tmp_path / "b", example_inputs=X[:2])
    with pytest.raises(ExportError, match=r"'fc0.weight' is \[8, 6\] in the bundle but \[9, 6\]"):
        load_bundle(tmp_path / "b", model=MLP(6, 3, [9]))
    with pytest.raises(ExportError, match="lacks"):
        load_bundle(tmp_path / "b", model=MLP(6, 3, [8, 8]))


def test_fp16_export_widens_the_tolerance_and_reports_the_error(tmp_path: Path) -> None:
    model = MLP(6, 3, [64, 64])
    save_bundle(model, tmp_path / "h", example_inputs=X, dtype=torch.float16)
    m = read_manifest(tmp_path / "h")
    assert m["weights_dtype"] == "float16" and {p["dtype"] for p in m["params"]} == {"float16"}
    half = load_bundle(tmp_path / "h")
    assert next(half.parameters()).dtype == torch.float16
    # oracle: the float32 model with every weight rounded through float16, run in float32
    rounded = MLP(6, 3, [64, 64])
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    err = float((rounded(X) - model(X)).abs().max().detach())
    assert m["tolerance"]["export_error"] == pytest.approx(err, rel=1e-6) and err > 1e-5  # beyond float32 bounds
    assert m["tolerance"]["atol"] >= 1e-2  # float32 would allow 1e-5
    report = verify_bundle(tmp_path / "h")
    assert report.ok and not report.exact and report.max_abs_error == pytest.approx(err, rel=1e-6)
    with pytest.raises(ExportError, match="changes the outputs"):
        save_bundle(model, tmp_path / "t", example_inputs=X, dtype=torch.float16, tolerance=(0.0, 1e-7))


def test_tar_bundle_round_trips_and_unsafe_members_are_refused(tmp_path: Path) -> None:
    import tarfile

    model = MLP(6, 3, [8])
    save_bundle(model, tmp_path / "b.tar", example_inputs=X[:2])
    assert (tmp_path / "b.tar").is_file() and torch.equal(load_bundle(tmp_path / "b.tar")(X), model(X))
    assert verify_bundle(tmp_path / "b.tar").exact
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        tar.add(tmp_path / "b.tar", arcname="../escape")
    with pytest.raises(ExportError, match="not a plain file"):
        load_bundle(tmp_path / "evil.tar")
    assert not (tmp_path.parent / "escape").exists()


def test_existing_bundle_is_not_overwritten_silently(tmp_path: Path) -> None:
    save_bundle(MLP(6, 3, [8]), tmp_path / "b", example_inputs=X[:2])
    with pytest.raises(ExportError, match="overwrite=True"):
        save_bundle(MLP(6, 3, [8]), tmp_path / "b", example_inputs=X[:2])
    other = MLP(6, 3, [8])
    save_bundle(other, tmp_path / "b", example_inputs=X[:2], overwrite=True)
    assert torch.equal(load_bundle(tmp_path / "b")(X), other(X))


def test_flmodel_export_records_its_provenance(tmp_path: Path) -> None:
    from tessera import FLModel

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(12, 6, generator=g) for _ in range(2)]
    ys = [torch.randint(0, 3, (12,), generator=g) for _ in range(2)]
    fl = FLModel(parties=["alice", "bob"], model=MLP(6, 3, [8]), loss_fn=nn.CrossEntropyLoss(),
                 optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1))
    fl.fit(x=xs, y=ys, rounds=2, batch_size=6)
    save_bundle(fl, tmp_path / "b", example_inputs=X[:4])
    prov = read_manifest(tmp_path / "b")["provenance"]
    assert (prov["strategy"], prov["rounds"], prov["parties"]) == ("FedAvg", 2, ["alice", "bob"])
    assert torch.equal(load_bundle(tmp_path / "b")(X), fl.predict(X))


def test_lora_adapted_model_round_trips(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")

    def lora_mlp() -> nn.Module:
        torch.manual_seed(3)
        return peft.get_peft_model(MLP(6, 3, [8]), peft.LoraConfig(r=2, target_modules=["fc0", "fc1"]))

    model = lora_mlp()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)  # LoRA B starts at zero; make the adapter matter
    with pytest.raises(ExportError, match="rebuildable=False"):
        save_bundle(model, tmp_path / "x", example_inputs=X[:4])
    save_bundle(model, tmp_path / "adapted", example_inputs=X[:4], rebuildable=False)
    fresh = lora_mlp()
    assert not torch.equal(fresh(X), model(X))
    assert torch.equal(load_bundle(tmp_path / "adapted", model=fresh)(X), model(X))
    assert verify_bundle(tmp_path / "adapted", model=lora_mlp()).exact
    merged = model.merge_and_unload()  # the serving form: a plain MLP, rebuildable from the manifest
    save_bundle(merged, tmp_path / "merged", example_inputs=X[:4])
    torch.testing.assert_close(load_bundle(tmp_path / "merged")(X), model(X))
