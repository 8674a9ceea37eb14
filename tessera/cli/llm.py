"""`tessera lora`: federated LoRA fine-tuning on generated non-IID text, with the demo's tables and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


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
    ) -> None:
        """Federated LoRA fine-tuning on generated non-IID text; per-client metrics and bytes per round."""
        from tessera.demos.llm import run_and_report

        run_and_report(out, arch=arch, path=path, clients=clients, rounds=rounds, train_size=train_size,
                       test_size=test_size, rank=rank, lr=lr, max_length=max_length, hidden_size=hidden_size,
                       num_layers=num_layers)
