"""Other class mixes, measured on out-of-fold predictions (no training): each fold's held-out people scored at
their own mix, re-weighted to a balanced mix and to the inverted one, without correction and with `ensemble`'s
prior= estimated on that fold alone.

    .venv/bin/python bench/shift.py runs/resnet18 [runs/proposed ...] [--out shift.csv]

For fold f: the images of fold f get sample weights that make their share of `all` the target (observed: the fold's
own; balanced: 0.5; inverted: 1 - the fold's own), the weights summing to the fold's size. The training mix (the
other folds' labels) and BBSE's confusion matrix (the other folds' decisions at 0.5) come from the other folds, whose
models did not see fold f either; the prior is estimated on fold f's probabilities under those weights (as if the
fold had been resampled to the target mix) and applied by Bayes' rule (alldetect.ensemble.prior). `known` applies the true
target share (what prior=VALUE does with a correct VALUE). Scores: weighted F1 at 0.5 and ROC-AUC, each with the
sample weights, per fold and pooled over folds. Nothing is fitted on the images it scores.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, roc_auc_score

from alldetect.atomic import write_csv
from alldetect.engine.rundir.find import find_fold_runs, group_members
from alldetect.ensemble.predictions import load_oof
from alldetect.ensemble.prior import adjust, bbse_prior, em_prior, joint_confusion
from alldetect.errors import UserError

MIXES = ("observed", "balanced", "inverted")
CORRECTIONS = ("none", "em", "bbse", "known")


def target_share(mix: str, observed: float) -> float:
    return {"observed": observed, "balanced": 0.5, "inverted": 1 - observed}[mix]


def mix_weights(labels: np.ndarray, target: float) -> np.ndarray:
    """Sample weights giving these images a share `target` of `all`, summing to their number."""
    n, n_all = len(labels), labels.sum()
    return np.where(labels == 1, target * n / n_all, (1 - target) * n / (n - n_all))


def scored(labels: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict:
    return {"f1": f1_score(labels, (p >= 0.5).astype(int), average="weighted", sample_weight=w),
            "roc_auc": roc_auc_score(labels, p, sample_weight=w)}


def fold_rows(name: str, labels: np.ndarray, probs: np.ndarray, folds: np.ndarray) -> list[dict]:
    rows = []
    for fold in np.unique(folds):
        held, rest = folds == fold, folds != fold
        y, p = labels[held], probs[held]
        if len(np.unique(y)) < 2:
            print(f"{name} fold {fold}: one class only; left out", file=sys.stderr)
            continue
        train = float(labels[rest].mean())
        confusion = joint_confusion(labels[rest], probs[rest])
        observed = float(y.mean())
        for mix in MIXES:
            target = target_share(mix, observed)
            w = mix_weights(y, target)
            for correction in CORRECTIONS:
                if correction == "none":
                    q, adjusted = float("nan"), p
                else:
                    if correction == "em":
                        q = em_prior(p, train, weights=w).prior
                    elif correction == "bbse":
                        q = bbse_prior(p, confusion, weights=w).prior
                    else:
                        q = target
                    adjusted = adjust(p, train, q)
                rows.append({"run": name, "fold": int(fold), "mix": mix, "target": target, "train": train,
                             "correction": correction, "estimate": q, "images": len(y), "labels": y,
                             "probs": adjusted, "weights": w, **scored(y, adjusted, w)})
    return rows


def pooled(rows: list[dict]) -> list[dict]:
    out = []
    frame = pd.DataFrame(rows)
    for (run, mix, correction), g in frame.groupby(["run", "mix", "correction"], sort=False):
        y, p, w = (np.concatenate(g[c].to_list()) for c in ("labels", "probs", "weights"))
        error = (g["estimate"] - g["target"]).abs().mean() if correction != "none" else float("nan")
        out.append({"run": run, "mix": mix, "correction": correction, "folds": len(g),
                    "f1_mean": g["f1"].mean(), "f1_pooled": scored(y, p, w)["f1"],
                    "auc_mean": g["roc_auc"].mean(), "auc_pooled": scored(y, p, w)["roc_auc"],
                    "prior_error": error})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="runs/<arch> folders (every fold's oof.csv is read)")
    ap.add_argument("--out", help="also write the per-fold table to this CSV file")
    a = ap.parse_args()
    rows = []
    try:
        for folder in a.runs:
            member = group_members(find_fold_runs([folder]))[0]
            oof = load_oof([member])
            assert oof.labels is not None, "out-of-fold predictions are labelled"
            rows += fold_rows(folder, oof.labels, oof.probs[:, 0], oof.frame["fold"].to_numpy())
    except UserError as e:
        sys.exit(f"error: {e}")
    per_fold = pd.DataFrame(rows).drop(columns=["labels", "probs", "weights"])
    pd.set_option("display.width", 200)
    print("per fold: weighted F1 at 0.5 and ROC-AUC with sample weights giving the target share of `all`; "
          "train: the other folds' share; estimate: the prior the correction applied")
    print(per_fold.round(4).to_string(index=False))
    print("\npooled over folds (f1_mean, auc_mean: mean over folds; prior_error: mean |estimate - target|):")
    print(pd.DataFrame(pooled(rows)).round(4).to_string(index=False))
    if a.out:
        write_csv(a.out, per_fold)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
