"""`alldetect report`: the study's comparison (its Table 2) and figures, from what training and `ensemble` wrote.

  reports/<name>/index.html   a self-contained page (figures referenced relative to it)
  reports/<name>/README.md    the same content as Markdown
  reports/<name>/figures/     the PNG files both refer to

What it shows is read by `alldetect.report.findings` (runs/<arch>/fold<k>/: best.pt's metadata, oof.csv, history.csv;
submissions/oof_*/ scored by `alldetect ensemble --oof`; submissions/<NAME>/metrics.json of held-out sets) and
counted by `alldetect.report.comparison` with `alldetect.metrics.score`, the function training and `ensemble` use; speed
by `alldetect.report.speed`. This module writes the page and its figures. A run that cannot be used (no oof.csv, a
checkpoint that does not fit its config, ...) is left out with a warning and listed on the page.
"""

from __future__ import annotations

import logging
import os
import platform
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from alldetect import plots
from alldetect.atomic import safe_name
from alldetect.data.demo import is_demo_data
from alldetect.data.folds import fold_file_root
from alldetect.data.images import center_crop, fingerprint, read_rgb
from alldetect.engine.loop import resolve_device
from alldetect.engine.rundir.find import fold_of
from alldetect.engine.select import selection_label, selection_text
from alldetect.errors import UserError, short_list
from alldetect.metrics import score
from alldetect.page import Bullets, Figure, Heading, Page, Paragraph, Table
from alldetect.render import metrics_table
from alldetect.report.comparison import (
    display_table,
    held_out_persons_table,
    per_fold_table,
    persons_table,
    runs_table,
    threshold_text,
)
from alldetect.report.findings import ArchResult, Findings
from alldetect.report.speed import SPEED_BATCH, SPEED_STEPS, inference_speed

log = logging.getLogger("alldetect")

MISTAKES = 12  # images per grid of confident mistakes
TILE = 160  # px per image in that grid


# ---------------------------------------------------------------- finding and checking runs


# ---------------------------------------------------------------- numbers


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
    ensembles = "; ".join(f"{e.name}: threshold {threshold_text(e.meta)}, weights {e.meta.weights_mode}"
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
    persons = persons_table(findings)
    if persons is not None:
        wrong = {c.split(":")[0]: int(persons[c].str.contains("WRONG").sum()) for c in persons.columns[3:]}
        counted = ", ".join(f"{n} {k}" for n, k in wrong.items())
        page.add(Heading("People", 3), Table(persons, (
            "Each person's out-of-fold images (every image scored by the fold model that did not train on it): the "
            "mean probability of `all` and the share called `all`, per model; **WRONG**: most of the person's "
            f"images called the other class (people wrong as a whole: {counted}). Worst first, as the last "
            "model (the rightmost column) sees them.")))
    if findings.held_out:
        page.add(Heading("Held-out sets"))
        for name, meta in findings.held_out.items():
            scores = {m: {**s, "roc_auc": s.get("roc_auc") if s.get("roc_auc") is not None else float("nan")}
                      for m, s in meta.scores.items()}
            page.add(Table(metrics_table(scores),
                           f"`submissions/{name}.csv` on {meta.data_root or '?'} ({meta.images} "
                           "images), scored by `alldetect ensemble --name`"))
            if meta.persons:
                page.add(Table(held_out_persons_table(meta.persons),
                               f"`submissions/{name}.csv` per person, worst first: the ensemble's mean probability "
                               "of `all` and share called `all`; **WRONG**: most of the person's images called the "
                               "other class."))
    sections = {"confusion": "Confusion matrices", "curves": "ROC and precision-recall curves",
                "calibration": "Calibration", "training": "Training curves", "mistakes": "The most confident mistakes"}
    for key, heading in sections.items():
        if figures.get(key):
            page.add(Heading(heading), *[Figure(src, caption) for src, caption in figures[key]])
    page.add(Heading("Missing or left out"))
    page.add(Bullets(findings.missing) if findings.missing else Paragraph("Nothing: every run found was used."))
    page.add(Heading("Runs"), Table(runs_table(findings)),
             Paragraph("Kept F1: the mean over folds of the validation-fold weighted F1 of the weights each run kept "
                       "(history.csv). Best-epoch F1: what keeping each fold's best epoch *on that fold* would have "
                       "printed; the gap is how much choosing on the scored images flatters (select=outer)."))
    return page


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
        if a.histories:  # also of runs still training or left out: their curves say why
            cfg = a.config if a.states else None
            monitor, select = (cfg.monitor, cfg.select) if cfg else ("f1", "outer")
            best = {fold_of(r): s.progress.epoch for r, s in zip(a.runs, a.states)}
            path = plots.training_figure(a.name, a.histories, monitor, best,
                                         fig_dir / f"training_{safe_name(a.name)}.png")
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


REPORT_FILES = {"index.html", "README.md", "figures"}  # all that reports/<name>/ holds
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
NAME_MAX = 200  # characters: the folder and its temporary siblings (.<name>.XXXXXXXX.tmp) stay within 255 bytes


def report_name(given: str | None, default: str) -> str:
    """The report's folder name: --name (path-like characters made '_'), else the architectures joined by +. A name
    that names no folder of its own ('', '.', '..', './') is an error: the report would replace its parent."""
    name = default if given is None else safe_name(given, empty="")
    if not NAME_RE.match(name) or len(name) > NAME_MAX:
        shown = repr(given) if given is not None else f"{name!r} (from the architectures' folder names)"
        raise UserError(f"--name {shown}: a report name must start with a letter or digit and hold letters, digits "
                        f"and ._+- only, at most {NAME_MAX} characters (it names the folder the report is written "
                        "to), e.g. --name study")
    return name


def replaceable_problem(final: Path) -> str:
    """'' when `final` is absent or an earlier report (its files and nothing else): what `report` may replace;
    otherwise what is there that report did not write."""
    if not (final.exists() or final.is_symlink()):
        return ""
    if final.is_symlink() or not final.is_dir():
        return f"{final} exists and is not a report folder"
    entries = sorted(os.listdir(final))
    extra = [e for e in entries if e not in REPORT_FILES]
    figures = final / "figures"
    if figures.is_symlink() or (figures.exists() and not figures.is_dir()):
        extra.append("figures (not a folder of figures)")
    elif figures.is_dir():
        extra += [f"figures/{f.name}" for f in sorted(figures.iterdir())
                  if f.is_symlink() or not f.is_file() or f.suffix != ".png"]
    if extra:
        return f"{final} holds files `alldetect report` did not write ({short_list(extra, 4)})"
    titles = [_first_line(final / "README.md"), _first_line(final / "index.html", 400)]
    if not any("alldetect report:" in t for t in titles):
        return f"{final} is not a report of `alldetect report` (no page of one in it)"
    return ""


def _first_line(path: Path, chars: int = 200) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(chars)
    except OSError:
        return ""
