"""`tessera lora`: federated LoRA fine-tuning on generated non-IID text, with the demo's tables and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tessera.core.errors import ConfigError


def register(app: typer.Typer) -> None:
    @app.command()
    def lora(
        *,
        arch: Annotated[str, typer.Option(help="llama | qwen2 (tiny, built from a config) | minilm | local")] = "llama",
        path: Annotated[str | None, typer.Option(help="checkpoint directory for --arch local")] = None,
        clients: Annotated[int, typer.Option(help="number of simulated clients")] = 4,
        rounds: Annotated[int, typer.Option(help="federated rounds")] = 3,
        train_size: Annotated[int, typer.Option(help="training sentences per client")] = 64,
        test_size: Annotated[int, typer.Option(help="held-out sentences per client")] = 32,
        rank: Annotated[int, typer.Option(help="LoRA rank r (alpha = 2r)")] = 4,
        lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 2e-2,
        max_length: Annotated[int, typer.Option(help="tokens per sentence")] = 48,
        hidden_size: Annotated[int, typer.Option(help="width of a built decoder")] = 128,
        num_layers: Annotated[int, typer.Option(help="layers of a built decoder")] = 4,
        out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/lora"),
        export: Annotated[str, typer.Option(help="also write the result as a bundle: adapter | merged | both | "
                                                 "none (OUT/adapter, OUT/merged; check with `tessera verify`)")
                          ] = "adapter",
    ) -> None:
        """Federated LoRA fine-tuning on generated non-IID text; per-client metrics and bytes per round."""
        from tessera.demos.llm import run_and_report
        from tessera.llm import Arch

        choices = [a.value for a in Arch]
        if arch not in choices:
            raise ConfigError(f"--arch {arch}: unknown architecture; choose one of {choices}")
        if arch == Arch.LOCAL.value:
            if path is None:
                raise ConfigError("--arch local needs --path DIR, a local checkpoint folder (config.json, weights, "
                                  "tokenizer files as written by save_pretrained)")
            if not (Path(path) / "config.json").is_file():
                what = "does not exist" if not Path(path).exists() else "has no config.json"
                raise ConfigError(f"--path {path}: {what}; give a local checkpoint folder written by "
                                  "save_pretrained (nothing is downloaded)")
        elif path is not None:
            raise ConfigError(f"--path is only for --arch local (got --arch {arch})")
        if export not in ("adapter", "merged", "both", "none"):
            raise ConfigError(f"--export {export}: choose adapter, merged, both or none")

        run_and_report(out, arch=arch, path=path, clients=clients, rounds=rounds, train_size=train_size,
                       test_size=test_size, rank=rank, lr=lr, max_length=max_length, hidden_size=hidden_size,
                       num_layers=num_layers, export=export)
