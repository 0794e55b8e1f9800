"""`alldetect ensemble`: average softmax outputs of several runs, score them, write submissions.

  alldetect ensemble RUN... --oof          the members' out-of-fold (OOF) predictions and their average, scored
  alldetect ensemble RUN... --name NAME    `predict`'s pred_<NAME>.csv of every run -> submissions/<NAME>.csv

A member is one architecture folder (runs/<arch>): its folds' predictions are averaged first, then the members.
How members are combined (weights=, average=, calibrate=, correct=, threshold=: see alldetect.combine) is fitted on
OOF predictions and never scored on the data it was fitted on: with --oof, each fold is scored with what was
fitted on the other folds, and the other ways of combining are printed beside the chosen one.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from alldetect import __version__
from alldetect.atomic import atomic_path, write_csv, write_text
from alldetect.combine import (
    AVERAGES,
    CALIBRATIONS,
    CORRECTIONS,
    KNN_K,
    WEIGHTS,
    Combiner,
    Inputs,
    Method,
    alternatives,
    cross_fitted,
    fit,
)
from alldetect.data.layouts import NUMBERED_RE
from alldetect.engine.runfiles import RunDir, RunMeta
from alldetect.engine.runs import Member, find_fold_runs
from alldetect.engine.select import selection_label
from alldetect.errors import UserError, short_list
from alldetect.metrics import METRIC_NAMES, score
from alldetect.neighbours import neighbour_means
from alldetect.options import choice

log = logging.getLogger("alldetect")


def parse_threshold(raw: str) -> float | str:
    if raw == "oof":
        return raw
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("use a number between 0 and 1 (e.g. 0.5), or oof to choose it on out-of-fold "
                         "predictions") from None
    if not 0 < value < 1:
        raise ValueError("the threshold must lie strictly between 0 and 1")
    return value


OPTIONS = {"weights": ("equal", choice(*WEIGHTS)), "threshold": (0.5, parse_threshold),
           "average": ("prob", choice(*AVERAGES)), "calibrate": ("none", choice(*CALIBRATIONS)),
           "correct": ("none", choice(*CORRECTIONS))}
TRANSDUCTIVE = ("correct=knn: each image's probability was mixed with those of its nearest neighbours among the "
                "images predicted with it (it uses the images jointly)")


def method_of(opts: dict) -> Method:
    return Method(opts["weights"], opts["average"], opts["calibrate"], opts["correct"], opts["threshold"])


@dataclass
class Predictions:
    """Images x members: each member's probability of `all`, aligned on the image path."""

    frame: pd.DataFrame  # path, and label, subject, fold where known
    probs: np.ndarray  # images x members
    members: list[str]
    info: dict  # what they were made from (runs, fold files, data), for metrics.json

    @property
    def labels(self) -> np.ndarray | None:
        return self.frame["label"].to_numpy() if "label" in self.frame else None

    @property
    def subjects(self) -> np.ndarray | None:
        return self.frame["subject"].to_numpy() if "subject" in self.frame else None


# ---------------------------------------------------------------- reading what earlier steps wrote

def load_oof(members: list[Member]) -> Predictions:
    """Every member's OOF predictions (its folds' oof.csv concatenated), joined on path, after checking that
    all runs were trained on one fold file of one data set and that the members cover the same images."""
    infos: list[RunInfo] = []
    tables = []
    for member in members:
        parts = []
        for run in member.runs:
            infos.append(RunInfo(member.name, run, RunDir(run).meta()))
            parts.append(RunDir(run).read_oof())
        table = pd.concat(parts, ignore_index=True)
        twice = table.loc[table["path"].duplicated(), "path"].tolist()
        if twice:
            raise UserError(f"{member.name}: {len(twice)} image(s) are in the OOF predictions of more than one of its "
                            f"runs ({short_list(twice, 3)}): its runs were trained on different fold files. "
                            "Name runs of one fold file only")
        tables.append(table.set_index("path"))
        _warn_missing_folds(member, table, infos[-1])
    _check_same_fold_file(members, tables, infos)
    first = tables[0].sort_index()
    frame = first.reset_index()[["path", "label", "fold"] + (["subject"] if "subject" in first else [])]
    probs = np.column_stack([t.loc[frame["path"], "prob_all"].to_numpy(float) for t in tables])
    info = {"fold_file": infos[0].meta.fold_file, "fold_fingerprint": infos[0].meta.fold_fingerprint,
            "runs": {m.name: [str(r) for r in m.runs] for m in members},
            "selection": {m.name: selection_label(i.meta.config for i in infos if i.member == m.name) for m in members}}
    return Predictions(frame, probs, [m.name for m in members], info)


@dataclass
class RunInfo:
    member: str
    run: Path
    meta: RunMeta


def _warn_missing_folds(member: Member, table: pd.DataFrame, info: RunInfo) -> None:
    k, have = info.meta.k, sorted(table["fold"].unique())
    if k and len(have) < k:
        log.warning("%s: out-of-fold predictions of fold(s) %s only (its fold file has %d folds)", member.name,
                    ", ".join(map(str, have)), k)


def _check_same_fold_file(members: list[Member], tables: list[pd.DataFrame], infos: list[RunInfo]) -> None:
    prints = {i.meta.fold_fingerprint for i in infos}
    if len(prints) > 1:
        detail = "; ".join(f"{i.run}: {i.meta.fold_file or '?'} (data fingerprint {i.meta.fold_fingerprint or 'none'})"
                           for i in infos)
        raise UserError("the runs were trained on different data (fold files with different data fingerprints), so "
                        f"their out-of-fold predictions cannot be combined: {detail}. Use runs of one fold file")
    ref, ref_name = tables[0], members[0].name
    for member, table in zip(members[1:], tables[1:]):
        lacks, extra = ref.index.difference(table.index), table.index.difference(ref.index)
        if len(lacks) or len(extra):
            raise UserError(
                f"the members cover different images: {member.name} lacks {len(lacks)} image(s) that {ref_name} has "
                f"({short_list(lacks, 3)}) and has {len(extra)} that {ref_name} lacks ({short_list(extra, 3)}). "
                "Every member needs OOF predictions of the same folds (train them all: ./train.sh ARCH all)")
        moved = ref.index[ref["fold"].to_numpy() != table.loc[ref.index, "fold"].to_numpy()]
        if len(moved):
            files = {i.member: i.meta.fold_file for i in infos}
            raise UserError(
                f"{member.name} and {ref_name} were trained on different fold files ({files[member.name]} and "
                f"{files[ref_name]}): {len(moved)} image(s) sit in other folds ({short_list(moved, 3)}). "
                "Use runs trained on the same fold file")
        relabelled = ref.index[ref["label"].to_numpy() != table.loc[ref.index, "label"].to_numpy()]
        if len(relabelled):
            raise UserError(f"{member.name} and {ref_name} disagree on the labels of {short_list(relabelled, 3)}")


def load_predictions(members: list[Member], name: str) -> Predictions:
    """`predict`'s pred_<name>.csv of every run: folds averaged per member, after checking that every run
    predicted the same images of the same data."""
    runs = [run for m in members for run in m.runs]
    missing = [str(r) for r in runs if not RunDir(r).pred(name).is_file()]
    if missing:
        raise UserError(f"no predictions named '{name}' in {short_list(missing)}: run `alldetect predict "
                        f"{' '.join(str(m.folder) for m in members)} --data DIR --name {name}` first")
    frames = {r: RunDir(r).read_predictions(name) for r in runs}
    metas = {r: RunDir(r).read_pred_meta(name) for r in runs}
    ref = runs[0]
    ref_paths = set(frames[ref]["path"])
    for run in runs[1:]:
        paths = set(frames[run]["path"])
        if paths != ref_paths:
            lacks, extra = sorted(ref_paths - paths), sorted(paths - ref_paths)
            raise UserError(f"{RunDir(run).pred(name)} does not cover the images of {RunDir(ref).pred(name)}: "
                            f"it lacks {len(lacks)} ({short_list(lacks, 3)}) and has {len(extra)} others "
                            f"({short_list(extra, 3)}). Rerun `alldetect predict` for every run with the same --data")
    stale = [r for r, m in metas.items()
             if m.get("checkpoint_saved_at") is not None and m["checkpoint_saved_at"] != RunDir(r).meta().saved_at]
    if stale:
        raise UserError(f"the predictions '{name}' of {short_list([str(r) for r in stale])} were made by an older "
                        "best.pt than the run holds now (it was retrained or resumed since). Rerun `alldetect predict "
                        f"{' '.join(str(r) for r in stale)} --data DIR --name {name}`")
    prints = {m.get("data_fingerprint") for m in metas.values()}
    if len(prints) > 1:
        detail = "; ".join(f"{r}: {m.get('data_root')} ({m.get('data_fingerprint')})" for r, m in metas.items())
        raise UserError(f"predictions '{name}' were made on different data: {detail}. Rerun `alldetect predict` for "
                        "every run with the same --data")
    frame = frames[ref].reset_index(drop=True)  # predict's order: numeric for C-NMC test folders
    keep = ["path"] + [c for c in ("label", "subject") if c in frame]
    columns = []
    for member in members:
        folds = [frames[r].set_index("path").loc[frame["path"], "prob_all"].to_numpy(float) for r in member.runs]
        columns.append(np.mean(folds, axis=0))
    tta = sorted({str(m.get("tta")) for m in metas.values()})
    if len(tta) > 1:
        log.warning("the runs' predictions '%s' used different test-time augmentation (%s)", name, ", ".join(tta))
    meta = metas[ref]
    info = {"data_root": meta.get("data_root"), "data_fingerprint": meta.get("data_fingerprint"),
            "layout": meta.get("layout"), "tta": tta if len(tta) > 1 else tta[0],
            "runs": {m.name: [str(r) for r in m.runs] for m in members}}
    return Predictions(frame[keep], np.column_stack(columns), [m.name for m in members], info)


# ---------------------------------------------------------------- tables and files

def metrics_table(scores: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for name, s in scores.items():
        t = s["threshold"]
        row = {"model": name, **{k: round(s[k], 4) for k in (*METRIC_NAMES, "ece")}}
        if "subject_accuracy" in s:
            row["subject_acc"] = round(s["subject_accuracy"], 4)
        row["threshold"] = f"{t:.3f}" if isinstance(t, float) else "per fold" if isinstance(t, dict) else str(t)
        row["confusion"] = str(s["confusion"]).replace(" ", "")
        if "selection" in s:
            row["select"] = s["selection"]
        rows.append(row)
    return pd.DataFrame(rows)


def per_subject_table(scores: dict[str, dict], frame: pd.DataFrame) -> pd.DataFrame | None:
    if "subject" not in frame or "label" not in frame:
        return None
    g = frame.groupby("subject")
    table = pd.DataFrame({"class": g["label"].agg(lambda s: "all" if s.mean() >= 0.5 else "hem"), "images": g.size()})
    for name, s in scores.items():
        table[name] = pd.Series(s["per_subject_accuracy"]).round(3)
    return table.sort_index(key=lambda idx: idx.map(_subject_key))


def _subject_key(subject: str):
    """'H2' before 'H10', ALL subjects (bare numbers) before healthy ones ('H...')."""
    m = re.fullmatch(r"([A-Za-z]*)(\d+)", str(subject))
    return (m.group(1), int(m.group(2)), "") if m else ("~", 0, str(subject))


def render(title: str, scores: dict[str, dict], frame: pd.DataFrame) -> str:
    lines = [title, metrics_table(scores).to_string(index=False),
             "f1 = weighted F1 (the challenge metric); precision and recall of `all`; "
             "confusion = [[hem->hem, hem->all], [all->hem, all->all]] (rows true, columns predicted)"]
    subjects = per_subject_table(scores, frame)
    if subjects is not None:
        lines += ["", "per-subject accuracy (share of each subject's images classified correctly):",
                  subjects.reset_index().to_string(index=False)]
    return "\n".join(lines)


def _plain(value):
    """JSON-safe: NaN becomes null, numpy numbers become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(_plain(data), indent=2) + "\n")


def isbi_lines(images: pd.Series, labels: np.ndarray) -> tuple[list[str] | None, str]:
    """Lines of isbi_valid.predict (line i is the 0/1 label of i.bmp), or None and why the images are not a
    C-NMC numbered test folder."""
    names = images.map(lambda p: Path(p).name)
    folders = images.map(lambda p: str(Path(p).parent))
    matches = names.map(NUMBERED_RE.match)
    if folders.nunique() != 1 or not matches.map(bool).all():
        return None, "the images are not a C-NMC test folder (1.bmp ... N.bmp in one folder)"
    numbers = matches.map(lambda m: int(m.group(1))).to_numpy()
    if sorted(numbers) != list(range(1, len(numbers) + 1)):
        gaps = sorted(set(range(1, len(numbers) + 1)) - set(numbers))
        return None, f"the images are not numbered 1..{len(numbers)} without gaps (missing {short_list(gaps)})"
    order = np.argsort(numbers)
    return [str(int(v)) for v in np.asarray(labels)[order]], ""


def write_isbi(folder: Path, lines: list[str]) -> tuple[Path, Path]:
    """isbi_valid.predict and a zip of it (fixed timestamp, so the same labels give the same bytes)."""
    text = "\n".join(lines) + "\n"
    predict_file, zip_file = folder / "isbi_valid.predict", folder / "isbi_valid.zip"
    write_text(predict_file, text)
    with atomic_path(zip_file) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            entry = zipfile.ZipInfo("isbi_valid.predict", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(entry, text)
    return predict_file, zip_file


# ---------------------------------------------------------------- the two modes

def oof_report(members: list[Member], opts: dict, out_dir: Path) -> dict:
    """Score each member and the ensemble on the OOF predictions, and the ensemble made each other way; write
    metrics.json and oof.csv."""
    full = [str(r) for m in members for r in m.runs if r.name == "full"]
    if full:
        raise UserError(f"{short_list(full)} trained on every image, so it has no out-of-fold predictions to score: "
                        "name the fold runs (runs/<arch>, whose folds --oof scores) without it")
    oof = load_oof(members)
    method = method_of(opts)
    labels, folds = oof.labels, oof.frame["fold"].to_numpy()
    assert labels is not None, "out-of-fold predictions are labelled"
    have_features = method.correct == "knn" or _all_have_features(members, "oof")
    inputs = Inputs(oof.probs, oof_neighbours(members, oof) if have_features else None)
    plain = Method(threshold=method.threshold)
    scores, columns = {}, {}
    selection = oof.info["selection"]
    for i, name in enumerate(oof.members):
        p, t, per_fold = cross_fitted(Inputs(oof.probs[:, [i]]), labels, folds, plain)
        scores[name] = {**_scored(labels, p, t, per_fold, oof.subjects), "selection": selection[name]}
        columns[f"prob_{name}"] = oof.probs[:, i].round(6)
    if method != plain:
        p, t, per_fold = cross_fitted(inputs, labels, folds, plain)
        scores["equal weights"] = _scored(labels, p, t, per_fold, oof.subjects)
    p, t, per_fold = cross_fitted(inputs, labels, folds, method)
    scores["ensemble"] = _scored(labels, p, t, per_fold, oof.subjects)
    optimistic = [m for m, text in selection.items() if "OPTIMISTIC" in text]
    for s in [s for n, s in scores.items() if n not in selection]:  # the averages inherit their members' choice
        s["selection"] = "outer (OPTIMISTIC)" if optimistic else "/".join(sorted(set(selection.values())))
    compared = {m.label: _scored(labels, *cross_fitted(inputs, labels, folds, m), None)
                for m in alternatives(method, len(oof.members), inputs.neighbours is not None)}
    final = fit(method, inputs, labels)  # on all OOF: what --name would use
    result = {"mode": "oof", "members": oof.members, "method": method.label, "weights_mode": method.weights,
              "threshold_mode": str(method.threshold), "weights": dict(zip(oof.members, final.weights)),
              "threshold": final.threshold, "weights_note": final.note, "cross_fitted": bool(per_fold),
              "per_fold": {f: _fitted_record(c, oof.members) for f, c in per_fold.items()},
              "scores": scores, "alternatives": compared, **oof.info, "images": len(labels),
              "made_by": f"alldetect {__version__}"}
    if method.correct == "knn":
        result["transductive"] = TRANSDUCTIVE
    table = oof.frame.assign(**columns, prob_all=p.round(6), pred=(p >= t).astype(int))
    write_csv(out_dir / "oof.csv", table)
    write_json(out_dir / "metrics.json", result)
    title = (f"out-of-fold scores of {len(labels)} images ({oof.info['fold_file']}), threshold={method.threshold}, "
             f"{method.label}")
    print(render(title, scores, oof.frame))
    if compared:
        print(f"\nthe ensemble made other ways (each cross-fitted like the one above):\n"
              f"{metrics_table(compared).drop(columns=['confusion']).to_string(index=False)}")
    if optimistic:
        print(f"OPTIMISTIC: {', '.join(optimistic)} chose each fold's epoch on the images it is scored on "
              "(select=outer); retrain with select=last (the default) or select=inner for scores that are not")
    _print_combiner(final, oof.members, bool(per_fold))
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'oof.csv'}")
    return result


def _fitted_record(c: Combiner, members: list[str]) -> dict:
    out = {"weights": dict(zip(members, c.weights)), "threshold": c.threshold}
    if c.corrections:
        out["knn"] = {m: {"k": k, "mix": mix} for m, (k, mix) in zip(members, c.corrections)}
    if c.calibrator is not None and hasattr(c.calibrator, "t"):
        out["temperature"] = c.calibrator.t
    return out


def _scored(labels, probs, thresholds, per_fold: dict, subjects) -> dict:
    s = score(labels, probs, thresholds, subjects=subjects)
    s["threshold"] = ({f: c.threshold for f, c in per_fold.items()} if per_fold and len(set(thresholds)) > 1
                      else float(thresholds[0]))
    return s


def _print_combiner(c: Combiner, members: list[str], cross: bool) -> None:
    method = c.method
    if method.weights in ("oof", "greedy"):
        shown = ", ".join(f"{m} {w:.4f}" for m, w in zip(members, c.weights))
        how = " (greedy selection with replacement)" if method.weights == "greedy" else ""
        print(f"weights fitted on all out-of-fold predictions{how}: {shown}"
              + (f" ({c.note})" if c.note else ""))
    if method.weights == "stack" and c.stacker is not None:
        coef = ", ".join(f"{m} {w:.3f}" for m, w in zip(members, c.stacker.coef_[0]))
        print(f"stacking (logistic regression on log-odds) fitted on all out-of-fold predictions: {coef}, "
              f"intercept {c.stacker.intercept_[0]:.3f}")
    if c.corrections:
        shown = ", ".join(f"{m} k={k} mix={mix:g}" for m, (k, mix) in zip(members, c.corrections))
        print(f"neighbourhood correction fitted on all out-of-fold predictions: {shown}")
    if method.calibrate != "none":
        t = getattr(c.calibrator, "t", None)
        extra = f" (T = {t:.3f})" if t is not None else ""
        print(f"calibration ({method.calibrate}) fitted on all out-of-fold predictions{extra}")
    if method.threshold == "oof":
        print(f"threshold chosen on all out-of-fold predictions (max weighted F1): {c.threshold:.4f}")
    if cross:
        print("The OOF scores above use, for each fold, what was fitted on the other folds only; a submission "
              "(--name) uses what was fitted on all OOF predictions.")
    if method.correct == "knn":
        print(TRANSDUCTIVE)


# ---------------------------------------------------------------- features for correct=knn

def _all_have_features(members: list[Member], name: str) -> bool:
    return all(RunDir(run).feat(name).is_file() for m in members for run in m.runs)


def _read_features(run: Path, name: str) -> pd.Series:
    """feat_<name>.npz of a run as {path: feature row}, checked against the run's current best.pt."""
    files = RunDir(run)
    path = files.feat(name)
    how = "--oof features=true" if name == "oof" else f"--data DIR --name {name} features=true"
    if not path.is_file():
        raise UserError(f"correct=knn needs each run's features, and {path} is missing: run `alldetect predict "
                        f"{run} {how}` first")
    saved = files.read_pred_meta(name).get("checkpoint_saved_at")
    if saved is not None and saved != files.meta().saved_at:
        raise UserError(f"{path} was made by an older best.pt than {run} holds now: rerun `alldetect predict {run} "
                        f"{how}`")
    try:
        with np.load(path) as z:
            paths, features = z["paths"].astype(str), z["features"]
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"cannot read {path} ({type(e).__name__}: {str(e)[:120]}): rerun `alldetect predict {run} "
                        f"{how}`") from None
    if len(paths) != len(features) or features.ndim != 2:
        raise UserError(f"{path} holds {len(paths)} paths but features of shape {features.shape}: rerun predict")
    return pd.Series(list(features), index=paths)


def _aligned(features: pd.Series, paths, run: Path, name: str) -> np.ndarray:
    lacks = pd.Index(paths).difference(features.index)
    if len(lacks):
        raise UserError(f"{RunDir(run).feat(name)} lacks the features of {len(lacks)} image(s) it should hold "
                        f"({short_list(lacks, 3)}): rerun `alldetect predict` with features=true")
    return np.stack(features.loc[list(paths)].to_list())


def oof_neighbours(members: list[Member], oof: Predictions) -> dict[int, np.ndarray]:
    """{k: images x members}: for each member, each OOF image's neighbours among its fold's images (what that fold's
    model predicted together), by that model's features, and the mean of their OOF probabilities."""
    out = {k: np.zeros(oof.probs.shape) for k in KNN_K}
    where = pd.Index(oof.frame["path"])
    for i, member in enumerate(members):
        for run in member.runs:
            own = RunDir(run).read_oof()
            near = neighbour_means(_aligned(_read_features(run, "oof"), own["path"], run, "oof"),
                                   own["prob_all"].to_numpy(float))
            rows = where.get_indexer(own["path"])
            for k in KNN_K:
                out[k][rows, i] = near[k]
    return out


def held_out_neighbours(members: list[Member], name: str, frame: pd.DataFrame) -> dict[int, np.ndarray]:
    """{k: images x members}: per run, each held-out image's neighbours among all of them by the run's features,
    the mean of their probabilities; averaged over a member's runs as their probabilities are."""
    out = {k: np.zeros((len(frame), len(members))) for k in KNN_K}
    for i, member in enumerate(members):
        for run in member.runs:
            own = RunDir(run).read_predictions(name).set_index("path")
            probs = own.loc[frame["path"], "prob_all"].to_numpy(float)
            near = neighbour_means(_aligned(_read_features(run, name), frame["path"], run, name), probs)
            for k in KNN_K:
                out[k][:, i] += near[k] / len(member.runs)
    return out


def _with_folds_for_full(members: list[Member]) -> list[Member]:
    """A final model (runs/<arch>/full) has no out-of-fold predictions; its folder's fold runs, trained the same
    way on part of the images, stand in for it when weights or a threshold are fitted."""
    out = []
    for member in members:
        if not any(r.name == "full" for r in member.runs):
            out.append(member)
            continue
        folds = [r for r in member.runs if r.name != "full"]
        if not folds:
            try:
                folds = find_fold_runs([member.folder])
            except UserError:
                folds = []
        if not folds:
            raise UserError(f"{member.folder / 'full'} has no out-of-fold predictions, and {member.folder} no fold "
                            "runs whose predictions could stand in for it: train them (./train.sh ARCH all), or use "
                            "weights=equal and a fixed threshold")
        print(f"{member.name}: weights and threshold fitted on the out-of-fold predictions of "
              f"{', '.join(r.name for r in folds)} (full has none)")
        out.append(Member(member.name, member.folder, folds))
    return out


def submission(members: list[Member], name: str, opts: dict, out_dir: Path) -> dict:
    """Combine held-out predictions into out_dir/<name>.csv (+ isbi_valid.predict and zip, + metrics.json)."""
    held = load_predictions(members, name)
    method = method_of(opts)
    m = len(held.members)
    knn = method.correct == "knn"
    inputs = Inputs(held.probs, held_out_neighbours(members, name, held.frame) if knn else None)
    if method.fitted:
        fold_members = _with_folds_for_full(members)
        oof = load_oof(fold_members)
        assert oof.labels is not None, "out-of-fold predictions are labelled"
        combiner = fit(method, Inputs(oof.probs, oof_neighbours(fold_members, oof) if knn else None), oof.labels)
        member_thresholds = [fit(Method(threshold=method.threshold), Inputs(oof.probs[:, [i]]), oof.labels).threshold
                             for i in range(m)]
    else:
        combiner, member_thresholds = Combiner(method, np.full(m, 1.0 / m), float(method.threshold)), \
            [float(method.threshold)] * m
    prob = combiner.probs(inputs)
    pred = (prob >= combiner.threshold).astype(int)
    table = pd.DataFrame({"image": held.frame["path"], "prob_all": prob.round(6), "label": pred,
                          **{f"prob_{member}": held.probs[:, i].round(6) for i, member in enumerate(held.members)}})
    folder = out_dir / name
    write_csv(out_dir / f"{name}.csv", table)
    record = {"mode": "held-out", "name": name, "members": held.members, "method": method.label,
              "weights_mode": method.weights, "threshold_mode": str(method.threshold),
              "weights": dict(zip(held.members, combiner.weights)), **_fitted_record(combiner, held.members),
              "member_thresholds": dict(zip(held.members, member_thresholds)),
              "weights_note": combiner.note, "images": len(table), **held.info, "made_by": f"alldetect {__version__}"}
    if knn:
        record["transductive"] = TRANSDUCTIVE
    write_json(folder / "ensemble.json", record)
    written = [out_dir / f"{name}.csv", folder / "ensemble.json"]
    lines, why = isbi_lines(table["image"], pred)
    if lines is not None:
        written += write_isbi(folder, lines)
    else:
        print(f"no isbi_valid.predict: {why}")
    if held.labels is not None:
        scores = {n: {**score(held.labels, held.probs[:, i], t, subjects=held.subjects), "threshold": t}
                  for i, (n, t) in enumerate(zip(held.members, member_thresholds))}
        scores["ensemble"] = {**score(held.labels, prob, combiner.threshold, subjects=held.subjects),
                              "threshold": combiner.threshold}
        record["scores"] = scores
        write_json(folder / "metrics.json", record)
        written.append(folder / "metrics.json")
        print(render(f"held-out scores on {held.info['data_root']} ({len(table)} images)", scores, held.frame))
    _print_combiner(combiner, held.members, False)
    print("wrote " + ", ".join(map(str, written)))
    return record
