"""Measure one federated LoRA simulation in a fresh process: peak RSS, round time and bytes per round.

Peak RSS is a per-process high-water mark, so each measurement needs its own process:
`python -m tessera.llm.rss --clients 10 --arch minilm` runs one round (no evaluation) and writes one JSON line;
`measure(...)` starts those processes for you.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from tessera.core.errors import TesseraError


def measure(*, clients: int | Sequence[int], arch: str = "minilm", rounds: int = 1, train_size: int = 8,
            max_length: int = 16, hidden_size: int = 64, num_layers: int = 2, parallel: bool = False,
            timeout: float = 600.0) -> list[dict[str, Any]]:
    """Run one child process per client count (at once if `parallel`) and return their JSON reports."""
    counts = [clients] if isinstance(clients, int) else list(clients)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def start(n: int) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", "tessera.llm.rss", "--clients", str(n), "--arch", arch, "--rounds",
               str(rounds), "--train-size", str(train_size), "--max-length", str(max_length), "--hidden-size",
               str(hidden_size), "--num-layers", str(num_layers)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise TesseraError(f"the measurement process did not finish within {timeout} s") from None
        if proc.returncode != 0:
            raise TesseraError(f"the measurement process failed ({proc.returncode}): {err[-2000:]}")
        return dict(json.loads(out.strip().splitlines()[-1]))

    if parallel:
        procs = [start(n) for n in counts]
        return [finish(p) for p in procs]
    return [finish(start(n)) for n in counts]


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from tessera.horizontal.strategies import FedAvg
    from tessera.llm.lora import LoRAConfig
    from tessera.llm.models import LOADS, Arch, Head, ModelSpec
    from tessera.llm.run import peak_rss_mb, run_lora
    from tessera.llm.task import LoRATask

    arch = Arch(args.arch)
    spec = ModelSpec(arch=arch, head=Head.SEQ_CLS if arch is Arch.MINILM else Head.CAUSAL_LM,
                     max_length=args.max_length, hidden_size=args.hidden_size,
                     intermediate_size=2 * args.hidden_size, num_layers=args.num_layers)
    names = [f"c{i:02d}" for i in range(args.clients)]
    task = LoRATask(spec, LoRAConfig(r=4, alpha=8), clients=names, train_size=args.train_size, test_size=0,
                    batch_size=8)
    rss_before = peak_rss_mb()
    run = run_lora(task, names, rounds=args.rounds, evaluate=False, strategy=FedAvg(fraction_evaluate=0.0))
    s = run.summary()
    return {"clients": args.clients, "arch": arch.value, "rounds": args.rounds,
            "peak_rss_mb": peak_rss_mb(), "rss_before_run_mb": rss_before,
            "seconds_per_round": run.seconds_per_round, "bytes_per_round": s["bytes_per_round"],
            "full_model_bytes_per_round": s["full_model_bytes_per_round"], "bytes_ratio": s["bytes_ratio"],
            "adapter_tensor_bytes": run.adapter_bytes, "full_model_tensor_bytes": run.full_bytes,
            "base_loads": LOADS.get(spec, 0)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--arch", default="minilm", choices=["minilm", "llama", "qwen2"])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--train-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=16)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    sys.stdout.write(json.dumps(_run(p.parse_args(argv))) + "\n")


if __name__ == "__main__":
    main()
