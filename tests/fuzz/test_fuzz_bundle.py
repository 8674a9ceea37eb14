"""Fuzz the bundle readers (manifest JSON, manifest structure, tar container) with a fixed seed and budget.

Oracle: a hostile or corrupt bundle raises a TesseraError subclass or loads something the hashes vouch for; any
other exception (KeyError, TypeError, tarfile.ReadError, RecursionError, ...) fails the test. Budget, seed and the
inputs-tried report come from tests/fuzz/conftest.py (`make fuzz` raises TESSERA_FUZZ_EXAMPLES).
"""

import copy
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tessera.core.models import MLP
from tessera.export import load_bundle, save_bundle, verify_bundle
from tessera.export.manifest import MANIFEST, parse_manifest, seal, sha256_file
from tests.fuzz.conftest import FUZZ, mutate, mutations, only_tessera_errors

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    return save_bundle(MLP(4, 2, [3]), root / "b", example_inputs=torch.ones(2, 4), audit_log=False)


def paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_fields_resealed(good: Path, data: st.DataObject) -> None:
    """Any field of a valid manifest replaced by any JSON value, with a valid self-hash (the checks behind it run)."""
    manifest = json.loads((good / MANIFEST).read_text())
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    edits = data.draw(st.lists(st.tuples(st.sampled_from(paths(body)[1:]), json_values), min_size=1, max_size=3))
    for path, value in edits:
        node = body
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = copy.deepcopy(value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed the path
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "b"
        shutil.copytree(good, work)
        try:
            sealed = seal(body)
        except (TypeError, ValueError):
            return  # not JSON-encodable: cannot be written as a manifest
        (work / MANIFEST).write_text(json.dumps(sealed))
        only_tessera_errors("bundle manifest fields: verify", verify_bundle, work)
        only_tessera_errors("bundle manifest fields: load on meta", lambda: load_bundle(work, map_location="meta"))


@FUZZ
@given(raw=st.binary(max_size=512) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_manifest_bytes(raw: bytes) -> None:
    only_tessera_errors("bundle manifest bytes", lambda: parse_manifest(raw, where="fuzz"))


@FUZZ
@given(ops=mutations())
def test_fuzz_manifest_mutated(good: Path, ops: list[tuple[int, int, int]]) -> None:
    only_tessera_errors("bundle manifest mutated", lambda: parse_manifest(mutate((good / MANIFEST).read_bytes(), ops),
                                                                          where="fuzz"))


@FUZZ
@given(data=st.data())
def test_fuzz_tar_bytes(good: Path, data: st.DataObject) -> None:
    """A valid .tar bundle with bytes flipped, cut or inserted anywhere (headers, sizes, names, contents)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for f in sorted(good.iterdir()):
            tar.add(f, arcname=f.name)
    raw = bytearray(buf.getvalue())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "header"]))
        if op == "flip":
            raw[at] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[at:]
            if not raw:
                raw += b"\0"
        elif op == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=600))
        else:  # rewrite part of the first header block: name, mode, size, type fields
            field = data.draw(st.sampled_from([(0, 100), (100, 8), (124, 12), (156, 1), (157, 100)]))
            raw[field[0]:field[0] + field[1]] = data.draw(st.binary(min_size=field[1], max_size=field[1]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b.tar"
        path.write_bytes(bytes(raw))
        only_tessera_errors("bundle tar", load_bundle, path)


def test_unmutated_inputs_still_load(good: Path) -> None:
    """The fuzz targets start from inputs that work, so a refusal there is a real finding, not a broken seed."""
    assert verify_bundle(good).exact
    assert sha256_file(good / "model.safetensors")
