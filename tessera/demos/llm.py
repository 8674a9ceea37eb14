"""`tessera demo llm` (and the report `tessera lora` prints): federated LoRA fine-tuning with per-client perplexity
before/after and bytes per round (adapters on the wire vs the full model)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


def _tables(summary: dict[str, Any], metric: str, topics: list[str]) -> tuple[Table, Table]:
    clients = Table(title=f"held-out {metric} per client (base model → after federated LoRA)")
    for col in ("client", "main topic", "before", "after", "change"):
        clients.add_column(col, justify="right")
    for i, (c, v) in enumerate(summary["clients"].items()):
        b, a = v["before"][metric], v["after"][metric]
        change = f"{(a - b) / b:+.0%}" if metric == "perplexity" else f"{a - b:+.2f}"
        clients.add_row(c, topics[i % len(topics)], f"{b:.2f}", f"{a:.2f}", change)
    traffic = Table(title="bytes per round (up + down, measured; full model: same messages with every weight)")
    for col in ("round", "adapters", "full model", "ratio", "seconds"):
        traffic.add_column(col, justify="right")
    for r, (b, f, s) in enumerate(zip(summary["bytes_per_round"], summary["full_model_bytes_per_round"],
                                      summary["seconds_per_round"], strict=True)):
        traffic.add_row(str(r + 1), f"{b / 1e6:.3f} MB", f"{f / 1e6:.1f} MB", f"{f / b:.0f}x", f"{s:.2f}")
    return clients, traffic


def _plot(summary: dict[str, Any], metric: str, out: Path, title: str, topics: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summary["clients"])
    before = [summary["clients"][c]["before"][metric] for c in names]
    after = [summary["clients"][c]["after"][metric] for c in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.arange(len(names))
    bars_b = ax1.bar(x - 0.2, before, 0.4, label="base model (before)", color="C7")
    bars_a = ax1.bar(x + 0.2, after, 0.4, label="after federated LoRA", color="C0")
    for bars in (bars_b, bars_a):
        ax1.bar_label(bars, fmt="%.1f" if metric == "perplexity" else "%.2f", fontsize=8)
    ax1.set_xticks(x, [f"{c}\n({topics[i % len(topics)]})" for i, c in enumerate(names)])
    ax1.set_ylabel(f"held-out {metric}" + (" (lower is better)" if metric == "perplexity" else ""))
    ax1.set_ylim(0, max(before + after) * 1.25)
    ax1.set_title(f"{metric} on each client's own text")
    ax1.legend(fontsize=8, loc="upper center", ncol=2)
    rounds = np.arange(1, len(summary["bytes_per_round"]) + 1)
    ax2.plot(rounds, summary["full_model_bytes_per_round"], "s--", color="C3", label="full model (FedAvg)")
    ax2.plot(rounds, summary["bytes_per_round"], "o-", color="C0", label="LoRA adapters (tessera)")
    ax2.set_yscale("log")
    ax2.set_xlabel("round")
    ax2.set_ylabel("bytes per round (log)")
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax2.set_title(f"traffic: adapters are {summary['bytes_ratio']:.0f}x smaller")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "llm.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_merged_pretrained(task: Any, params: Any, path: Path) -> Path:
    """The base with the adapter merged in, written by transformers' own `save_pretrained` (safetensors) with the
    tokenizer beside it: what a serving stack loads with `from_pretrained`, no tessera or peft needed."""
    from tessera.llm.lora import lora_template, merged_model

    merged: Any = merged_model(lora_template(task.spec, task.lora), params)
    merged.save_pretrained(path, safe_serialization=True)
    task.tokenizer.save_pretrained(path)
    return path


def run_and_report(out: Path, *, arch: str, path: str | None, clients: int, rounds: int, train_size: int,
                   test_size: int, rank: int, lr: float, max_length: int, hidden_size: int = 64,
                   num_layers: int = 2, export: str = "none") -> dict[str, Any]:
    """Run federated LoRA, print the tables, write summary.json and llm.png into `out`; with `export` "adapter"
    and/or "merged" ("both"), also the trained result as bundles `out/adapter`, `out/merged` (`tessera verify`)."""
    from tessera.llm import Arch, Head, LoRAConfig, LoRATask, ModelSpec
    from tessera.llm.data import topic_names
    from tessera.llm.run import run_lora

    a = Arch(arch)
    head = Head.SEQ_CLS if a is Arch.MINILM else Head.CAUSAL_LM
    spec = ModelSpec(arch=a, head=head, path=path, max_length=max_length, hidden_size=hidden_size,
                     intermediate_size=int(hidden_size * 2.6875), num_layers=num_layers)
    names = [f"client{i}" for i in range(clients)]
    task = LoRATask(spec, LoRAConfig(r=rank, alpha=2 * rank), clients=names, train_size=train_size,
                    test_size=test_size, batch_size=8, lr=lr)
    t0 = time.perf_counter()
    run = run_lora(task, names, rounds=rounds)
    summary = {"arch": a.value, "rounds": rounds, **run.summary()}
    metric = "accuracy" if head is Head.SEQ_CLS else "perplexity"
    ct, tt = _tables(summary, metric, topic_names(4))
    console.print(ct)
    console.print(tt)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    png = _plot(summary, metric, out, f"{a.value}: {clients} clients, non-IID topics, {rounds} rounds",
                topic_names(4))
    if export != "none":
        from tessera.llm.export import export_adapter, export_merged

        texts = task.text_fn(names[0]).test[:3]
        for kind, fn in (("adapter", export_adapter), ("merged", export_merged)):
            if export in (kind, "both"):
                bundle = fn(task, run.params_after, out / kind, texts=texts, overwrite=True)
                console.print(f"{kind} bundle: {bundle} (check it with `tessera verify {bundle}`)")
        if export in ("merged", "both"):
            hf = save_merged_pretrained(task, run.params_after, out / "merged-hf")
            console.print(f"merged model as a plain transformers checkpoint with its tokenizer: {hf} "
                          "(AutoModelForCausalLM / AutoTokenizer .from_pretrained)")
    console.print(f"adapter {run.adapter_bytes / 1e3:.1f} kB vs full model {run.full_bytes / 1e6:.2f} MB per "
                  f"message; peak RSS {run.peak_rss_mb:.0f} MiB; done in {time.perf_counter() - t0:.0f} s; "
                  f"plot: {png}")
    return summary


def demo_llm(out: Path, quick: bool = False) -> None:
    """4 clients, each writing mostly about one topic, fine-tune LoRA adapters on a tiny Llama decoder."""
    console.print("[bold]llm[/bold]: tiny Llama decoder (0.8M weights built from a config, byte tokenizer), LoRA "
                  "r=4 on q/v/lm_head, 4 clients with different topics, FedAvg of adapters only")
    run_and_report(out, arch="llama", path=None, clients=4, rounds=2 if quick else 4,
                   train_size=16 if quick else 48, test_size=8 if quick else 24, rank=4, lr=2e-2, max_length=48,
                   hidden_size=64 if quick else 128, num_layers=2 if quick else 4)

