"""The predictions an ensemble combines, read and checked: each member's out-of-fold predictions (its folds' oof.csv),
or `predict`'s pred_<NAME>.csv of every run (folds averaged per member), with the checks that they are of one
split of one data set and of the checkpoints the runs hold now; and, for correct=knn, each run's features."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from alldetect.engine.rundir.files import PredictionRecord, RunDir, RunMeta, predict_command_for
from alldetect.engine.rundir.find import Member
from alldetect.engine.select import selection_label
from alldetect.ensemble.combine import KNN_K
from alldetect.ensemble.neighbours import neighbour_means
from alldetect.errors import UserError, short_list

log = logging.getLogger("alldetect")


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
        moved = _disagree(ref, table, "fold")
        if len(moved):
            files = {i.member: i.meta.fold_file for i in infos}
            raise UserError(
                f"{member.name} and {ref_name} were trained on different fold files ({files[member.name]} and "
                f"{files[ref_name]}): {len(moved)} image(s) sit in other folds ({short_list(moved, 3)}). "
                "Use runs trained on the same fold file")
        relabelled = _disagree(ref, table, "label")
        if len(relabelled):
            raise UserError(f"{member.name} and {ref_name} disagree on the labels of {short_list(relabelled, 3)}")


def _disagree(ref: pd.DataFrame, table: pd.DataFrame, column: str) -> pd.Index:
    """The images (ref's index, which table covers) whose `column` differs between two members' OOF tables."""
    return ref.index[ref[column].to_numpy() != table.loc[ref.index, column].to_numpy()]


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
    _check_same_images(metas, name)
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
             if m.checkpoint_saved_at is not None and m.checkpoint_saved_at != RunDir(r).meta().saved_at]
    if stale:
        raise UserError(f"the predictions '{name}' of {short_list([str(r) for r in stale])} were made by an older "
                        "best.pt than the run holds now (it was retrained or resumed since). Rerun `alldetect predict "
                        f"{' '.join(str(r) for r in stale)} --data DIR --name {name}`")
    frame = frames[ref].reset_index(drop=True)  # predict's order: numeric for C-NMC test folders
    keep = ["path"] + [c for c in ("label", "subject") if c in frame]
    columns = []
    for member in members:
        folds = [frames[r].set_index("path").loc[frame["path"], "prob_all"].to_numpy(float) for r in member.runs]
        columns.append(np.mean(folds, axis=0))
    tta = sorted({m.tta for m in metas.values()})
    if len(tta) > 1:
        log.warning("the runs' predictions '%s' used different test-time augmentation (%s)", name, ", ".join(tta))
    meta = metas[ref]
    roots = sorted({m.data_root for m in metas.values()})
    info = {"data_root": meta.data_root, "data_fingerprint": meta.data_fingerprint,
            "data_content": meta.data_content, **({"data_roots": roots} if len(roots) > 1 else {}),
            "layout": meta.layout, "tta": tta if len(tta) > 1 else tta[0],
            "runs": {m.name: [str(r) for r in m.runs] for m in members}}
    return Predictions(frame[keep], np.column_stack(columns), [m.name for m in members], info)


def _check_same_images(metas: dict[Path, PredictionRecord], name: str) -> None:
    """Every run predicted the same images: by content (the SHA-256 of every file, which predict records), not by
    names and sizes, which two different C-NMC folders share. The folders may differ (a copy of the data set
    elsewhere holds the same images); the same folder whose images changed between two predicts may not."""
    lacking = [str(r) for r, m in metas.items() if m.data_content is None]
    if lacking:
        raise UserError(f"the predictions '{name}' of {short_list(lacking)} do not record the content of the images "
                        "they are of (made by an older alldetect), so they cannot be checked to be of the same images "
                        f"as the others. Rerun `alldetect predict RUN... --data DIR --name {name}` for every run")
    contents = {m.data_content for m in metas.values()}
    if len(contents) > 1:
        groups: dict[str, list[str]] = {}
        for r, m in metas.items():
            groups.setdefault(f"{m.data_root} (content {(m.data_content or '')[:16]})", []).append(str(r))
        detail = "; ".join(f"{short_list(runs, 3)}: {where}" for where, runs in groups.items())
        same_root = len({m.data_root for m in metas.values()}) == 1
        why = (" (the same folder: its images changed between the predicts)" if same_root else "")
        raise UserError(f"predictions '{name}' were made of different images{why}: {detail}. Rerun `alldetect "
                        f"predict` for every run with the same --data")
    roots = sorted({m.data_root for m in metas.values()})
    if len(roots) > 1:
        log.info("predictions '%s' were made from %d folders holding the same images (%s)", name, len(roots),
                 ", ".join(roots))


def all_have_features(members: list[Member], name: str) -> bool:
    return all(RunDir(run).feat(name).is_file() for m in members for run in m.runs)


def _read_features(run: Path, name: str) -> pd.Series:
    """feat_<name>.npz of a run as {path: feature row}, checked against the run's current best.pt."""
    files = RunDir(run)
    paths, features = files.read_features(name)
    saved = files.read_pred_meta(name).checkpoint_saved_at
    if saved is not None and saved != files.meta().saved_at:
        raise UserError(f"{files.feat(name)} was made by an older best.pt than {run} holds now: rerun "
                        f"`{predict_command_for(run, name, features=True)}`")
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
