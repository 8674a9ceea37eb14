"""`tessera demo export`: train on digits, export fp32 / fp16 / ONNX bundles, hand one over across a connection
that breaks once (resumed), and verify every copy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from tessera.core.errors import TesseraError

console = Console()


def demo_export(out: Path, quick: bool = False) -> None:
    """Train on digits, export fp32 / fp16 / ONNX bundles, hand one over with an interrupted connection, verify."""
    import time

    import torch
    from rich.table import Table
    from torch import nn

    from tessera import FLModel
    from tessera.core.datasets import digits
    from tessera.core.models import MLP
    from tessera.export import BundleReceiver, load_bundle, save_bundle, send_bundle, verify_bundle
    from tessera.runtime.backend import InProcessBackend

    out.mkdir(parents=True, exist_ok=True)
    x, y = (torch.from_numpy(a) for a in digits())
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[:360], perm[360:]
    shards = [train[i::3] for i in range(3)]
    fl = FLModel(parties=["alice", "bob", "carol"], model=MLP(64, 10, [64]), loss_fn=nn.CrossEntropyLoss(),
                 optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1))
    fl.fit(x=[x[s] for s in shards], y=[y[s] for s in shards], rounds=3 if quick else 10, batch_size=32)
    xt, yt = x[test], y[test]
    trained = fl.predict(xt)
    rows: list[dict[str, Any]] = []
    for variant, kw in (("float32", {}), ("float16", {"dtype": torch.float16}), ("float32 + onnx", {"onnx": True})):
        path = save_bundle(fl, out / variant.replace(" + ", "_"), example_inputs=xt[:32], overwrite=True, **kw)
        t0 = time.perf_counter()
        report = verify_bundle(path)
        served = load_bundle(path).float()
        with torch.no_grad():
            pred = served(xt)
        rows.append({"variant": variant, "bytes": sum(f.stat().st_size for f in path.iterdir()),
                     "max_abs_error": float((pred - trained).abs().max()), "atol": report.checks[0].atol,
                     "bit_exact": bool(torch.equal(pred, trained)), "verified": report.ok,
                     "accuracy": float((pred.argmax(1) == yt).float().mean()),
                     "onnx_error": max((c.max_abs_error for c in report.checks if c.runtime == "onnxruntime"),
                                       default=None), "verify_seconds": time.perf_counter() - t0})
    receiver = BundleReceiver(out / "serving")
    backend = _DropOnce(InProcessBackend(receiver), at=3)
    src = out / "float32"
    first_error = ""
    try:
        send_bundle(backend, src, to="serving", name="handed-over", chunk_bytes=8192, compression="zstd")
    except TesseraError as exc:
        first_error = type(exc).__name__
    ho = send_bundle(backend, src, to="serving", name="handed-over", chunk_bytes=8192, compression="zstd")
    handed = verify_bundle(out / "serving" / "handed-over")
    table = Table(title=f"digits MLP after {fl.rounds_done} FedAvg rounds over 3 parties: exported bundles")
    for col in ("bundle", "bytes", "max |pred - trained|", "verify atol", "bit-exact", "verified", "accuracy",
                "onnx error"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["variant"], f"{r['bytes']:,}", f"{r['max_abs_error']:.2e}", f"{r['atol']:.1e}",
                      "yes" if r["bit_exact"] else "no", "yes" if r["verified"] else "NO", f"{r['accuracy']:.3f}",
                      "-" if r["onnx_error"] is None else f"{r['onnx_error']:.1e}")
    console.print(table)
    console.print(f"hand-over: first attempt broke ({first_error}); resumed with {ho.resumed_bytes:,} of "
                  f"{ho.total_bytes:,} bytes already there, sent {ho.payload_bytes:,} zstd bytes in {ho.chunks} "
                  f"chunks; received copy verified: {handed.ok} (bit-exact {handed.exact})")
    summary = {"rounds": fl.rounds_done, "bundles": rows,
               "handover": {"interrupted": first_error, "resumed_bytes": ho.resumed_bytes,
                            "total_bytes": ho.total_bytes, "payload_bytes": ho.payload_bytes,
                            "verified": handed.ok, "exact": handed.exact}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    png = _plot(rows, out / "export.png")
    console.print(f"wrote {out / 'summary.json'} and {png}")


class _DropOnce:
    """A backend whose connection breaks once, on exchange number `at` (for the hand-over demo)."""

    def __init__(self, inner: Any, *, at: int) -> None:
        self.inner, self.at, self.calls, self.traffic = inner, at, 0, inner.traffic

    def start(self, clients: list[str]) -> None:
        self.inner.start(clients)

    def exchange(self, requests: Any, *, timeout: float | None = None) -> dict[str, Any]:
        from tessera.runtime.backend import ClientFailure

        self.calls += 1
        if self.calls == self.at:
            return {c: ClientFailure(c, "connection reset") for c in requests}
        return dict(self.inner.exchange(requests, timeout=timeout))

    def close(self) -> None:
        self.inner.close()


def _plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    a.bar(names, [r["bytes"] / 1024 for r in rows], color=["tab:blue", "tab:orange", "tab:green"])
    a.set_ylabel("bundle size on disk (KiB)")
    a.set_title("size (weights + reference rows + manifest)", fontsize=10)
    errs = [max(r["max_abs_error"], 1e-10) for r in rows]
    b.bar(names, errs, color=["tab:blue", "tab:orange", "tab:green"], label="max |pred - trained|")
    b.scatter(names, [r["atol"] for r in rows], color="black", marker="_", s=600, zorder=3, label="verify atol")
    onnx = [(n, r["onnx_error"]) for n, r in zip(names, rows, strict=True) if r["onnx_error"] is not None]
    if onnx:
        b.scatter([n for n, _ in onnx], [e for _, e in onnx], color="tab:red", marker="x", s=80, zorder=4,
                  label="onnxruntime vs reference")
    for i, r in enumerate(rows):
        if r["max_abs_error"] == 0:
            b.text(i, 2e-10, "0: bit-exact", ha="center", fontsize=8)
    b.set_yscale("log")
    b.set_ylim(1e-10, 1)
    b.set_title("max |prediction error| after reload")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
