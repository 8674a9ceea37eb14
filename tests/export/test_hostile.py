"""Hostile bundles: each input a malicious exporter or a corrupted transfer could produce is refused with an
ExportError (a TesseraError) before it costs memory, disk or code execution."""

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from tessera.core.errors import ExportError, TesseraError
from tessera.core.models import MLP
from tessera.export import BundleReceiver, load_bundle, save_bundle, verify_bundle
from tessera.export.handover import BundleChunk, BundleCommit, BundleOffer
from tessera.export.manifest import MANIFEST, read_manifest, seal
from tests.export.test_bundle import reseal

X = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return save_bundle(MLP(6, 3, [8]), tmp_path / "b", example_inputs=X[:2], audit_log=False)


def set_arch(bundle: Path, arch: dict) -> None:
    def edit(m: dict) -> None:
        m["arch"] = arch

    reseal(bundle, edit)


def test_allowlisted_module_reexporting_a_foreign_class_is_refused(bundle: Path) -> None:
    # tessera.core.serde imports torch, so this path walks from an allowlisted module to any torch class
    set_arch(bundle, {"ref": "tessera.core.serde:torch.ao.nn.quantized.Linear", "kwargs": {}})
    with pytest.raises(ExportError, match=r"resolves to torch\.ao\.nn\.quantized\.modules\.linear:Linear"):
        load_bundle(bundle)
    set_arch(bundle, {"ref": "tessera.core.models:MLP.__subclasses__", "kwargs": {}})
    with pytest.raises(ExportError, match="private or invalid"):
        load_bundle(bundle)


@pytest.mark.parametrize(("spec", "match"), [
    ({"arch": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_layers": 32}, "not a LoRA adapter"),
    ({"arch": "llama", "hidden_size": 10**7}, r"hidden_size=10000000 is outside"),
    ({"arch": "llama", "nonsense": 1}, "malformed"),
])
def test_lora_adapter_manifest_is_checked_before_any_base_is_built(bundle: Path, spec: dict, match: str) -> None:
    from tessera.llm import models

    set_arch(bundle, {"ref": "tessera.llm.export:LoRAAdapter", "kwargs": {"spec": spec, "lora": {"r": 8}}})
    loads = dict(models.LOADS)
    with pytest.raises(ExportError, match=match):
        load_bundle(bundle)
    assert loads == models.LOADS  # oracle: no base model was constructed


def test_adapter_bundle_resolves_its_base_relative_to_the_bundle(bundle: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def edit(m: dict) -> None:
        m["arch"] = {"ref": "tessera.llm.export:LoRAAdapter", "relative": [["spec", "path"]],
                     "kwargs": {"spec": {"arch": "local", "path": "base-model"}, "lora": {"r": 8}}}

    reseal(bundle, edit)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ExportError) as err:
        verify_bundle(bundle)
    message = str(err.value)
    assert str(tmp_path / "base-model") in message and "\n" not in message and "huggingface" not in message


def sparse_tar(tmp_path: Path, bundle: Path) -> Path:
    """A real bundle plus a 512 MiB sparse member: a few KB on disk."""
    work = tmp_path / "sparse"
    shutil.copytree(bundle, work)
    with open(work / "model.safetensors", "r+b") as fh:
        fh.truncate(512 * 1024**2)
    out = tmp_path / "sparse.tar"
    subprocess.run(["tar", "-cSf", str(out), "-C", str(work), "."], check=True)
    return out


def test_sparse_tar_member_is_refused_without_writing_it(bundle: Path, tmp_path: Path) -> None:
    tar_path = sparse_tar(tmp_path, bundle)
    assert tar_path.stat().st_size < 64 * 1024
    with pytest.raises(ExportError, match="not a plain file"):
        load_bundle(tar_path)


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def bundle_members(bundle: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(bundle.iterdir())}


def test_tar_members_are_bounded_and_hashed_by_the_manifest(bundle: Path, tmp_path: Path) -> None:
    good = bundle_members(bundle)
    assert torch.equal(load_bundle(make_tar(tmp_path / "ok.tar", good))(X), load_bundle(bundle)(X))
    with pytest.raises(ExportError, match="does not list"):
        load_bundle(make_tar(tmp_path / "extra.tar", {**good, "payload.bin": b"x" * 100}))
    big = {**good, "model.safetensors": good["model.safetensors"] + b"\0" * 4096}
    with pytest.raises(ExportError, match="the manifest says"):
        load_bundle(make_tar(tmp_path / "big.tar", big))
    flipped = bytearray(good["model.safetensors"])
    flipped[-1] ^= 1
    with pytest.raises(ExportError, match="hash mismatch"):
        load_bundle(make_tar(tmp_path / "flip.tar", {**good, "model.safetensors": bytes(flipped)}))
    with pytest.raises(ExportError, match="twice"):
        with tarfile.open(tmp_path / "dup.tar", "w") as tar:
            for name in [*good, MANIFEST]:
                info = tarfile.TarInfo(name)
                info.size = len(good[name])
                tar.addfile(info, io.BytesIO(good[name]))
        load_bundle(tmp_path / "dup.tar")
    link = tarfile.TarInfo("model.safetensors")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with tarfile.open(tmp_path / "link.tar", "w") as tar:
        tar.addfile(link)
    with pytest.raises(ExportError, match="not a plain file"):
        load_bundle(tmp_path / "link.tar")


def test_compressed_or_corrupt_tar_is_an_export_error(bundle: Path, tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "b.tar.gz", "w:gz") as tar:
        tar.add(bundle, arcname=".")
    with pytest.raises(ExportError, match="gzip-compressed"):
        load_bundle(tmp_path / "b.tar.gz")
    tar_bytes = make_tar(tmp_path / "ok.tar", bundle_members(bundle)).read_bytes()
    (tmp_path / "cut.tar").write_bytes(tar_bytes[: len(tar_bytes) // 3])
    (tmp_path / "noise.tar").write_bytes(bytes(range(256)) * 40)
    for bad in ("cut.tar", "noise.tar"):
        with pytest.raises(TesseraError):
            load_bundle(tmp_path / bad)


@pytest.mark.parametrize("name", ["../evil.onnx", "/tmp/evil.onnx", "model.safetensors", "missing.onnx"])
def test_onnx_entry_must_name_a_hashed_onnx_file(bundle: Path, name: str) -> None:
    def edit(m: dict) -> None:
        m["onnx"] = {"file": name, "opset": 17}

    reseal(bundle, edit)
    with pytest.raises(ExportError, match="onnx"):
        verify_bundle(bundle)


def test_handover_refuses_files_the_manifest_does_not_list(bundle: Path, tmp_path: Path) -> None:
    receiver = BundleReceiver(tmp_path / "recv", audit_log=False)
    files = {f.name: f.read_bytes() for f in bundle.iterdir()} | {"payload.sh": b"#!/bin/sh\necho owned\n"}
    tid = read_manifest(bundle)["manifest_sha256"]
    names = sorted(files)
    receiver.handle("alice", BundleOffer(tid, "b", names, [len(files[n]) for n in names],
                                         [hashlib.sha256(files[n]).hexdigest() for n in names], "none"))
    for n in names:
        receiver.handle("alice", BundleChunk(tid, n, 0, len(files[n]), False, files[n]))
    receipt = receiver.handle("alice", BundleCommit(tid))
    assert not receipt.ok and "does not list" in receipt.reason
    assert not (tmp_path / "recv" / "b").exists()


def test_structurally_wrong_manifests_are_export_errors(bundle: Path) -> None:
    edits = [lambda m: m.update(params=[{"name": "w"}]), lambda m: m.update(files="x"),
             lambda m: m.update(tolerance={"rtol": "a"}), lambda m: m["files"].append(dict(m["files"][0])),
             lambda m: m.update(inputs={"args": [{"shape": [-1], "dtype": "float32"}], "kwargs": {}})]
    for edit in edits:
        work = bundle.with_name("w")
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(bundle, work)
        m = json.loads((work / MANIFEST).read_text())
        edit(m)
        (work / MANIFEST).write_text(json.dumps(seal(m)))  # a valid self-hash over a malformed body
        with pytest.raises(ExportError, match="corrupt"):
            load_bundle(work)
    (bundle / MANIFEST).write_text(json.dumps({"format": "tessera-bundle", "format_version": 1}) + "x")
    with pytest.raises(ExportError):
        load_bundle(bundle)
