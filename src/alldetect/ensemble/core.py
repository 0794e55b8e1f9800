"""`alldetect ensemble`: average softmax outputs of several runs, score them, write submissions.

  alldetect ensemble RUN... --oof          the members' out-of-fold (OOF) predictions and their average, scored
  alldetect ensemble RUN... --name NAME    `predict`'s pred_<NAME>.csv of every run -> submissions/<NAME>.csv

A member is one architecture folder (runs/<arch>): its folds' predictions are averaged first, then the members.
How members are combined (weights=, average=, calibrate=, correct=, prior=, threshold=: see ensemble.combine) is fitted on
OOF predictions and never scored on the data it was fitted on: with --oof, each fold is scored with what was
fitted on the other folds, and the other ways of combining are printed beside the chosen one.

The predictions are read and checked by `alldetect.ensemble.predictions`, printed by `alldetect.render`, and the
challenge's isbi_valid.predict is written by `alldetect.ensemble.isbi`; this module runs the two modes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from alldetect import __version__
from alldetect.atomic import write_csv
from alldetect.engine.rundir.find import Member, find_fold_runs
from alldetect.ensemble.combine import (
    Combiner,
    Inputs,
    Method,
    alternatives,
    cross_fitted,
    fit,
)
from alldetect.ensemble.isbi import isbi_lines, write_isbi
from alldetect.ensemble.predictions import all_have_features, held_out_neighbours, load_oof, load_predictions, oof_neighbours
from alldetect.ensemble.record import check_record
from alldetect.errors import UserError, short_list
from alldetect.metrics import per_person, score
from alldetect.options import ENSEMBLE_OPTIONS
from alldetect.render import metrics_table, render, write_json

log = logging.getLogger("alldetect")


@dataclass
class Outcome:
    """What `ensemble` made: the record written as JSON, and the lines that tell a person (commands/ prints them)."""

    record: dict
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


OPTIONS = ENSEMBLE_OPTIONS  # declared in alldetect.options, where the CLI's help reads them too
# submissions/<NAME>/: what `ensemble --name NAME` writes (and `evaluate` adds), all of one submission
SUBMISSION_FILES = ("ensemble.json", "isbi_valid.predict", "isbi_valid.zip", "metrics.json", "evaluation.json")
TRANSDUCTIVE = ("correct=knn: each image's probability was mixed with those of its nearest neighbours among the "
                "images predicted with it (it uses the images jointly)")


def method_of(opts: dict) -> Method:
    return Method(opts["weights"], opts["average"], opts["calibrate"], opts["correct"], opts["threshold"],
                  opts["prior"])


# ---------------------------------------------------------------- reading what earlier steps wrote


# ---------------------------------------------------------------- tables and files


# ---------------------------------------------------------------- the two modes

def oof_report(members: list[Member], opts: dict, out_dir: Path) -> Outcome:
    """Score each member and the ensemble on the OOF predictions, and the ensemble made each other way; write
    metrics.json and oof.csv. Returns what metrics.json holds and the text that says it."""
    said: list[str] = []
    full = [str(r) for m in members for r in m.runs if r.name == "full"]
    if full:
        raise UserError(f"{short_list(full)} trained on every image, so it has no out-of-fold predictions to score: "
                        "name the fold runs (runs/<arch>, whose folds --oof scores) without it")
    oof = load_oof(members)
    method = method_of(opts)
    labels, folds = oof.labels, oof.frame["fold"].to_numpy()
    assert labels is not None, "out-of-fold predictions are labelled"
    have_features = method.correct == "knn" or all_have_features(members, "oof")
    inputs = Inputs(oof.probs, oof_neighbours(members, oof) if have_features else None)
    plain = Method(threshold=method.threshold)
    scores, columns = _member_scores(oof, labels, folds, plain)
    selection = oof.info["selection"]
    if method != plain:
        p, t, per_fold = cross_fitted(inputs, labels, folds, plain)
        scores["equal weights"] = _scored(labels, p, t, per_fold, oof.subjects)
    p, t, per_fold = cross_fitted(inputs, labels, folds, method)
    scores["ensemble"] = _scored(labels, p, t, per_fold, oof.subjects)
    persons = None if oof.subjects is None else per_person(labels, p, (p >= t).astype(int), oof.subjects)
    optimistic = [m for m, text in selection.items() if "OPTIMISTIC" in text]
    for s in [s for n, s in scores.items() if n not in selection]:  # the averages inherit their members' choice
        s["selection"] = "outer (OPTIMISTIC)" if optimistic else "/".join(sorted(set(selection.values())))
    others = alternatives(method, len(oof.members), inputs.neighbours is not None)
    one_fold = len(np.unique(folds)) < 2  # nothing can be cross-fitted: compare only what fits nothing
    compared = {m.label: _scored(labels, *cross_fitted(inputs, labels, folds, m), None)
                for m in others if not (one_fold and m.fitted)}
    final = fit(method, inputs, labels)  # on all OOF: what --name would use
    result = {"mode": "oof", "members": oof.members, "method": method.label, "weights_mode": method.weights,
              "threshold_mode": str(method.threshold), "weights": dict(zip(oof.members, final.weights)),
              "threshold": final.threshold, "weights_note": final.note, "cross_fitted": bool(per_fold),
              "per_fold": {f: _fitted_record(c, oof.members) for f, c in per_fold.items()},
              "scores": scores, "alternatives": compared, **oof.info, "images": len(labels),
              "made_by": f"alldetect {__version__}"}
    if persons is not None:
        result["persons"] = persons.reset_index().to_dict(orient="records")
    if method.prior != "none":
        result["prior"] = {"mode": str(method.prior), "per_fold": {
            f: {**_prior_record(c), "true": float(labels[folds == f].mean())} for f, c in per_fold.items()}}
    if method.correct == "knn":
        result["transductive"] = TRANSDUCTIVE
    table = oof.frame.assign(**columns, prob_all=p.round(6), pred=(p >= t).astype(int))
    write_csv(out_dir / "oof.csv", table)
    result = check_record(result)
    write_json(out_dir / "metrics.json", result)
    title = (f"out-of-fold scores of {len(labels)} images ({oof.info['fold_file']}), threshold={method.threshold}, "
             f"{method.label}")
    said.append(render(title, scores, oof.frame, persons))
    if method.prior != "none":
        shown = ", ".join(f"fold {f} {c.estimate.prior:.3f} (true {labels[folds == f].mean():.3f})"
                          for f, c in per_fold.items() if c.estimate is not None)
        said.append(f"prior={method.prior}: each fold's share of `all` taken from its own images' probabilities, the "
              f"training mix and the rest fitted on the other folds: {shown}")
    said += _comparison_lines(compared, [m.label for m in others if m.label not in compared], optimistic)
    said += _combiner_lines(final, oof.members, bool(per_fold))
    said.append(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'oof.csv'}")
    return Outcome(result, said)


def _member_scores(oof, labels: np.ndarray, folds: np.ndarray, plain: Method) -> tuple[dict, dict]:
    """Each member scored alone, cross-fitted as the ensemble is (with how its runs chose their weights), and
    its probability column for oof.csv."""
    scores, columns = {}, {}
    for i, name in enumerate(oof.members):
        p, t, per_fold = cross_fitted(Inputs(oof.probs[:, [i]]), labels, folds, plain)
        scores[name] = {**_scored(labels, p, t, per_fold, oof.subjects), "selection": oof.info["selection"][name]}
        columns[f"prob_{name}"] = oof.probs[:, i].round(6)
    return scores, columns


def _comparison_lines(compared: dict, left_out: list[str], optimistic: list[str]) -> list[str]:
    """The other ways of combining, scored alike; those that could not be; members whose scores flatter."""
    said = []
    if compared:
        said.append(f"\nthe ensemble made other ways (each cross-fitted like the one above):\n"
                    f"{metrics_table(compared).drop(columns=['confusion']).to_string(index=False)}")
    if left_out:
        said.append(f"\nnot compared: {', '.join(left_out)} (they fit something on the out-of-fold predictions, so "
                    "they need out-of-fold predictions of two or more folds)")
    if optimistic:
        said.append(f"OPTIMISTIC: {', '.join(optimistic)} chose each fold's epoch on the images it is scored on "
                    "(select=outer); retrain with select=last (the default) or select=inner for scores that are not")
    return said


def _fit_on_oof(members: list[Member], method: Method, m: int, said: list[str]) -> tuple[Combiner, list[float]]:
    """How the members are combined, and each member's own threshold, fitted on all their out-of-fold
    predictions (equal weights at the given threshold when nothing is fitted)."""
    if not method.fitted:
        combiner = Combiner.equal(method, m)
        return combiner, [combiner.threshold] * m
    fold_members = _with_folds_for_full(members, said.append)
    oof = load_oof(fold_members)
    assert oof.labels is not None, "out-of-fold predictions are labelled"
    knn = method.correct == "knn"
    combiner = fit(method, Inputs(oof.probs, oof_neighbours(fold_members, oof) if knn else None), oof.labels)
    alone = Method(threshold=method.threshold)
    return combiner, [fit(alone, Inputs(oof.probs[:, [i]]), oof.labels).threshold for i in range(m)]


def _held_out_scores(held, member_thresholds: list[float], prob: np.ndarray, threshold: float) -> dict:
    """Labelled held-out images: each member at its own threshold, and the ensemble."""
    scores = {n: {**score(held.labels, held.probs[:, i], t, subjects=held.subjects), "threshold": t}
              for i, (n, t) in enumerate(zip(held.members, member_thresholds))}
    scores["ensemble"] = {**score(held.labels, prob, threshold, subjects=held.subjects), "threshold": threshold}
    return scores


def _fitted_record(c: Combiner, members: list[str]) -> dict:
    out = {"weights": dict(zip(members, c.weights)), "threshold": c.threshold}
    if c.corrections:
        out["knn"] = {m: {"k": k, "mix": mix} for m, (k, mix) in zip(members, c.corrections)}
    if c.calibrator is not None and hasattr(c.calibrator, "t"):
        out["temperature"] = c.calibrator.t
    if c.method.prior != "none":
        out["prior"] = _prior_record(c)
    return out


def _prior_record(c: Combiner) -> dict:
    """prior=: the training mix, and the mix of the images it combined last (estimated, or as given)."""
    e = c.estimate
    return {"mode": str(c.method.prior), "training": c.train_prior, "method": e.method if e else None,
            "estimate": e.prior if e else None, "converged": e.converged if e else None,
            **({"iterations": e.iterations} if e and e.method == "em" else {})}


def _prior_text(c: Combiner, where: str) -> str:
    e = c.estimate
    assert e is not None and c.train_prior is not None, "probabilities were combined"
    how = {"em": "estimated by EM (Saerens et al. 2002)", "bbse": "estimated by black-box shift estimation (Lipton "
           "et al. 2018)", "known": "as given"}[e.method]
    warn = "" if e.converged else (" (did not converge)" if e.method == "em" else
                                   " (the decisions carry no information: kept the training mix)")
    return (f"prior={c.method.prior}: share of `all` among {where} {e.prior:.3f}, {how}{warn}; training mix "
            f"(out-of-fold labels) {c.train_prior:.3f}; probabilities re-weighted by Bayes' rule")


def _scored(labels, probs, thresholds, per_fold: dict, subjects) -> dict:
    s = score(labels, probs, thresholds, subjects=subjects)
    s["threshold"] = ({f: c.threshold for f, c in per_fold.items()} if per_fold and len(set(thresholds)) > 1
                      else float(thresholds[0]))
    return s


def _combiner_lines(c: Combiner, members: list[str], cross: bool) -> list[str]:
    """What was fitted on all out-of-fold predictions, in words."""
    method, said = c.method, []
    if method.weights in ("oof", "greedy"):
        shown = ", ".join(f"{m} {w:.4f}" for m, w in zip(members, c.weights))
        how = " (greedy selection with replacement)" if method.weights == "greedy" else ""
        said.append(f"weights fitted on all out-of-fold predictions{how}: {shown}"
              + (f" ({c.note})" if c.note else ""))
    if method.weights == "stack" and c.stacker is not None:
        coef = ", ".join(f"{m} {w:.3f}" for m, w in zip(members, c.stacker.coef_[0]))
        said.append(f"stacking (logistic regression on log-odds) fitted on all out-of-fold predictions: {coef}, "
              f"intercept {c.stacker.intercept_[0]:.3f}")
    if c.corrections:
        shown = ", ".join(f"{m} k={k} mix={mix:g}" for m, (k, mix) in zip(members, c.corrections))
        said.append(f"neighbourhood correction fitted on all out-of-fold predictions: {shown}")
    if method.calibrate != "none":
        t = getattr(c.calibrator, "t", None)
        extra = f" (T = {t:.3f})" if t is not None else ""
        said.append(f"calibration ({method.calibrate}) fitted on all out-of-fold predictions{extra}")
    if method.threshold == "oof":
        said.append(f"threshold chosen on all out-of-fold predictions (max weighted F1): {c.threshold:.4f}")
    if cross:
        said.append("The OOF scores above use, for each fold, what was fitted on the other folds only; a submission "
              "(--name) uses what was fitted on all OOF predictions.")
    if method.correct == "knn":
        said.append(TRANSDUCTIVE)
    return said


# ---------------------------------------------------------------- features for correct=knn


def _with_folds_for_full(members: list[Member], say) -> list[Member]:
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
        say(f"{member.name}: weights and threshold fitted on the out-of-fold predictions of "
              f"{', '.join(r.name for r in folds)} (full has none)")
        out.append(Member(member.name, member.folder, folds))
    return out


def submission(members: list[Member], name: str, opts: dict, out_dir: Path) -> Outcome:
    """Combine held-out predictions into out_dir/<name>.csv (+ isbi_valid.predict and zip, + metrics.json).
    Returns what ensemble.json holds and the text that says it."""
    said: list[str] = []
    held = load_predictions(members, name)
    method = method_of(opts)
    m = len(held.members)
    knn = method.correct == "knn"
    inputs = Inputs(held.probs, held_out_neighbours(members, name, held.frame) if knn else None)
    combiner, member_thresholds = _fit_on_oof(members, method, m, said)
    prob = combiner.probs(inputs)
    pred = (prob >= combiner.threshold).astype(int)
    if method.prior != "none":
        said.append(_prior_text(combiner, f"the {len(prob)} held-out images"))
    table = pd.DataFrame({"image": held.frame["path"], "prob_all": prob.round(6), "label": pred,
                          **{f"prob_{member}": held.probs[:, i].round(6) for i, member in enumerate(held.members)}})
    folder = out_dir / name
    # What an earlier `ensemble --name NAME` (and `evaluate` of its CSV) left goes before anything new is written:
    # a stale isbi_valid.zip or scores never sit beside this submission, even if this run is killed half-way.
    for old in SUBMISSION_FILES:
        (folder / old).unlink(missing_ok=True)
    write_csv(out_dir / f"{name}.csv", table)
    record = {"mode": "held-out", "name": name, "members": held.members, "method": method.label,
              "weights_mode": method.weights, "threshold_mode": str(method.threshold),
              "weights": dict(zip(held.members, combiner.weights)), **_fitted_record(combiner, held.members),
              "member_thresholds": dict(zip(held.members, member_thresholds)),
              "weights_note": combiner.note, "images": len(table), **held.info, "made_by": f"alldetect {__version__}"}
    if knn:
        record["transductive"] = TRANSDUCTIVE
    if method.prior in ("em", "bbse"):
        record["prior_transductive"] = (f"prior={method.prior}: the images' share of `all` was estimated from all of "
                                        "them together, so each image's probability depends on the others")
    write_json(folder / "ensemble.json", check_record(record))
    written = [out_dir / f"{name}.csv", folder / "ensemble.json"]
    lines, why = isbi_lines(table["image"], pred)
    if lines is not None:
        written += write_isbi(folder, lines)
    else:
        said.append(f"no isbi_valid.predict: {why}")
    if held.labels is not None:
        scores = _held_out_scores(held, member_thresholds, prob, combiner.threshold)
        record["scores"] = scores
        persons = None if held.subjects is None else per_person(held.labels, prob, pred, held.subjects)
        if persons is not None:
            record["persons"] = persons.reset_index().to_dict(orient="records")
        record = check_record(record)
        write_json(folder / "metrics.json", record)
        written.append(folder / "metrics.json")
        said.append(render(f"held-out scores on {held.info['data_root']} ({len(table)} images)", scores, held.frame,
                     persons))
    said += _combiner_lines(combiner, held.members, False)
    said.append("wrote " + ", ".join(map(str, written)))
    return Outcome(record, said)
