"""The challenge's metrics, from labels and probabilities of `all` (scikit-learn does the arithmetic)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

METRIC_NAMES = ("f1", "accuracy", "precision", "recall", "roc_auc")


def score(labels, prob_all, threshold=0.5, subjects=None, pred=None) -> dict:
    """Weighted F1 (the challenge metric), accuracy, precision and recall of `all`, ROC-AUC, and the
    confusion matrix (rows true hem/all, columns predicted hem/all).

    `threshold` may be one number or one per image (thresholds chosen per fold); `pred` (0/1) replaces the
    thresholding when the decisions are already made. With `subjects`, adds `per_subject_accuracy`
    ({subject: share of its images classified correctly}) and `subject_accuracy` (their mean)."""
    labels = np.asarray(labels, dtype=int)
    prob_all = np.asarray(prob_all, dtype=float)
    pred = (prob_all >= threshold).astype(int) if pred is None else np.asarray(pred, dtype=int)
    both = len(np.unique(labels)) == 2
    out = {
        "f1": float(f1_score(labels, pred, average="weighted", zero_division=0)),
        "accuracy": float(accuracy_score(labels, pred)),
        "precision": float(precision_score(labels, pred, zero_division=0)),
        "recall": float(recall_score(labels, pred, zero_division=0)),
        "roc_auc": float(roc_auc_score(labels, prob_all)) if both else float("nan"),
        "ece": calibration_error(labels, prob_all),
        "confusion": confusion_matrix(labels, pred, labels=[0, 1]).tolist(),
    }
    if subjects is not None:
        correct = pd.Series(pred == labels, index=pd.Index(np.asarray(subjects, dtype=str), name="subject"))
        per_subject = correct.groupby(level=0).mean()
        out["per_subject_accuracy"] = {s: float(a) for s, a in per_subject.items()}
        out["subject_accuracy"] = float(per_subject.mean())
    return out


def calibration_error(labels, prob_all, bins: int = 10) -> float:
    """Expected calibration error of p(all): over 10 equal-width bins of the probability, the share of images in
    each times |mean probability - share that are `all`|. 0 when the probabilities mean what they say."""
    labels = np.asarray(labels, dtype=float)
    prob_all = np.asarray(prob_all, dtype=float)
    which = np.minimum((prob_all * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, prob_all, bins) - np.bincount(which, labels, bins))
    return float(gap.sum() / max(len(labels), 1)) if count.sum() else float("nan")


def weighted_f1_by_threshold(labels, prob_all) -> tuple[np.ndarray, np.ndarray]:
    """Weighted F1 of `prob_all >= t` for every distinct decision these probabilities allow, in one sorted pass
    (scikit-learn would need one call per threshold). Each t sits halfway between two neighbouring distinct
    probabilities (the same decisions on these data, less fragile on new ones). Returns (t descending, F1)."""
    labels = np.asarray(labels, dtype=int)
    prob_all = np.asarray(prob_all, dtype=float)
    order = np.argsort(-prob_all, kind="stable")
    p, y = prob_all[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(p) != 0), len(p) - 1]  # last index of each run of equal probabilities
    tp, fp = np.cumsum(y)[last], np.cumsum(1 - y)[last]
    thresholds = (p[last] + np.r_[p[last][1:], 0.0]) / 2
    if len(p) and p[0] < 1:  # also "nothing is `all`"
        tp, fp, thresholds = np.r_[0, tp], np.r_[0, fp], np.r_[(p[0] + 1) / 2, thresholds]
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    fn, tn = n_pos - tp, n_neg - fp
    f1_pos = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(tp)), where=(2 * tp + fp + fn) > 0)
    f1_neg = np.divide(2 * tn, 2 * tn + fn + fp, out=np.zeros(len(tn)), where=(2 * tn + fn + fp) > 0)
    return thresholds, (n_pos * f1_pos + n_neg * f1_neg) / max(len(y), 1)


def best_threshold(labels, prob_all) -> float:
    """The threshold that maximises weighted F1 on these labels; ties go to the one nearest 0.5."""
    thresholds, f1 = weighted_f1_by_threshold(labels, prob_all)
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    return float(thresholds[best[np.argmin(np.abs(thresholds[best] - 0.5))]])


def per_person(labels, prob_all, pred, subjects) -> pd.DataFrame:
    """One row per person (subject): its class (the majority of its labels; a C-NMC person is one class), number
    of images, mean probability of `all`, share of its images called `all` and share called right, and `wrong`
    when most of its images are called the other class (the model gets the person wrong as a whole). Worst first:
    by share called right, then by how far the mean probability lies on the wrong side."""
    frame = pd.DataFrame({"subject": np.asarray(subjects, dtype=str), "label": np.asarray(labels, dtype=int),
                          "prob_all": np.asarray(prob_all, dtype=float), "pred": np.asarray(pred, dtype=int)})
    g = frame.groupby("subject")
    out = pd.DataFrame({"class": g["label"].mean().map(lambda m: "all" if m >= 0.5 else "hem"), "images": g.size(),
                        "mean_prob_all": g["prob_all"].mean(), "called_all": g["pred"].mean(),
                        "right": (frame["pred"] == frame["label"]).groupby(frame["subject"]).mean()})
    out["wrong"] = out["right"] < 0.5
    off = np.where(out["class"] == "all", 1 - out["mean_prob_all"], out["mean_prob_all"])
    return out.assign(off=off).sort_values(["right", "off"], ascending=[True, False]).drop(columns="off")
