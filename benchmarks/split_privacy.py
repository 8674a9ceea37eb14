"""Activation privacy, measured: model inversion (the label party decodes the owner's features from embeddings,
decoder trained on auxiliary rows) and label inference (the owner scores labels from returned gradients) against
no protection, embedding DP at several noise levels and a distance-correlation penalty (tessera.vertical.audit).

Writes benchmarks/results/split_privacy.json and docs/vertical_privacy.png (attack success against accuracy).
ratio = inversion R^2 at the strongest embedding DP / without protection (lower = better protection).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report

from tessera.vertical.audit import Measured, sweep, synthetic_task
from tessera.vertical.protections import Decorrelation, EmbeddingDP, Protections

PLOT = Path(__file__).resolve().parent.parent / "docs" / "vertical_privacy.png"


def plot(results: list[Measured]) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "inversion_r2", "model inversion R^2 (0 = nothing recovered)"),
                           (axes[1], "label_auc", "label inference AUC (0.5 = chance)")):
        for family, marker in (("none", "o"), ("dp", "s"), ("dcor", "^")):
            pts = [r for r in results if r.name.split()[0] == family]
            ax.plot([r.accuracy for r in pts], [getattr(r, key) for r in pts], marker=marker, label=family)
            for r in pts:
                ax.annotate(r.name.split()[-1] if family != "none" else "none", (r.accuracy, getattr(r, key)),
                            fontsize=7)
        ax.set_xlabel("test accuracy")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    noise = (0.05, 0.5) if args.quick else (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    alphas = (1.0,) if args.quick else (0.5, 1.0, 2.0, 4.0)
    settings = [("none", Protections())]
    settings += [(f"dp {m}", Protections(embedding_dp=EmbeddingDP(clip_norm=1.0, noise_multiplier=m))) for m in noise]
    settings += [(f"dcor {a}", Protections(decorrelation=Decorrelation(a))) for a in alphas]
    results = sweep(settings, synthetic_task())
    plot(results)
    rows = [[r.name, r.accuracy, r.inversion_r2, r.label_auc] for r in results]
    dp = [r for r in results if r.name.startswith("dp")]
    report("split_privacy", ["protection", "accuracy", "inversion R^2", "label inference AUC"], rows,
           ratio=dp[-1].inversion_r2 / max(results[0].inversion_r2, 1e-9),
           ratio_means="inversion R^2 at the strongest embedding DP / without protection",
           extra={"plot": str(PLOT)})


if __name__ == "__main__":
    main()
