"""`alldetect report`: the study's comparison (its Table 2) and figures, from what training and `ensemble` wrote.

  reports/<name>/index.html   a self-contained page (figures referenced relative to it)
  reports/<name>/README.md    the same content as Markdown
  reports/<name>/figures/     the PNG files both refer to

Reads runs/<arch>/fold<k>/ (best.pt for metadata, oof.csv, history.csv) and submissions/oof_*/ (ensembles scored
by `alldetect ensemble --oof`) and submissions/<NAME>/metrics.json (held-out sets). Scores come from
`alldetect.metrics.score`, the same function training and `ensemble` use. A run that cannot be used (no oof.csv,
a checkpoint that does not fit its config, ...) is left out with a warning and listed on the page.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import yaml

from alldetect import plots
from alldetect.atomic import safe_name
from alldetect.config import Config
from alldetect.data.demo import is_demo_data
from alldetect.data.folds import fold_file_root
from alldetect.data.images import center_crop, fingerprint, read_rgb
from alldetect.engine.loop import resolve_device
from alldetect.engine.runfiles import Checkpoint, RunDir, RunMeta
from alldetect.engine.runs import Member, fold_dirs, fold_of
from alldetect.engine.select import selection_label, selection_text
from alldetect.ensemble import load_oof, metrics_table
from alldetect.errors import UserError
from alldetect.metrics import METRIC_NAMES, score
from alldetect.models import count_parameters, default_input_size, model_from_config
from alldetect.page import Bullets, Figure, Heading, Page, Paragraph, Table

log = logging.getLogger("alldetect")

COLUMNS = {"accuracy": "accuracy", "f1": "weighted F1", "precision": "precision", "recall": "recall",
           "roc_auc": "ROC-AUC"}  # the table's order: the study's accuracy first
MISTAKES = 12  # images per grid of confident mistakes
TILE = 160  # px per image in that grid
SPEED_BATCH, SPEED_STEPS = 8, 5


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
    meta: dict


@dataclass
class Findings:
    archs: list[ArchResult]
    ensembles: list[EnsembleResult]
    held_out: dict[str, dict]  # name -> metrics.json of `ensemble --name` on labelled images
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


# ---------------------------------------------------------------- finding and checking runs

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
            meta = json.loads(metrics_file.read_text(encoding="utf-8"))
            oof = pd.read_csv(oof_file, dtype={"path": str, "subject": str})
        except Exception as e:
            findings.note(f"{folder}: cannot read its metrics.json or oof.csv ({str(e)[:120]}); left out")
            continue
        members = meta.get("members", [])
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


def collect_held_out(submissions: Path, findings: Findings) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if not submissions.is_dir():
        return out
    for metrics_file in sorted(submissions.glob("*/metrics.json")):
        if metrics_file.parent.name.startswith("oof_"):
            continue
        try:
            meta = json.loads(metrics_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            findings.note(f"{metrics_file}: not valid JSON ({e}); left out")
            continue
        if meta.get("mode") == "held-out" and meta.get("scores"):
            out[metrics_file.parent.name] = meta
    return out


# ---------------------------------------------------------------- numbers

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
            row[f"{k}_mean"] = float(per_fold[k].mean())
            row[f"{k}_std"] = float(per_fold[k].std(ddof=1)) if len(per_fold) > 1 else float("nan")
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


def inference_speed(cfg: Config, device: torch.device) -> float:
    """Images/s of the run's architecture at its input size: eval mode, fp32, a batch of SPEED_BATCH random
    images, the fastest of SPEED_STEPS timed batches after one warm-up (the weights do not change the time).
    On the CPU on one thread: with several, a machine shared with other jobs gave anything from 3 to 170
    images/s for the same model (threads waiting for each other); one thread gives the same number each time."""
    size = cfg.input_size or default_input_size(cfg.arch)
    torch.manual_seed(0)
    model = model_from_config(cfg).eval().to(device)
    x = torch.randn(SPEED_BATCH, 3, size, size, device=device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    times = []
    try:
        with torch.inference_mode():
            for step in range(SPEED_STEPS + 1):
                start = time.perf_counter()
                model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if step:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return SPEED_BATCH / min(times)


def _cell(mean: float, std: float) -> str:
    return f"{mean:.4f}" if np.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def display_table(numbers: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"model": numbers["model"], "folds": numbers["folds"]})
    for k, label in COLUMNS.items():
        out[label] = [_cell(m, s) for m, s in zip(numbers[f"{k}_mean"], numbers[f"{k}_std"])]
    out["parameters"] = [f"{int(p):,}" if not np.isnan(p) else "?" for p in numbers["params"]]
    out["images/s"] = [f"{s:.1f}" if not np.isnan(s) else "not measured" for s in numbers["images_per_s"]]
    out["selection"] = numbers["selection"]
    return out


# ---------------------------------------------------------------- the page

def protocol_text(findings: Findings) -> str:
    """The split protocol, as the checkpoints record it: subject-grouped, or the study's leaky split by image."""
    states = [s for a in findings.archs for s in a.states]
    leaky = {s.leaky_split for s in states}
    files = sorted({s.fold_file or "?" for s in states})
    oofs = [a.oof for a in findings.archs if a.oof is not None]
    images = max(len(o) for o in oofs)
    subjects = max(o["subject"].nunique() for o in oofs if "subject" in o) if any("subject" in o for o in oofs) else "?"
    ks = sorted({s.k for s in states})
    k = "/".join(map(str, ks)) or "?"
    where = f"fold file{'s' if len(files) > 1 else ''} {', '.join(f'`{f}`' for f in files)}"
    if leaky == {False}:
        text = (f"Split protocol: subject-grouped {k}-fold cross-validation ({where}; {images} images of {subjects} "
                "subjects): no subject has images in two folds, and every image is scored by the fold model that "
                "did not train on it (out-of-fold).")
    elif leaky == {True}:
        text = (f"Split protocol: **leaky split by image** ({k} folds, {where}; {images} images of {subjects} "
                "subjects), the study's own protocol: one subject's cells sit on both sides of a split, so these "
                "scores are optimistic.")
    else:
        shown = {True: "leaky by image", False: "subject-grouped", None: "not recorded"}
        kinds = ", ".join(sorted(shown[v] for v in leaky))
        text = (f"Split protocol: mixed ({kinds}; {where}): the rows below were not scored the same way and do "
                "not compare directly.")
    if len(files) > 1:
        text += " The architectures were trained on different fold files."
    optimistic = [a.name for a in findings.archs if a.states and "OPTIMISTIC" in selection_label([s.config for s in a.states])]
    if optimistic:
        text += (f" **Optimistic**: {', '.join(optimistic)} kept each fold's epoch with the best score on that fold "
                 "itself (select=outer), so their scores (and those of ensembles of them) flatter them; retrain "
                 "with select=last or select=inner for scores that do not.")
    else:
        text += (" Nothing behind these scores was chosen on the images they are of: each run kept its weights by "
                 "`select=` (see the Runs table) without looking at its validation fold.")
    return text


def _data_root(arch: ArchResult, override: str | None) -> Path | None:
    if override:
        return Path(override)
    for root in ((arch.config.data.root, fold_file_root(arch.states[0].fold_file)) if arch.states else ()):
        if root and Path(root).is_dir():
            return Path(root)
    return None


def mistakes_tiles(oof: pd.DataFrame, root: Path | None, crop: int,
                   findings: Findings) -> list[tuple[np.ndarray | None, str]]:
    """The MISTAKES most confident wrong decisions: tiles of the cells with their probability of `all`."""
    wrong = oof[oof["pred"] != oof["label"]]
    confidence = np.where(wrong["pred"] == 1, wrong["prob_all"], 1 - wrong["prob_all"])
    worst = wrong.assign(confidence=confidence).sort_values("confidence", ascending=False).head(MISTAKES)
    tiles = []
    for row in worst.itertuples():
        img = None
        if root is not None:
            try:
                cell = center_crop(read_rgb(root / row.path), crop)
                img = cv2.resize(cell, (TILE, TILE), interpolation=cv2.INTER_AREA)
            except UserError as e:
                findings.note(f"{e}; shown as an empty tile")
        subject = f"subject {row.subject}, " if "subject" in worst and isinstance(row.subject, str) else ""
        truth = plots.CLASS_NAMES[int(row.label)]
        p_all = plots.probability_text(row.prob_all)
        tiles.append((img, f"{Path(row.path).name}\n{subject}true {truth}, p(all) {p_all}"))
    return tiles


def build_page(title: str, findings: Findings, numbers: pd.DataFrame, figures: dict[str, list[tuple[str, str]]],
               context: list[str], speed_note: str) -> Page:
    page = Page(title)
    page.add(Paragraph(" ".join(context)))
    page.add(Heading("Comparison (the study's Table 2)"), Paragraph(protocol_text(findings)))
    ensembles = "; ".join(f"{e.name}: threshold {_threshold_text(e.meta)}, weights {e.meta.get('weights_mode', '?')}"
                          for e in findings.ensembles)
    caption = ("Out-of-fold scores, mean ± standard deviation over folds (each fold's images scored by the model "
               "that did not train on them). Accuracy, weighted F1 (the challenge metric), precision and recall of "
               "`all` at threshold 0.5, ROC-AUC of the probability of `all`. Parameters: trainable, at the input "
               f"size trained. {speed_note}"
               + (f" Ensembles decide as `alldetect ensemble --oof` did ({ensembles}); their parameters are the sum "
                  "of their members', their images/s those of one model of each member in turn." if ensembles else ""))
    page.add(Table(display_table(numbers), caption))
    page.add(Heading("Scores per fold", 3), Table(per_fold_table(findings),
                                                  "The numbers behind each mean and standard deviation above."))
    if findings.held_out:
        page.add(Heading("Held-out sets"))
        for name, meta in findings.held_out.items():
            scores = {m: {**s, "roc_auc": s.get("roc_auc") if s.get("roc_auc") is not None else float("nan")}
                      for m, s in meta["scores"].items()}
            page.add(Table(metrics_table(scores),
                           f"`submissions/{name}.csv` on {meta.get('data_root', '?')} ({meta.get('images', '?')} "
                           "images), scored by `alldetect ensemble --name`"))
    sections = {"confusion": "Confusion matrices", "curves": "ROC and precision-recall curves",
                "calibration": "Calibration", "training": "Training curves", "mistakes": "The most confident mistakes"}
    for key, heading in sections.items():
        if figures.get(key):
            page.add(Heading(heading), *[Figure(src, caption) for src, caption in figures[key]])
    page.add(Heading("Missing or left out"))
    page.add(Bullets(findings.missing) if findings.missing else Paragraph("Nothing: every run found was used."))
    page.add(Heading("Runs"), Table(_runs_table(findings)),
             Paragraph("Kept F1: the mean over folds of the validation-fold weighted F1 of the weights each run kept "
                       "(history.csv). Best-epoch F1: what keeping each fold's best epoch *on that fold* would have "
                       "printed; the gap is how much choosing on the scored images flatters (select=outer)."))
    return page


def per_fold_table(findings: Findings) -> pd.DataFrame:
    rows = []
    for name, oof in findings.models().items():
        for r in fold_scores(oof).itertuples():
            rows.append({"model": name, "fold": r.fold, "images": r.images,
                         **{label: f"{getattr(r, k):.4f}" for k, label in COLUMNS.items()}})
    return pd.DataFrame(rows)


def _threshold_text(meta: dict) -> str:
    mode = str(meta.get("threshold_mode", "0.5"))
    return "chosen per fold on the other folds" if mode == "oof" else mode


def _runs_table(findings: Findings) -> pd.DataFrame:
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
    return f"{np.mean(values):.4f}" if values else "-"


def draw_figures(findings: Findings, fig_dir: Path, data: str | None) -> dict[str, list[tuple[str, str]]]:
    """Every figure, as (path relative to the page, caption) per section."""
    models = findings.models()
    rel = lambda p: f"figures/{p.name}"  # noqa: E731
    figures: dict[str, list[tuple[str, str]]] = {k: [] for k in ("confusion", "curves", "calibration", "training",
                                                                  "mistakes")}
    confusions = {n: np.array(score(o["label"], o["prob_all"], pred=o["pred"])["confusion"]) for n, o in models.items()}
    path = plots.confusion_figure(confusions, fig_dir / "confusion.png")
    figures["confusion"].append((rel(path), "Confusion matrices of all out-of-fold predictions (rows: true class, "
                                            "columns: predicted): counts, and shares of each true class."))
    curves = {n: (o["label"].to_numpy(), o["prob_all"].to_numpy()) for n, o in models.items()}
    path = plots.roc_pr_figure(curves, fig_dir / "roc_pr.png")
    figures["curves"].append((rel(path), "ROC and precision-recall curves of `all` on all out-of-fold predictions "
                                         "pooled over folds (the AUC here is the pooled one; the table's is the mean "
                                         "over folds)."))
    path = plots.calibration_figure(curves, fig_dir / "calibration.png")
    figures["calibration"].append((rel(path), "Calibration: the share of `all` among images given a probability in "
                                              "each bin (on the diagonal = calibrated), with how many images fall "
                                              "in each bin."))
    for a in findings.archs:
        if a.histories and a.states:
            monitor = a.config.monitor
            best = {fold_of(r): s.progress.epoch for r, s in zip(a.runs, a.states)}
            path = plots.training_figure(a.name, a.histories, monitor, best,
                                         fig_dir / f"training_{safe_name(a.name)}.png")
            select = a.config.select
            inner = " Dotted: the inner split of the training folds that chose the epoch." if select == "inner" else ""
            figures["training"].append((rel(path), f"{a.name}: loss and validation-fold score per epoch, per fold; "
                                                   f"the dot marks the weights kept: "
                                                   f"{selection_text(select, monitor)}.{inner}"))
    archs = {a.name: a for a in findings.archs}
    for name, oof in models.items():
        source = archs.get(name) or archs[next(e.members[0] for e in findings.ensembles if e.name == name)]
        root = _data_root(source, data)
        if root is None:
            recorded = source.config.data.root
            findings.note(f"the images of {source.name} are not here (data root in its config: {recorded or 'none'}; "
                          "not found from this folder): its mistakes are shown as empty tiles; pass --data DIR")
        tiles = mistakes_tiles(oof, root, source.config.data.crop, findings)
        if not tiles:
            continue
        path = plots.image_grid(tiles, fig_dir / f"mistakes_{safe_name(name)}.png",
                                f"{name}: the {len(tiles)} most confident wrong decisions")
        figures["mistakes"].append((rel(path), f"{name}: the out-of-fold images it got wrong with the most "
                                               "confidence, with their probability of `all`."))
    return figures


# ---------------------------------------------------------------- the command

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


def measure_speeds(findings: Findings, device: str | None) -> str:
    if device is None:
        return "Images/s: not measured (--no-speed)."
    dev = resolve_device(device)
    for a in findings.archs:
        if a.oof is not None:
            a.speed = inference_speed(a.config, dev)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}), on one thread"
    return (f"Images/s: inference measured by `alldetect report` on this machine's {where}: eval mode, fp32, "
            f"batches of {SPEED_BATCH} random images at the model's input size, the fastest of {SPEED_STEPS} batches "
            "after a warm-up; it varies with the machine and with what else runs on it.")


def check_data(findings: Findings, data: str | None) -> list[str]:
    """Context lines about the data: synthetic demo data is said loudly; other images than the runs' are warned."""
    notes = []
    for a in findings.archs:
        root = _data_root(a, data) if a.states else None
        if root is not None and is_demo_data(root):
            notes.append(f"**SYNTHETIC demo data** ({root}): these scores say nothing about real cells.")
            break
    if data:
        a = next(a for a in findings.archs if a.oof is not None)
        meta, oof = a.states[0], a.oof
        assert oof is not None
        if oof["fold"].nunique() == meta.k and all((Path(data) / p).is_file() for p in oof["path"]):
            digest, _ = fingerprint(Path(data), sorted(oof["path"]))
            if digest != meta.fold_fingerprint:
                findings.note(f"the images under --data {data} differ from those {a.name} was trained on "
                              f"(fingerprint {digest}, its fold file's {meta.fold_fingerprint})")
    return notes


def publish(tmp: Path, final: Path) -> None:
    """Replace the report folder in one step, so a reader never sees half of an old and half of a new one."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
