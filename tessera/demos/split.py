"""`tessera demo split`: PSI + split learning on breast cancer, vs centralised training, and the label-inference
attack with and without protections."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
ALICE_COLS = 10  # alice (label party) holds the first 10 of the 30 features, bob the other 20


def demo_data(seed: int = 0) -> dict[str, Any]:
    """Breast cancer with shuffled, partly non-overlapping patient IDs at each party, aligned by PSI."""
    import numpy as np

    from tessera.core.datasets import breast_cancer
    from tessera.vertical.psi import intersect

    x, y = breast_cancer()
    rng = np.random.default_rng(seed)
    n = len(y)
    ids = np.array([f"patient-{i:04d}" for i in range(n)])
    a_rows = rng.permutation(np.arange(0, n - 40))  # alice misses the last 40 patients, bob the first 30
    b_rows = rng.permutation(np.arange(30, n))
    t0 = time.perf_counter()
    rows = intersect({"alice": list(ids[a_rows]), "bob": list(ids[b_rows])}, order_seed=seed)
    psi_s = time.perf_counter() - t0
    ra, rb = a_rows[rows["alice"]], b_rows[rows["bob"]]
    assert (ra == rb).all()  # the aligned rows are the same patients (the demo knows the truth; parties do not)
    xa, xb, ya = x[a_rows][:, :ALICE_COLS], x[b_rows][:, ALICE_COLS:], y[a_rows]
    xa, xb, ya = xa[rows["alice"]], xb[rows["bob"]], ya[rows["alice"]]
    test = np.arange(len(ya)) % 5 == 0
    return {"train": ({"alice": xa[~test], "bob": xb[~test]}, ya[~test]),
            "test": ({"alice": xa[test], "bob": xb[test]}, ya[test]),
            "psi": {"alice_ids": len(a_rows), "bob_ids": len(b_rows), "aligned": len(ra), "seconds": psi_s}}


def build(seed: int = 0) -> tuple[dict[str, Any], Any]:
    import torch
    from torch import nn

    from tessera.vertical import ConcatFuse

    torch.manual_seed(seed)
    bases = {"alice": nn.Sequential(nn.Linear(ALICE_COLS, 8), nn.Tanh()),
             "bob": nn.Sequential(nn.Linear(30 - ALICE_COLS, 8), nn.Tanh())}
    return bases, ConcatFuse(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1)))


def centralised(data: dict[str, Any], *, epochs: int, batch_size: int, lr: float) -> list[float]:
    """The same composed model trained by a plain PyTorch loop on the joined data: test AUC per epoch."""
    import torch
    from torch import nn

    from tessera.vertical import SplitModel
    from tessera.vertical.metrics import classification_metrics
    from tessera.vertical.trainer import batch_order

    (xtr, ytr), (xte, yte) = _tensors(data["train"]), _tensors(data["test"])
    model = SplitModel(*build(), label_party="alice")
    opt, loss_fn = torch.optim.Adam(model.parameters(), lr=lr), nn.BCEWithLogitsLoss()
    aucs = []
    for epoch in range(epochs):
        model.train()
        perm = batch_order(seed=0, epoch=epoch, n=len(ytr), shuffle=True)
        for i in range(0, len(ytr), batch_size):
            r = perm[i : i + batch_size]
            loss = loss_fn(model({p: v[r] for p, v in xtr.items()}), ytr[r])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            aucs.append(classification_metrics(model(xte), yte)["auc"])
    return aucs


def _tensors(part: tuple[dict[str, Any], Any]) -> tuple[dict[str, Any], Any]:
    import torch

    x, y = part
    return {p: torch.from_numpy(v) for p, v in x.items()}, torch.from_numpy(y).float().unsqueeze(1)


def split_run(data: dict[str, Any], protections: Any, *, epochs: int, batch_size: int, lr: float,
              out: Path | None) -> tuple[Any, dict[str, float]]:
    import torch
    from torch import nn

    import tessera
    from tessera.vertical.attacks import spy_on

    (xtr, ytr), (xte, yte) = _tensors(data["train"]), _tensors(data["test"])
    bases, fuse = build()
    sl = tessera.SLModel(base_models=bases, fuse_model=fuse, label_party="alice", loss_fn=nn.BCEWithLogitsLoss(),
                         optimizer_fn=lambda p: torch.optim.Adam(p, lr=lr), protections=protections, output_dir=out)
    spy = spy_on(sl)  # bob, curious, keeps every gradient he receives
    history = sl.fit(x=xtr, y=ytr, epochs=epochs, batch_size=batch_size, validation_data=(xte, yte))
    first_epoch = slice(0, -(-len(ytr) // batch_size))  # leakage is largest before the model fits the data
    return history, {**spy.report(ytr, steps=first_epoch), "test_auc": sl.evaluate(x=xte, y=yte)["auc"]}


def demo_split(out: Path, quick: bool = False) -> None:
    """PSI-align breast cancer split by columns (alice: labels + 10 features, bob: 20), train split vs
    centralised, then measure label inference by bob with and without each protection."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small only lose from intra-op threads (and the cores are shared)
    try:
        _demo_split(out, quick)
    finally:
        torch.set_num_threads(threads)


def _demo_split(out: Path, quick: bool) -> None:
    from tessera.vertical import EmbeddingDP, GradientPerturbation, LabelDP, Protections

    epochs, batch_size, lr = (2 if quick else 15), 32, 0.01
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = demo_data()
    psi = data["psi"]
    console.print(f"PSI: alice {psi['alice_ids']} IDs, bob {psi['bob_ids']} IDs -> {psi['aligned']} aligned rows "
                  f"in {psi['seconds']:.2f} s (no raw ID crossed the wire)")
    history, plain = split_run(data, None, epochs=epochs, batch_size=batch_size, lr=lr, out=out / "split")
    central = centralised(data, epochs=epochs, batch_size=batch_size, lr=lr)
    table = Table(title=f"breast cancer, split (alice+bob) vs centralised, {epochs} epochs")
    for c in ("epoch", "split test AUC", "centralised test AUC"):
        table.add_column(c, justify="right")
    for i, (s_auc, c_auc) in enumerate(zip(history["eval_metrics.auc"], central, strict=True)):
        table.add_row(str(i + 1), f"{s_auc:.4f}", f"{c_auc:.4f}")
    console.print(table)
    settings = {"none": Protections(),
                "gradient clip": Protections(gradient=GradientPerturbation(clip_norm=1e-4)),
                "gradient noise": Protections(gradient=GradientPerturbation(clip_norm=1e-3, noise_multiplier=1.0)),
                "label DP (RR, eps=1)": Protections(label_dp=LabelDP(epsilon=1.0)),
                "embedding DP": Protections(embedding_dp=EmbeddingDP(clip_norm=1.0, noise_multiplier=0.5))}
    attacks = {"none": plain}
    for name, prot in settings.items():
        if name != "none":
            attacks[name] = split_run(data, prot, epochs=epochs, batch_size=batch_size, lr=lr, out=None)[1]
    att = Table(title="label inference by bob from the gradients of epoch 1 (attack AUC: 0.5 = chance)")
    for c in ("protection", "norm attack AUC", "direction attack AUC", "model test AUC"):
        att.add_column(c, justify="right")
    for name, r in attacks.items():
        att.add_row(name, f"{r['norm_attack_auc']:.3f}", f"{r['direction_attack_auc']:.3f}", f"{r['test_auc']:.4f}")
    console.print(att)
    png = _plot(out, history["eval_metrics.auc"], central, attacks)
    summary = {"psi": psi, "epochs": epochs, "split_test_auc": history["eval_metrics.auc"],
               "centralised_test_auc": central, "attacks": attacks, "plot": str(png)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"done in {time.perf_counter() - t0:.0f} s; {png}, {out / 'summary.json'}")


def _plot(out: Path, split_auc: list[float], central_auc: list[float], attacks: dict[str, dict[str, float]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    epochs = np.arange(1, len(split_auc) + 1)
    left.plot(epochs, central_auc, "-", color="C0", linewidth=4, alpha=0.4, label="centralised")
    left.plot(epochs, split_auc, "--o", color="C1", markersize=4, label="split learning (alice + bob)")
    left.set(xlabel="epoch", ylabel="test AUC", title="test AUC: split equals centralised")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.grid(alpha=0.3)
    left.legend()
    names = list(attacks)
    pos = np.arange(len(names))
    right.bar(pos - 0.2, [attacks[n]["norm_attack_auc"] for n in names], 0.4, label="norm attack")
    right.bar(pos + 0.2, [attacks[n]["direction_attack_auc"] for n in names], 0.4, label="direction attack")
    right.axhline(0.5, color="grey", linestyle=":", label="chance")
    right.set_xticks(pos, names, rotation=20, ha="right", fontsize=8)
    right.set(ylim=(0.4, 1.12), ylabel="attack AUC (bob infers alice's labels)", title="what each protection buys")
    right.legend(fontsize=8, ncol=3, loc="upper center")
    fig.tight_layout()
    path = out / "split_demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

