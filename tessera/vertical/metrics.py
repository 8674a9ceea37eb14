"""Evaluation metrics of a split model's outputs and the PNG curves of a split run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from tessera.core.metrics import History, Panel, plot_history


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank statistic (ties get half credit); nan if only one class is present."""
    labels = labels.astype(bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def classification_metrics(outputs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """accuracy (and auc for binary tasks) from logits: one logit per row (sigmoid) or one per class (softmax)."""
    out = outputs.detach().float()
    if out.dim() == 2 and out.shape[1] == 1:
        out = out[:, 0]
    labels = y.detach().reshape(-1)
    if out.dim() == 1:
        if not bool(((labels == 0) | (labels == 1)).all()):
            return {}  # a regression target: no classification metrics
        score = out.numpy()
        pred = (out > 0).long()
        return {"accuracy": float((pred == labels.long()).float().mean()),
                "auc": binary_auc(score, labels.long().numpy())}
    if out.dim() != 2 or labels.is_floating_point():
        return {}
    metrics = {"accuracy": float((out.argmax(1) == labels).float().mean())}
    if out.shape[1] == 2:
        metrics["auc"] = binary_auc(torch.softmax(out, 1)[:, 1].numpy(), labels.numpy())
    return metrics


def plot_split(histories: Mapping[str, History] | History, out_dir: str | Path, *, prefix: str = "") -> list[Path]:
    """loss.png (train and validation loss per epoch) and score.png (validation AUC and accuracy per epoch)."""
    runs = histories if isinstance(histories, Mapping) else {"split": histories}
    panels: list[Panel] = [
        ("loss", [("train_loss", "train"), ("eval_loss", "validation")], "loss"),
        ("score", [("eval_metrics.auc", "validation AUC"), ("eval_metrics.accuracy", "validation accuracy")],
         "AUC / accuracy")]
    return plot_history(runs, out_dir, prefix=prefix, panels=panels, x="epoch", title="split learning ")
