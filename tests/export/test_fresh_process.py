"""Save here, load in a fresh Python process: identical predictions for an HFL, a split and a LoRA-adapted model.

The LoRA-adapted model is exported in its serving form (adapters merged into a plain module), so the child
needs neither peft nor the adapter config; the adapter-only bundle is covered in-process in test_bundle.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tessera.core.models import MLP
from tessera.export import fused_model, save_bundle
from tessera.vertical.model import ConcatFuse

CHILD = """
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from tessera.export import load_bundle, verify_bundle

root = Path(sys.argv[1])
x = load_file(root / "inputs.safetensors")
hfl = load_bundle(root / "hfl")
split = load_bundle(root / "split")
lora = load_bundle(root / "lora")
with torch.no_grad():
    preds = {"hfl": hfl(x["x"]), "split": split(alice=x["xa"], bob=x["xb"]), "lora": lora(x["x"])}
save_file({k: v.contiguous() for k, v in preds.items()}, root / "child.safetensors")
exact = {n: verify_bundle(root / n).exact for n in preds}
print(json.dumps({"torch_threads": torch.get_num_threads(), "exact": exact}))
"""


@pytest.mark.slow
def test_predictions_are_bit_identical_in_a_fresh_process(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    x, xa, xb = torch.randn(32, 6, generator=g), torch.randn(32, 4, generator=g), torch.randn(32, 3, generator=g)
    hfl = MLP(6, 3, [16])
    bases = {"alice": nn.Sequential(nn.Linear(4, 5), nn.ReLU()), "bob": MLP(3, 2, [6])}
    split = fused_model(base_models=bases, fuse_model=ConcatFuse(nn.Linear(7, 2)), label_party="alice",
                        party="alice")
    save_bundle(hfl, tmp_path / "hfl", example_inputs=x[:4])
    save_bundle(split, tmp_path / "split", example_inputs={"alice": xa[:4], "bob": xb[:4]}, party="alice")
    peft = pytest.importorskip("peft")
    adapted = peft.get_peft_model(MLP(6, 3, [16]), peft.LoraConfig(r=2, target_modules=["fc0", "fc1"]))
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)  # LoRA B starts at zero; make the adapter change the predictions
    lora = adapted.merge_and_unload()
    save_bundle(lora, tmp_path / "lora", example_inputs=x[:4])
    save_file({"x": x, "xa": xa, "xb": xb}, tmp_path / "inputs.safetensors")
    with torch.no_grad():  # the parent's predictions, on the same fresh copies of the inputs the child reads
        inputs = load_file(tmp_path / "inputs.safetensors")
        inputs = {k: v.clone() for k, v in inputs.items()}
        want = {"hfl": hfl(inputs["x"]), "split": split(alice=inputs["xa"], bob=inputs["xb"]),
                "lora": lora(inputs["x"])}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-c", "import torch; torch.set_num_threads(1)\n" + CHILD, str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["exact"] == {"hfl": True, "split": True, "lora": True}
    got = load_file(tmp_path / "child.safetensors")
    for name, pred in want.items():
        assert torch.equal(got[name], pred), name
