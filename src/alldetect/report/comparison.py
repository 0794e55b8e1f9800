"""The numbers of `alldetect report`: per-fold scores of every model's out-of-fold predictions, their mean and
spread (the study's Table 2 and more), size and speed, and the table of how each architecture was trained."""

from __future__ import annotations

import numpy as np
import pandas as pd

from alldetect.engine.rundir.find import fold_of
from alldetect.engine.select import selection_label
from alldetect.ensemble.record import EnsembleRecord
from alldetect.metrics import METRIC_NAMES, per_person, score
from alldetect.report.findings import ArchResult, Findings

COLUMNS = {"accuracy": "accuracy", "f1": "weighted F1", "precision": "precision", "recall": "recall",
           "roc_auc": "ROC-AUC"}  # the table's order: the study's accuracy first


def fold_scores(oof: pd.DataFrame) -> pd.DataFrame:
    """One row per fold: the metrics of that fold's images, from their `pred` decisions and `prob_all`."""
    rows = []
    for fold, g in oof.groupby("fold"):
        s = score(g["label"], g["prob_all"], pred=g["pred"])
        rows.append({"fold": int(fold), "images": len(g), **{k: s[k] for k in METRIC_NAMES}})
    return pd.DataFrame(rows)


def comparison_table(findings: Findings) -> pd.DataFrame:
    """The numbers of the study's Table 2: per model, each metric's mean and standard deviation (ddof=1) over
    folds, parameters and inference images/s."""
    rows = []
    for name, oof in findings.models().items():
        per_fold = fold_scores(oof)
        row = {"model": name, "folds": len(per_fold), "images": int(per_fold["images"].sum())}
        for k in COLUMNS:
            values = per_fold[k].dropna()  # ROC-AUC of a fold of one class is undefined (NaN)
            row[f"{k}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{k}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            row[f"{k}_folds"] = len(values)  # the folds behind the mean, when fewer than the row's
        row["params"], row["images_per_s"] = _size_and_speed(name, findings)
        row["selection"] = _selection_of(name, findings)
        rows.append(row)
    return pd.DataFrame(rows)


def _selection_of(name: str, findings: Findings) -> str:
    """How the model's fold runs chose their weights (select=); an ensemble is as optimistic as its members."""
    archs = {a.name: a for a in findings.archs}
    members = [name] if name in archs else next(e.members for e in findings.ensembles if e.name == name)
    texts = {selection_label([s.config for s in archs[m].states]) for m in members}
    return next((t for t in texts if "OPTIMISTIC" in t), None) or "/".join(sorted(texts))


def _size_and_speed(name: str, findings: Findings) -> tuple[float, float]:
    archs = {a.name: a for a in findings.archs}
    if name in archs:
        a = archs[name]
        return (a.params if a.params is not None else np.nan), (a.speed if a.speed is not None else np.nan)
    members = [archs[m] for m in next(e.members for e in findings.ensembles if e.name == name)]
    sizes = [m.params for m in members if m.params is not None]
    params = sum(sizes) if len(sizes) == len(members) else np.nan
    speeds = [m.speed for m in members if m.speed]
    # Every image goes through one model of each member, one after the other.
    speed = 1 / sum(1 / s for s in speeds) if len(speeds) == len(members) else np.nan
    return params, speed


def _cell(mean: float, std: float, n: int | None = None, folds: int | None = None) -> str:
    """mean ± std, saying over how many folds where some fold has no value (ROC-AUC of a fold of one class)."""
    if np.isnan(mean):
        return "-"
    text = f"{mean:.4f}" if np.isnan(std) else f"{mean:.4f} ± {std:.4f}"
    return text if n is None or folds is None or n >= folds else f"{text} ({n} of {folds} folds)"


def display_table(numbers: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"model": numbers["model"], "folds": numbers["folds"]})
    for k, label in COLUMNS.items():
        counts = numbers[f"{k}_folds"] if f"{k}_folds" in numbers else [None] * len(numbers)
        out[label] = [_cell(m, s, n, f) for m, s, n, f in zip(numbers[f"{k}_mean"], numbers[f"{k}_std"], counts,
                                                             numbers["folds"])]
    out["parameters"] = [f"{int(p):,}" if not np.isnan(p) else "?" for p in numbers["params"]]
    out["images/s"] = [f"{s:.1f}" if not np.isnan(s) else "not measured" for s in numbers["images_per_s"]]
    out["selection"] = numbers["selection"]
    return out


def per_fold_table(findings: Findings) -> pd.DataFrame:
    rows = []
    for name, oof in findings.models().items():
        for r in fold_scores(oof).itertuples():
            rows.append({"model": name, "fold": r.fold, "images": r.images,
                         **{label: _cell(getattr(r, k), float("nan")) for k, label in COLUMNS.items()}})
    return pd.DataFrame(rows)


def threshold_text(meta: EnsembleRecord) -> str:
    mode = meta.threshold_mode
    return "chosen per fold on the other folds" if mode == "oof" else mode


def runs_table(findings: Findings) -> pd.DataFrame:
    rows = []
    for a in findings.archs:
        cfg = a.config if a.states else None
        known = {"input": a.states[0].input_size, "epochs": cfg.epochs, "optimiser": cfg.optimizer, "lr": cfg.lr,
                 "batch": cfg.batch_size, "pretrained": cfg.pretrained} if cfg else {}
        rows.append({"architecture": a.name, "folder": f"`{a.folder}`", "fold runs used": len(a.runs),
                     **{k: known.get(k, "?") for k in ("input", "epochs", "optimiser", "lr", "batch", "pretrained")},
                     "selection": selection_label([s.config for s in a.states]),
                     "kept epoch per fold": ", ".join(str(s.progress.epoch + 1) for s in a.states) or "-",
                     "kept F1": _mean_over_folds(a, "kept"), "best-epoch F1 (peeking)": _mean_over_folds(a, "max")})
    return pd.DataFrame(rows)


def _mean_over_folds(a: ArchResult, which: str) -> str:
    """Mean over folds of the validation-fold weighted F1 (history.csv) of the epoch best.pt kept ("kept") or of
    the best epoch ("max": what choosing on the fold itself would have printed)."""
    values = []
    for run, state in zip(a.runs, a.states):
        h = a.histories.get(fold_of(run))
        if h is None or "f1" not in h:
            continue
        kept = h.loc[h["epoch"] == state.progress.epoch, "f1"]
        if which == "max":
            values.append(h["f1"].max())
        elif len(kept):
            values.append(kept.iloc[0])
    if not values:
        return "-"
    text = f"{np.mean(values):.4f}"  # a fold without history.csv (or without the kept epoch in it) has no value
    return text if len(values) == len(a.runs) else f"{text} ({len(values)} of {len(a.runs)} folds)"


def persons_table(findings: Findings) -> pd.DataFrame | None:
    """Per person (subject) of the out-of-fold images: class, images, and for each model the mean probability of
    `all` and the share called `all`, **WRONG** where most of the person's images are called the other class. In
    the order of the last model (an ensemble where there is one): worst first. None without subjects."""
    models = {n: o for n, o in findings.models().items() if "subject" in o}
    if not models:
        return None
    views = {n: per_person(o["label"], o["prob_all"], o["pred"], o["subject"]) for n, o in models.items()}
    last = views[list(views)[-1]]
    out = pd.DataFrame({"person": last.index, "class": last["class"].to_numpy(), "images": last["images"].to_numpy()})
    for name, view in views.items():
        v = view.reindex(last.index)
        out[f"{name}: mean p(all) / called all"] = [
            "-" if np.isnan(m) else f"{m:.2f} / {c:.0%}" + (" **WRONG**" if w else "")
            for m, c, w in zip(v["mean_prob_all"], v["called_all"], v["wrong"].fillna(False))]
    return out


def held_out_persons_table(records: list[dict]) -> pd.DataFrame:
    """The per-person view `ensemble --name` wrote into a labelled held-out set's metrics.json (`persons`, worst
    first), for the page."""
    frame = pd.DataFrame(records)
    return pd.DataFrame({"person": frame["subject"], "class": frame["class"], "images": frame["images"],
                         "mean p(all)": frame["mean_prob_all"].map(lambda v: f"{v:.2f}"),
                         "called all": frame["called_all"].map(lambda v: f"{v:.0%}"),
                         "as a whole": np.where(frame["wrong"], "**WRONG**", "right")})
