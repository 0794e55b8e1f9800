"""What `alldetect report` reads, checked: each architecture folder's usable fold runs (best.pt metadata, oof.csv,
history.csv), the ensembles scored by `ensemble --oof` that describe those runs, and held-out scores; what cannot be
used is noted with the reason."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from alldetect.config import Config
from alldetect.engine.rundir.files import Checkpoint, RunDir, RunMeta
from alldetect.engine.rundir.find import Member, fold_dirs, fold_of
from alldetect.ensemble.predictions import load_oof
from alldetect.ensemble.record import EnsembleRecord, read_ensemble_record
from alldetect.errors import UserError
from alldetect.models import count_parameters, model_from_config

log = logging.getLogger("alldetect")

REMAKE_OOF = "remake it with `alldetect ensemble RUN... --oof`"


@dataclass
class ArchResult:
    """One architecture folder (runs/<arch>): its usable fold runs and their out-of-fold predictions."""

    name: str
    folder: Path
    runs: list[Path] = field(default_factory=list)
    states: list[RunMeta] = field(default_factory=list)  # best.pt metadata per usable run
    oof: pd.DataFrame | None = None  # path, label, fold, subject, prob_all, pred
    histories: dict[int, pd.DataFrame] = field(default_factory=dict)
    params: int | None = None
    speed: float | None = None

    @property
    def config(self) -> Config:
        """The settings of its runs (of the first: they are one model); only for a folder with usable runs."""
        assert self.states, f"{self.folder} has no usable run"
        return self.states[0].config


@dataclass
class EnsembleResult:
    """An ensemble scored by `alldetect ensemble --oof`: its oof.csv and metrics.json."""

    name: str
    folder: Path
    members: list[str]
    oof: pd.DataFrame  # path, label, fold, prob_all, pred (its decisions, threshold as `ensemble` chose), subject
    meta: EnsembleRecord


@dataclass
class Findings:
    archs: list[ArchResult]
    ensembles: list[EnsembleResult]
    held_out: dict[str, EnsembleRecord]  # name -> metrics.json of `ensemble --name` on labelled images
    missing: list[str]  # what could not be used, and why

    def note(self, message: str, logged: bool = False) -> None:
        """List `message` on the page, and warn now unless it was `logged` already."""
        if message not in self.missing:  # one unreadable image may be among several models' mistakes
            if not logged:
                log.warning("%s", message)
            self.missing.append(message)

    def models(self) -> dict[str, pd.DataFrame]:
        """Every model with OOF predictions, ensembles last: name -> oof frame."""
        out = {a.name: a.oof for a in self.archs if a.oof is not None}
        out.update({e.name: e.oof for e in self.ensembles})
        return out


def find_arch_folders(runs_dir: Path) -> list[Path]:
    """runs/<arch> folders that hold fold<k> run folders; runs_dir may also be one such folder."""
    if not runs_dir.is_dir():
        raise UserError(f"no runs folder {runs_dir}: train first (./train.sh ARCH all) or point --runs at the folder "
                        "that holds <arch>/fold<k>/")
    if fold_dirs(runs_dir):
        return [runs_dir]
    archs = [d for d in sorted(runs_dir.iterdir()) if d.is_dir() and fold_dirs(d)]
    if not archs:
        raise UserError(f"no runs found under {runs_dir} (expected {runs_dir}/<arch>/fold<k>/ with best.pt and "
                        "oof.csv): train first (./train.sh ARCH all) or point --runs at the folder that holds them")
    return archs


def _shape_model(cfg: Config) -> torch.nn.Module:
    """The architecture a checkpoint's config describes, on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return model_from_config(cfg)


def checkpoint_problem(run: Path, state: Checkpoint, model: torch.nn.Module) -> str:
    """'' when best.pt's weights fit the model its config describes and config.yaml agrees with it."""
    cfg = state.meta.config.to_dict()
    saved = RunDir(run).config
    if saved.is_file():
        try:
            folder_cfg = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            return f"{saved} is not valid YAML ({str(e).splitlines()[0]})"
        for key in ("arch", "input_size"):
            if folder_cfg.get(key) != cfg.get(key):
                return (f"{saved} says {key}={folder_cfg.get(key)} but its best.pt was trained with "
                        f"{key}={cfg.get(key)}: the folder mixes two runs; retrain it (overwrite=true)")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.model.items()}
    if want != have:
        lacks, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        reshaped = [k for k in set(want) & set(have) if want[k] != have[k]]
        detail = (f"missing {lacks[:2]}" if lacks else f"unexpected {extra[:2]}" if extra
                  else f"{reshaped[0]} is {have[reshaped[0]]}, expected {want[reshaped[0]]}")
        return (f"its best.pt weights do not fit a {cfg['arch']} at input size {state.meta.input_size}, as its config says "
                f"({detail}): the checkpoint does not match its config")
    return ""


def collect_arch(folder: Path, findings: Findings) -> ArchResult:
    """Check every fold run of one architecture folder; read its histories and out-of-fold predictions."""
    result = ArchResult(folder.name, folder)
    models: dict[tuple, torch.nn.Module] = {}
    for run in fold_dirs(folder):
        fold = fold_of(run)
        files = RunDir(run)
        if files.history.is_file():
            try:
                result.histories[fold] = files.read_history()
            except UserError as e:
                findings.note(f"{e}; no training curve for {run}")
        if not files.trained:
            findings.note(f"{run}: no best.pt (not trained, or still in its first epoch): left out")
            continue
        try:
            state = files.load_best(mmap=True)
            key = (state.meta.config.arch, state.meta.input_size)
            if key not in models:
                models[key] = _shape_model(state.meta.config)
            problem = checkpoint_problem(run, state, models[key])
        except UserError as e:
            problem = str(e)
        if problem:
            findings.note(f"{run}: {problem}; left out")
            continue
        if not files.oof.is_file():
            findings.note(f"{run}: no oof.csv (out-of-fold predictions): left out of the table and plots; "
                          "retrain it with this version of alldetect")
            continue
        result.runs.append(run)
        result.states.append(state.meta)
    _drop_other_models(result, findings)
    if result.runs:
        try:
            oof = load_oof([Member(result.name, folder, result.runs)])  # the reader `ensemble` uses
        except UserError as e:
            findings.note(f"{folder}: {e}; left out")
            result.runs, result.states = [], []
            return result
        prob = oof.probs[:, 0]
        result.oof = oof.frame.assign(prob_all=prob, pred=(prob >= 0.5).astype(int))
        meta = result.states[0]
        result.params = count_parameters(models[(meta.config.arch, meta.input_size)])[0]
        k = meta.k
        done = sorted(result.oof["fold"].unique())
        if k and len(done) < k:
            findings.note(f"{folder}: out-of-fold predictions of {len(done)} of its {k} folds only "
                          f"(fold {', '.join(map(str, done))}): its row covers those folds",
                          logged=True)  # load_oof has warned
    return result


def _drop_other_models(result: ArchResult, findings: Findings) -> None:
    """The fold runs of one folder are one model; leave out those trained as another architecture or input
    size than most of them (a folder that mixes runs would give a row that describes none of them)."""
    kinds = [(s.config.arch, s.input_size) for s in result.states]
    if len(set(kinds)) < 2:
        return
    common = max(kinds, key=kinds.count)
    keep = [i for i, k in enumerate(kinds) if k == common]
    for i, (arch, size) in enumerate(kinds):
        if i not in keep:
            findings.note(f"{result.runs[i]}: trained as {arch} at input size {size}, unlike the other runs of "
                          f"{result.folder} ({common[0]} at {common[1]}); left out")
    result.runs = [result.runs[i] for i in keep]
    result.states = [result.states[i] for i in keep]


def collect_ensembles(submissions: Path, archs: dict[str, ArchResult], findings: Findings) -> list[EnsembleResult]:
    """submissions/oof_*/ whose members are among the runs and whose member probabilities are theirs (an
    ensemble made from other or older runs would not describe these)."""
    found: list[EnsembleResult] = []
    if not submissions.is_dir():
        return found
    for folder in sorted(submissions.glob("oof_*")):
        metrics_file, oof_file = folder / "metrics.json", folder / "oof.csv"
        if not (metrics_file.is_file() and oof_file.is_file()):
            findings.note(f"{folder}: no metrics.json and oof.csv; left out (rerun `alldetect ensemble RUN... --oof`)")
            continue
        try:
            meta = read_ensemble_record(metrics_file, REMAKE_OOF)
            oof = pd.read_csv(oof_file, dtype={"path": str, "subject": str})
        except UserError as e:
            findings.note(f"{e}; left out")
            continue
        except Exception as e:
            findings.note(f"{folder}: cannot read its oof.csv ({str(e)[:120]}); left out")
            continue
        members = meta.members
        problem = _ensemble_problem(members, oof, archs)
        if problem:
            findings.note(f"{folder}: {problem}; left out")
            continue
        keep = ["path", "label", "fold", "prob_all", "pred"] + (["subject"] if "subject" in oof else [])
        found.append(EnsembleResult(f"ensemble ({'+'.join(members)})", folder, members, oof[keep], meta))
    return found


def _ensemble_problem(members: list[str], oof: pd.DataFrame, archs: dict[str, ArchResult]) -> str:
    need = {"path", "label", "fold", "prob_all", "pred", *(f"prob_{m}" for m in members)}
    if not members or need - set(oof.columns):
        return f"its oof.csv lacks column(s) {', '.join(sorted(need - set(oof.columns)))}"
    absent = [m for m in members if m not in archs or archs[m].oof is None]
    if absent:
        return f"member(s) {', '.join(absent)} are not among the usable runs of this report"
    for m in members:
        member_oof = archs[m].oof
        assert member_oof is not None  # checked above
        own = member_oof.set_index("path")["prob_all"]
        if not oof["path"].isin(own.index).all() or len(own) != len(oof):
            return (f"it covers other images than {m}'s runs do (made from other runs?); rerun "
                    "`alldetect ensemble --oof`")
        if not np.allclose(oof[f"prob_{m}"].to_numpy(float), own.loc[oof["path"]].to_numpy(float), atol=2e-6):
            return (f"its probabilities of {m} differ from {m}'s oof.csv (made from other or older runs); rerun "
                    "`alldetect ensemble RUN... --oof`")
    return ""


def collect_held_out(submissions: Path, findings: Findings) -> dict[str, EnsembleRecord]:
    out: dict[str, EnsembleRecord] = {}
    if not submissions.is_dir():
        return out
    for metrics_file in sorted(submissions.glob("*/metrics.json")):
        if metrics_file.parent.name.startswith("oof_"):
            continue
        try:
            meta = read_ensemble_record(metrics_file, "remake it with the same `alldetect ensemble RUN... --name NAME`")
        except UserError as e:
            findings.note(f"{e}; left out")
            continue
        if meta.mode == "held-out" and meta.scores:
            out[metrics_file.parent.name] = meta
    return out


def collect(runs_dir: Path, submissions: Path) -> Findings:
    findings = Findings([], [], {}, [])
    findings.archs = [collect_arch(folder, findings) for folder in find_arch_folders(runs_dir)]
    usable = {a.name: a for a in findings.archs if a.oof is not None}
    if not usable:
        raise UserError(f"none of the runs under {runs_dir} can be used: " + "; ".join(findings.missing[:5])
                        + ". Train them (./train.sh ARCH all) and report again")
    findings.ensembles = collect_ensembles(submissions, usable, findings)
    findings.held_out = collect_held_out(submissions, findings)
    return findings
