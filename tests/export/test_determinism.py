"""Byte-identical bundles for identical weights, constructor-argument export (record_init), map_location errors."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tessera.core.errors import ExportError
from tessera.core.models import MLP
from tessera.export import Provenance, load_bundle, save_bundle, verify_bundle
from tessera.export.manifest import read_manifest
from tests.export.models import Recorded, RecordedChild

X = torch.randn(8, 6, generator=torch.Generator().manual_seed(4))
EXPORT = """
import sys, torch
from tessera.core.models import MLP
from tessera.export import Provenance, save_bundle
torch.manual_seed(0)
model = MLP(6, 3, [8]).to(torch.bfloat16 if sys.argv[2] == 'bf16' else torch.float32)
x = torch.randn(8, 6, generator=torch.Generator().manual_seed(4)).to(next(model.parameters()).dtype)
save_bundle(model, sys.argv[1], example_inputs=x[:4], provenance=Provenance(strategy='FedAvg', rounds=3))
"""


def digests(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(path.iterdir())
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.suffix != ".jsonl"}


def export_in_fresh_process(path: Path, dtype: str = "fp32") -> Path:
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    subprocess.run([sys.executable, "-c", EXPORT, str(path), dtype], check=True, env=env, timeout=120)
    return path


def test_the_same_weights_exported_twice_hash_identically(tmp_path: Path) -> None:
    # Two processes (safetensors' metadata order used to change between them), a directory and a tar.
    a = export_in_fresh_process(tmp_path / "a")
    torch.manual_seed(0)
    model = MLP(6, 3, [8])
    save_bundle(model, tmp_path / "b", example_inputs=X[:4], provenance=Provenance(strategy="FedAvg", rounds=3))
    assert digests(a) == digests(tmp_path / "b")
    tar_a = export_in_fresh_process(tmp_path / "a.tar")
    save_bundle(model, tmp_path / "b.tar", example_inputs=X[:4], provenance=Provenance(strategy="FedAvg", rounds=3))
    assert list(digests(tar_a).values()) == list(digests(tmp_path / "b.tar").values())
    # other provenance (a deployed vs a simulated run): other manifest digest, same content digest
    save_bundle(model, tmp_path / "c", example_inputs=X[:4], provenance=Provenance(strategy="FedAvg", rounds=3,
                                                                                     parties=("alice",)))
    ra, rc = verify_bundle(a), verify_bundle(tmp_path / "c")
    assert ra.digest != rc.digest and ra.content_digest == rc.content_digest


def test_tessera_safetensors_files_are_standard_and_bf16_survives(tmp_path: Path) -> None:
    b = export_in_fresh_process(tmp_path / "bf", "bf16")
    torch.manual_seed(0)
    model = MLP(6, 3, [8]).to(torch.bfloat16)
    assert all(torch.equal(load_file(b / "model.safetensors")[k], v) for k, v in model.state_dict().items())
    assert torch.equal(load_bundle(b)(X.bfloat16()), model(X.bfloat16()))


def test_a_class_without_config_exports_its_recorded_constructor_arguments(tmp_path: Path) -> None:
    model = Recorded(6, hidden=5, head=torch.nn.Linear(5, 4))
    save_bundle(model, tmp_path / "b", example_inputs=X[:2])
    arch = read_manifest(tmp_path / "b")["arch"]
    assert arch["kwargs"] == {"features": 6, "hidden": 5}
    assert arch["modules"]["head"]["kwargs"] == {"in_features": 5, "out_features": 4, "bias": True}
    loaded = load_bundle(tmp_path / "b", allow=["tests.export.models"])
    assert type(loaded) is Recorded and torch.equal(loaded(X), model(X))
    with pytest.raises(ExportError, match=r"decorate RecordedChild with @tessera\.export\.record_init"):
        save_bundle(RecordedChild(6), tmp_path / "c", example_inputs=X[:2])


def test_bare_class_error_names_the_three_choices(tmp_path: Path) -> None:
    from tests.export.models import Bare

    with pytest.raises(ExportError, match=r"record_init.*`config`.*kwargs=.*rebuildable=False"):
        save_bundle(Bare(6), tmp_path / "b", example_inputs=X[:2])


@pytest.mark.parametrize(("location", "cuda_count", "match"), [
    ("cuda:0", 0, "no CUDA device"),
    ("cuda", 0, "no CUDA device"),
    ("cuda:3", 1, r"has 1 CUDA device\(s\) \(cuda:0..cuda:0\)"),
    ("mps", 0, "Apple silicon"),
    ("tpu:0", 0, "is not a device"),
])
def test_unavailable_map_location_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     location: str, cuda_count: int, match: str) -> None:
    save_bundle(MLP(6, 3, [8]), tmp_path / "b", example_inputs=X[:2])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_count)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ExportError, match=match):
        load_bundle(tmp_path / "b", map_location=location)


@pytest.mark.gpu
def test_bundle_saved_from_cuda_loads_on_cpu_and_verifies(tmp_path: Path) -> None:
    model = MLP(6, 3, [8]).cuda()
    save_bundle(model, tmp_path / "b", example_inputs=X[:4].cuda())
    assert verify_bundle(tmp_path / "b").ok
    on_gpu = load_bundle(tmp_path / "b", map_location="cuda:0")
    torch.testing.assert_close(on_gpu(X.cuda()).cpu(), model(X.cuda()).cpu(), rtol=1e-5, atol=1e-6)
