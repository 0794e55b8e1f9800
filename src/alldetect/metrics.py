"""The challenge's metrics, from labels and probabilities of `all` (scikit-learn does the arithmetic)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

METRIC_NAMES = ("f1", "accuracy", "precision", "recall", "roc_auc")


def score(labels, prob_all, threshold: float = 0.5) -> dict[str, float]:
    """Weighted F1 (the challenge metric), accuracy, precision and recall of `all`, ROC-AUC, and the
    confusion matrix (rows true hem/all, columns predicted hem/all)."""
    labels = np.asarray(labels, dtype=int)
    prob_all = np.asarray(prob_all, dtype=float)
    pred = (prob_all >= threshold).astype(int)
    both = len(np.unique(labels)) == 2
    return {
        "f1": float(f1_score(labels, pred, average="weighted", zero_division=0)),
        "accuracy": float(accuracy_score(labels, pred)),
        "precision": float(precision_score(labels, pred, zero_division=0)),
        "recall": float(recall_score(labels, pred, zero_division=0)),
        "roc_auc": float(roc_auc_score(labels, prob_all)) if both else float("nan"),
        "confusion": confusion_matrix(labels, pred, labels=[0, 1]).tolist(),
    }
