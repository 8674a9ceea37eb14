"""Self-contained demos: data that ships with the packages or is generated here, attacks, tables and plots.

Only `tessera.cli` imports this package (`tessera demo NAME`); the library and the tests never do. Every demo writes
its results (summary.json, PNGs, metrics) under the folder it is given.

Demos that show the job.toml path (hfl, scale, grpc) build their runs with the CLI's job reader, which sits above
them: the CLI hands it in as `build_parts` (`tessera.cli.jobs.build_parts`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tessera.core.errors import ConfigError

if TYPE_CHECKING:
    from tessera.core.config import JobConfig
    from tessera.horizontal.job import JobParts

JobBuilder = Callable[["JobConfig"], "JobParts"]


@dataclass(frozen=True)
class Demo:
    """`ref` is `module:function` under tessera.demos; the function takes (out, quick) and, when `uses_jobs`, the
    CLI's `build_parts` as a third argument."""

    ref: str
    help: str
    uses_jobs: bool = False


DEMOS: dict[str, Demo] = {
    "hfl": Demo("hfl:demo_hfl", "FedAvg vs FedProx on non-IID digits (the default)", uses_jobs=True),
    "robust": Demo("robust:demo_robust", "Byzantine clients vs FedAvg and the robust aggregators"),
    "secagg": Demo("secagg:demo_secagg", "plain vs SecAgg+ vs CKKS with 30% of clients dropping mid-round"),
    "dp": Demo("dp:demo_dp", "DP-SGD across rounds on synthetic IoT traffic, ended by its budget"),
    "split": Demo("split:demo_split", "PSI + split learning vs centralised, and label inference"),
    "export": Demo("export:demo_export", "train, export fp32/fp16/ONNX bundles, interrupted hand-over, verify"),
    "grpc": Demo("grpc:demo_grpc", "3 clients over loopback gRPC + mTLS vs simulation", uses_jobs=True),
    "llm": Demo("llm:demo_llm", "federated LoRA on a tiny Llama decoder"),
    "scale": Demo("scale:demo_scale", "1,000 virtual clients on Ray and in-process", uses_jobs=True),
    "pacing": Demo("pacing:demo_pacing", "10x speed spread: sync vs deadline vs FedBuff; compressed updates"),
}


def run(name: str, out: Path, *, quick: bool, build_parts: JobBuilder) -> None:
    """Run demo `name`, writing into `out`."""
    demo = DEMOS.get(name)
    if demo is None:
        raise ConfigError(f"unknown demo {name!r}; choose one of {sorted(DEMOS)}")
    module, _, attr = demo.ref.partition(":")
    fn = getattr(importlib.import_module(f"tessera.demos.{module}"), attr)
    if demo.uses_jobs:
        fn(out, quick, build_parts)
    else:
        fn(out, quick)
