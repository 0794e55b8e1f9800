"""Turn a folder of images into a manifest: one row per image with its label and subject.

Recognised without being told (first match wins):
  cnmc_train     .../fold_{k}/{all,hem}/UID_*.bmp (C-NMC_training_data/ or training_data/)
  cnmc_prelim    a folder of 1.bmp..N.bmp with C-NMC_test_prelim_phase_data_labels.csv (or phase2.csv)
                 in it or beside it
  class_folders  <root>/<class>/*.{bmp,png,jpg,...} with two or more classes
  unlabelled     one folder of images and no labels (C-NMC final test, or any plain folder)
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pandas as pd

from alldetect.errors import UserError, short_list

log = logging.getLogger("alldetect")

IMAGE_EXTS = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}
CLASS_LABELS = {"hem": 0, "all": 1}  # the challenge's coding: 1 = leukemic blast
UNKNOWN = -1
COLUMNS = ["path", "label", "label_name", "subject", "source_layout", "official_fold"]
LABEL_FILES = ("C-NMC_test_prelim_phase_data_labels.csv", "phase2.csv")

UID_RE = re.compile(r"^UID_(H?\d+)_\d+_\d+_(all|hem)\.(bmp|png|jpe?g|tiff?)$", re.IGNORECASE)
FOLD_RE = re.compile(r"^fold_(\d+)$")
NUMBERED_RE = re.compile(r"^(\d+)\.[A-Za-z]+$")


def subject_of(file_name: str) -> str | None:
    """'UID_11_10_1_all.bmp' -> '11', 'UID_H10_43_1_hem.bmp' -> 'H10', anything else -> None."""
    m = UID_RE.match(file_name)
    return m.group(1).upper() if m else None


def find_images(root: Path) -> list[str]:
    """Relative POSIX paths of every image under root, sorted; hidden folders and files are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):  # fold folders may be links
        here = Path(dirpath)
        if here != Path(root) and os.path.realpath(here) in {os.path.realpath(a) for a in here.parents}:
            dirnames[:] = []  # a link back up the tree: its images are found along the real path
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTS:
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def build_manifest(root: str | Path) -> pd.DataFrame:
    """The manifest of the data set under `root`; raises UserError when no layout fits."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"the data folder {root} is a file, not a folder: point data.root= (or ALLDETECT_DATA) at "
                        "the folder that holds the images")
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist (set data.root=PATH or ALLDETECT_DATA)")
    paths = find_images(root)
    if not paths:
        raise UserError(
            f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {root}; point at the folder that holds "
            "C-NMC_training_data/, a C-NMC test folder, or one sub-folder per class"
        )
    for detect in (_cnmc_train, _numbered_or_plain, _class_folders):
        frame = detect(root, paths)
        if frame is not None:
            return frame.reset_index(drop=True)
    folders = sorted({str(Path(p).parent) for p in paths})
    raise UserError(
        f"cannot tell the layout of {root}: images lie in {short_list(folders)}. Expected the C-NMC training "
        "layout (fold_k/all, fold_k/hem), a test folder (1.bmp..N.bmp), or one sub-folder per class"
    )


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.astype({"label": int, "official_fold": int, "subject": str})


def _cnmc_train(root: Path, paths: list[str]) -> pd.DataFrame | None:
    rows, bad_names, mismatched = [], [], []
    for p in paths:
        parts = p.split("/")
        if len(parts) < 3 or parts[-2].lower() not in CLASS_LABELS or not FOLD_RE.match(parts[-3]):
            continue
        cls, name = parts[-2].lower(), parts[-1]
        m = UID_RE.match(name)
        if not m:
            bad_names.append(p)
            continue
        if m.group(2).lower() != cls:
            mismatched.append(p)
        rows.append(dict(path=p, label=CLASS_LABELS[cls], label_name=cls, subject=m.group(1).upper(),
                         source_layout="cnmc_train", official_fold=_official_fold(parts[-3])))
    if not rows and not bad_names:
        return None
    if bad_names:
        raise UserError(
            f"{len(bad_names)} file(s) in C-NMC training folders of {root} are not named like "
            f"UID_11_10_1_all.bmp / UID_H10_43_1_hem.bmp, so their subject is unknown: {short_list(bad_names)}. "
            "Rename or remove them"
        )
    if mismatched:
        raise UserError(
            f"{len(mismatched)} file(s) of {root} sit in the other class's folder (name says all/hem, folder says "
            f"otherwise): {short_list(mismatched)}. Move them to the folder their name says"
        )
    ignored = len(paths) - len(rows)
    if ignored:
        log.info("using the C-NMC training folds of %s; %d other image(s) there are not part of them", root, ignored)
    return _frame(rows)


def _numbered_or_plain(root: Path, paths: list[str]) -> pd.DataFrame | None:
    folders = {str(Path(p).parent) for p in paths}
    if len(folders) != 1:
        return None
    folder = root / next(iter(folders))
    candidates = [d / n for d in (folder, folder.parent) for n in LABEL_FILES if (d / n).is_file()]
    labels_file = candidates[0] if candidates else None
    numbered = all(NUMBERED_RE.match(Path(p).name) for p in paths)
    if numbered and labels_file is not None:
        _check_labels_agree(candidates)
        return _with_labels(root, paths, labels_file)
    if labels_file is not None:
        others = [p for p in paths if not NUMBERED_RE.match(Path(p).name)]
        log.warning("%s is not used: %d image(s) of %s are not named 1.bmp .. N.bmp (%s), so the folder is read as "
                    "unlabelled. Remove or rename them to score predictions against it",
                    labels_file, len(others), folder, short_list(others, 3))
    if folder == root or numbered:
        return _frame([dict(path=p, label=UNKNOWN, label_name="unknown", subject=Path(p).stem,
                            source_layout="unlabelled", official_fold=-1) for p in paths])
    return None  # a single class folder: let _class_folders say that one class is not enough


def read_labels_file(labels_file: str | Path) -> pd.DataFrame:
    """A C-NMC labels file (`Patient_ID,new_names,labels`) as new_names, label (0/1) and subject, checked:
    readable, the three columns, labels 0 or 1, each image once."""
    labels_file = Path(labels_file)
    if not labels_file.is_file():
        raise UserError(f"labels file {labels_file} does not exist")
    try:
        table = pd.read_csv(labels_file, dtype=str)
    except Exception as e:  # pandas raises many kinds for a broken CSV
        raise UserError(f"cannot read labels file {labels_file}: {e}") from None
    need = {"Patient_ID", "new_names", "labels"}
    missing = need - set(table.columns)
    if missing:
        raise UserError(
            f"labels file {labels_file} lacks column(s) {', '.join(sorted(missing))}; "
            f"expected the header Patient_ID,new_names,labels (found {','.join(table.columns)})"
        )
    table = table.dropna(how="all")
    bad_labels = table.loc[~table["labels"].isin(["0", "1"]), "new_names"].tolist()
    if bad_labels:
        raise UserError(f"labels file {labels_file}: the labels column must be 0 (hem) or 1 (all); "
                        f"rows for {short_list(bad_labels)} are not")
    if table["new_names"].duplicated().any():
        dup = table.loc[table["new_names"].duplicated(), "new_names"].tolist()
        raise UserError(f"labels file {labels_file} lists {short_list(dup)} more than once")
    subjects = [subject_of(str(p)) or str(p) for p in table["Patient_ID"]]
    return pd.DataFrame({"new_names": table["new_names"].tolist(), "label": table["labels"].astype(int).tolist(),
                         "subject": subjects})


def _check_labels_agree(files: list[Path]) -> None:
    """Two labels files for one folder (in it and beside it, or both names) must say the same, else which is right?"""
    first = read_labels_file(files[0]).sort_values("new_names").reset_index(drop=True)
    for other in files[1:]:
        theirs = read_labels_file(other).sort_values("new_names").reset_index(drop=True)
        if not first.equals(theirs):
            merged = first.merge(theirs, on="new_names", how="outer", suffixes=("", "_other"), indicator=True)
            differ = merged[(merged["_merge"] != "both") | (merged["label"] != merged["label_other"])
                            | (merged["subject"] != merged["subject_other"])]["new_names"].tolist()
            raise UserError(f"two labels files for one folder disagree: {files[0]} and {other} (on "
                            f"{short_list(differ, 3)}). Keep the right one and remove or rename the other")


def _with_labels(root: Path, paths: list[str], labels_file: Path) -> pd.DataFrame:
    table = read_labels_file(labels_file)
    by_name = {Path(p).name: p for p in paths}
    unknown = sorted(set(table["new_names"]) - set(by_name))
    if unknown:
        raise UserError(f"labels file {labels_file} names {len(unknown)} image(s) that are not in "
                        f"{root / Path(paths[0]).parent}: {short_list(unknown)}")
    unlabelled = sorted(set(by_name) - set(table["new_names"]), key=_numeric_key)
    if unlabelled:
        raise UserError(f"{len(unlabelled)} image(s) have no row in {labels_file}: {short_list(unlabelled)}")
    rows = [dict(path=by_name[r.new_names], label=r.label, label_name="all" if r.label else "hem",
                 subject=r.subject, source_layout="cnmc_prelim", official_fold=-1) for r in table.itertuples()]
    return _frame(rows).sort_values("path", key=lambda s: s.map(_numeric_key))


def _numeric_key(name: str):
    m = NUMBERED_RE.match(Path(name).name)
    return (0, int(m.group(1)), name) if m else (1, 0, name)


# Folder names, lower-cased, that say which class is which; label 1 is the leukemic blast, as in the challenge.
BLAST_NAMES = {"all", "blast", "blasts", "leukemia", "leukaemia", "leukemic", "leukaemic", "malignant", "cancer"}
NORMAL_NAMES = {"hem", "normal", "healthy", "benign"}


def _class_labels(root: Path, classes: list[str]) -> dict[str, int]:
    """Two class folder names -> {name: label}. A folder named like a blast class is 1, one named like a normal
    class 0; when the names say neither, sorted order, with a warning that names the choice."""
    blast = [c for c in classes if c.lower() in BLAST_NAMES]
    normal = [c for c in classes if c.lower() in NORMAL_NAMES]
    if len(blast) == 1:
        positive = blast[0]
    elif len(normal) == 1:
        positive = next(c for c in classes if c != normal[0])
    else:
        positive = classes[1]
        log.warning("cannot tell from the folder names of %s which class holds the blasts: treating %s as `all` "
                    "(label 1) and %s as `hem` (label 0), in sorted order. Rename them all/ and hem/ to be sure",
                    root, positive, classes[0])
    label_of = {c: int(c == positive) for c in classes}
    log.info("class folders of %s: %s", root, ", ".join(f"{c}={i}" for c, i in label_of.items()))
    return label_of


def _class_folders(root: Path, paths: list[str]) -> pd.DataFrame:
    nested = [p for p in paths if "/" in p]
    loose = [p for p in paths if "/" not in p]
    classes = sorted({p.split("/", 1)[0] for p in nested})
    if len(classes) < 2:
        what = f"only one class folder ({classes[0]})" if classes else "no class folders"
        raise UserError(
            f"{root} has {what}; a labelled data set needs two classes, e.g. {root}/all and {root}/hem"
        )
    if len(classes) > 2:
        raise UserError(f"{root} has {len(classes)} class folders ({', '.join(classes)}); alldetect tells two "
                        "classes apart, blasts (all) from normal cells (hem): keep two folders, e.g. all/ and hem/")
    if loose:
        log.warning("%d image(s) directly in %s belong to no class and are left out: %s",
                    len(loose), root, short_list(loose))
    label_of = _class_labels(root, classes)
    subjects = {p: subject_of(Path(p).name) for p in nested}
    grouped = all(subjects.values())
    if not grouped:
        log.warning("no subject is known for the images of %s (names are not C-NMC UID_* names): every image "
                    "is its own group, so images of one person can land in different folds", root)
    rows = [dict(path=p, label=label_of[p.split("/", 1)[0]], label_name=p.split("/", 1)[0],
                 subject=subjects[p] if grouped else p, source_layout="class_folders", official_fold=-1)
            for p in nested]
    return _frame(rows)


def dataset_name(root: str | Path) -> str:
    """A short name for fold files: the data folder's name, made file-safe."""
    name = Path(root).resolve().name or "data"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _official_fold(folder: str) -> int:
    """C-NMC's fold_0 .. fold_2 folder -> 0 .. 2 (the layout's pattern has matched it already)."""
    m = FOLD_RE.match(folder)
    assert m is not None, folder
    return int(m.group(1))
