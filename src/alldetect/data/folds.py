"""Fold files: label-stratified, subject-grouped k-fold splits, written with a sidecar that makes them
traceable, and checked against the data on disk whenever they are loaded."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from alldetect import __version__
from alldetect.atomic import check_writable, write_csv, write_text
from alldetect.data.images import drop_bad_images, fingerprint
from alldetect.data.layouts import build_manifest, dataset_name
from alldetect.errors import UserError, short_list
from alldetect.locks import exclusive
from alldetect.options import SPLIT_BY
from alldetect.records import read_record

log = logging.getLogger("alldetect")

FOLD_COLUMNS = ["path", "label", "subject", "fold", "bytes"]
SIDECAR_VERSION = 1  # of a fold file's JSON sidecar; sidecars from before versions were recorded read as 1
REMAKE = "make the fold file again with `alldetect split DATA_ROOT`"


class FoldSidecar(BaseModel):
    """<fold file>.json: what `alldetect split` made the fold file from. Every field may be absent from a sidecar
    written by hand (a fold file without one needs data.root=); a key it does not know, a value of the wrong type and
    a newer version are refused (records.read_record)."""

    model_config = ConfigDict(extra="forbid")
    version: int = SIDECAR_VERSION
    dataset: str = ""
    data_root: str = ""
    layout: str = ""
    by: str = "subject"  # one of options.SPLIT_BY
    k: int | None = None
    seed: int | None = None
    images: int | None = None
    subjects: int | None = None
    fingerprint: str = ""  # of the images it lists (data/images.fingerprint)
    skipped: list[str] = []  # unreadable images left out (split --skip-bad): "path: problem"
    made_by: str = ""


def read_sidecar(fold_file: Path) -> FoldSidecar | None:
    """The fold file's sidecar, None when it has none."""
    path = sidecar_path(fold_file)
    if not path.is_file():
        return None
    return read_record(path, FoldSidecar, SIDECAR_VERSION, "a fold file's sidecar `alldetect split` writes", REMAKE)


@dataclass
class FoldFile:
    """A loaded, verified fold file: the table, its sidecar, and the data root it was checked against."""

    path: Path
    table: pd.DataFrame
    meta: FoldSidecar
    data_root: Path

    @property
    def k(self) -> int:
        return int(self.table["fold"].max()) + 1

    @property
    def leaky(self) -> bool:
        return self.meta.by == "image"

    @cached_property  # every checkpoint records it: sort and hash the table once, not each epoch
    def assignment(self) -> str:
        """A digest of which image sits in which fold: equal for two fold files exactly when they split alike."""
        lines = sorted(f"{p}\t{f}" for p, f in zip(self.table["path"], self.table["fold"]))
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def assign_folds(manifest: pd.DataFrame, k: int, seed: int, by: str = "subject") -> np.ndarray:
    """Fold index per manifest row. by: subject (StratifiedGroupKFold), official (C-NMC fold_0..2), image."""
    labels = manifest["label"].to_numpy()
    if (labels < 0).any():
        raise UserError("cannot split unlabelled images into folds: the data set needs labels (all/hem)")
    if by == "official":
        if not (manifest["official_fold"] >= 0).all():
            raise UserError("--by official needs the C-NMC training layout (fold_0, fold_1, fold_2 folders)")
        return manifest["official_fold"].to_numpy()
    if by == "image":
        _check_k(manifest.assign(subject=manifest["path"]), k)
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        groups = None
    elif by == "subject":
        _check_k(manifest, k)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        groups = manifest["subject"].to_numpy()
    else:
        raise UserError(f"unknown split '--by {by}'; choose {', '.join(SPLIT_BY)}")
    folds = np.full(len(manifest), -1, dtype=int)
    for fold, (_, val_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[val_idx] = fold
    return folds


def _check_k(manifest: pd.DataFrame, k: int) -> None:
    if k < 2:
        raise UserError(f"--k {k}: a k-fold split needs k >= 2")
    per_class = manifest.groupby("label_name")["subject"].nunique()
    if len(per_class) < 2:
        raise UserError(f"only one class ({per_class.index[0]}) in the data: a split needs two or more")
    small = per_class[per_class < k]
    if len(small):
        detail = ", ".join(f"{name}: {n}" for name, n in small.items())
        raise UserError(f"--k {k} is larger than the number of subjects in a class ({detail}); "
                        f"every fold needs each class, so use --k {int(per_class.min())} or fewer")


def default_fold_path(folds_dir: str | Path, data_root: str | Path, k: int, seed: int, by: str) -> Path:
    name = dataset_name(data_root)
    stem = f"{name}_official" if by == "official" else f"{name}_k{k}_s{seed}" + ("_byimage" if by == "image" else "")
    return Path(folds_dir) / f"{stem}.csv"


def make_fold_file(data_root: str | Path, out: str | Path, k: int, seed: int, by: str = "subject",
                   skip_bad: bool = False) -> FoldFile:
    """Scan, check and split the data; write the fold CSV and its JSON sidecar atomically, holding a lock on it so
    that two processes never make one fold file at once. A fold file of other data is never replaced."""
    data_root, out = Path(data_root).resolve(), Path(out)
    check_writable(out.parent, "the fold file's folder")
    with exclusive(out.with_name(f".{out.name}.lock"), f"the fold file {out}"):
        return _make_fold_file(data_root, out, k, seed, by, skip_bad)


def _check_not_other_data(path: Path, data_root: Path, digest: str) -> None:
    """A fold file of other images (two data sets of one folder name) is never replaced: runs trained on it need
    it as it is. The same images, moved or split again, may replace it."""
    sidecar = sidecar_path(path)
    if not (path.is_file() and sidecar.is_file()):
        return
    try:
        meta = read_sidecar(path)
    except UserError:
        return  # a damaged sidecar: nothing to protect
    theirs, made_from = (meta.fingerprint, meta.data_root) if meta is not None else ("", "")
    if theirs and theirs != digest:
        raise UserError(f"{path} holds a split of other images (made from {made_from}, data fingerprint {theirs}; "
                        f"{data_root} has {digest}), and runs trained on it need it as it is. Write this split "
                        "elsewhere (split --out FILE, or folds_dir=DIR when training), or remove that fold file first")


def _make_fold_file(data_root: Path, out: Path, k: int, seed: int, by: str, skip_bad: bool) -> FoldFile:
    manifest = build_manifest(data_root)
    manifest, bad = drop_bad_images(manifest, data_root, skip_bad)
    if len(bad):
        log.warning("left out %d unreadable image(s): %s", len(bad),
                    short_list(f"{r.path} ({r.problem})" for r in bad.itertuples()))
    folds = assign_folds(manifest, k, seed, by)
    digest, sizes = fingerprint(data_root, manifest["path"].tolist())
    _check_not_other_data(out, data_root, digest)
    table = manifest.assign(fold=folds, bytes=sizes)[FOLD_COLUMNS].sort_values("path").reset_index(drop=True)
    if by == "image" and _subjects_crossing(table):
        log.warning("--by image reproduces the report's leaky split: %d subject(s) have images in more than one "
                    "fold, so validation scores are optimistic", _subjects_crossing(table))
    meta = FoldSidecar(dataset=dataset_name(data_root), data_root=str(data_root),
                       layout=str(manifest["source_layout"].iloc[0]), by=by, k=int(table["fold"].max()) + 1, seed=seed,
                       images=len(table), subjects=int(table["subject"].nunique()), fingerprint=digest,
                       skipped=[f"{r.path}: {r.problem}" for r in bad.itertuples()], made_by=f"alldetect {__version__}")
    write_csv(out, table)
    write_text(sidecar_path(out), meta.model_dump_json(indent=2) + "\n")
    return FoldFile(out, table, meta, data_root)


def sidecar_path(fold_file: str | Path) -> Path:
    return Path(fold_file).with_suffix(".json")


def fold_file_root(fold_file: str | Path) -> str:
    """The data root a fold file's sidecar records ('' when there is none to read: load_fold_file says why)."""
    try:
        meta = read_sidecar(Path(fold_file))
    except (UserError, OSError):
        return ""
    return meta.data_root if meta is not None else ""


def _subjects_crossing(table: pd.DataFrame) -> int:
    return int((table.groupby("subject")["fold"].nunique() > 1).sum())


def fold_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per-fold images, subjects (all of them, and per class) and share of `all`, as `alldetect split` prints it."""
    g = table.groupby("fold")
    return pd.DataFrame({
        "images": g.size(),
        "subjects": g["subject"].nunique(),
        "all_subjects": table[table["label"] == 1].groupby("fold")["subject"].nunique(),
        "hem_subjects": table[table["label"] == 0].groupby("fold")["subject"].nunique(),
        "all": g["label"].sum(),
        "share_all": g["label"].mean().round(3),
    }).fillna(0).astype({"all_subjects": int, "hem_subjects": int})


def few_subjects_note(table: pd.DataFrame) -> str | None:
    """A warning when some fold holds a single person of a class: its scores then say how one person's cells
    are classified, and the training folds hold one person fewer of that class."""
    summary = fold_summary(table)
    for name in ("hem", "all"):
        column = summary[f"{name}_subjects"]
        if (column <= 1).any():
            total = int(table[table["label"] == (1 if name == "all" else 0)]["subject"].nunique())
            single = ", ".join(f"fold{f}" for f in column.index[column <= 1])
            return (f"note: {total} '{name}' subjects in all, so {single} hold(s) one '{name}' person: that fold's "
                    f"'{name}' scores are one person's, and its model trains on {total - 1} '{name}' people. Compare "
                    "models on the mean over folds, and weigh the spread")
    return None


def load_fold_file(path: str | Path, data_root: str | Path | None = None, allow_leaky: bool = True) -> FoldFile:
    """Read a fold file and verify it against the data on disk; mismatches are errors that name the files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"fold file {path} does not exist; make one with `alldetect split DATA_ROOT`")
    meta_file = sidecar_path(path)
    sidecar = read_sidecar(path)
    meta = sidecar if sidecar is not None else FoldSidecar()
    try:
        table = pd.read_csv(path, dtype={"subject": str, "path": str})
    except Exception as e:
        raise UserError(f"cannot read fold file {path}: {e}") from None
    missing_cols = set(FOLD_COLUMNS[:4]) - set(table.columns)
    if missing_cols:
        raise UserError(f"fold file {path} lacks column(s) {', '.join(sorted(missing_cols))}; "
                        f"expected {','.join(FOLD_COLUMNS)}")
    _check_fold_numbers(table, path, meta)
    root = Path(data_root or meta.data_root)
    if not data_root and not meta.data_root:
        raise UserError(f"fold file {path} has no sidecar {meta_file.name}: say where its data are (data.root=...)")
    _check_paths_stay_inside(table, path)
    repeated = table["path"][table["path"].duplicated()].tolist()
    if repeated:
        raise UserError(f"fold file {path} lists {len(repeated)} image(s) more than once: {short_list(repeated)}; "
                        "each image belongs to exactly one fold")
    _check_against_disk(table, root.resolve(), path, meta)
    crossing = _subjects_crossing(table)
    if crossing and meta.by != "image":
        raise UserError(f"fold file {path}: {crossing} subject(s) appear in more than one fold. Subjects must not "
                        "cross folds; make the file with `alldetect split` (or --by image for the leaky protocol)")
    if crossing and not allow_leaky:
        raise UserError(f"fold file {path} is a leaky split by image; this step needs a subject-grouped one")
    return FoldFile(path, table, meta, root.resolve())


def _check_fold_numbers(table: pd.DataFrame, path: Path, meta: FoldSidecar) -> None:
    """Folds are 0..k-1, each holding images, k as the sidecar says (a hand-edited number would make a tiny fold)."""
    folds = pd.to_numeric(table["fold"], errors="coerce")
    if folds.isna().any() or (folds % 1 != 0).any() or (folds < 0).any():
        bad = table.loc[folds.isna() | (folds % 1 != 0) | (folds < 0), "path"].tolist()
        raise UserError(f"fold file {path}: the fold of {short_list(bad)} is not a whole number 0 or more")
    present = sorted(set(folds.astype(int)))
    k = int(meta.k or len(present))
    if present != list(range(k)):
        counts = folds.astype(int).value_counts().sort_index()
        detail = ", ".join(f"fold{f}: {n} image(s)" for f, n in counts.items())
        raise UserError(f"fold file {path} should hold folds 0..{k - 1} (k={k}{' in its sidecar' if meta.k else ''}), "
                        f"each with images, but holds {detail}. Was it edited by hand? Make it again with "
                        "`alldetect split`")
    table["fold"] = folds.astype(int)


def _check_paths_stay_inside(table: pd.DataFrame, path: Path) -> None:
    bad = [p for p in table["path"] if p.startswith(("/", "\\")) or ".." in Path(p).parts or ":" in p]
    if bad:
        raise UserError(f"fold file {path} has paths that leave the data folder (absolute or with '..'): "
                        f"{short_list(bad)}; paths must be relative to the data root")


def _check_against_disk(table: pd.DataFrame, root: Path, path: Path, meta: FoldSidecar) -> None:
    if not root.is_dir():
        raise UserError(f"fold file {path} refers to data folder {root}, which does not exist; "
                        "pass data.root=PATH (or set ALLDETECT_DATA) to where the data are now")
    on_disk = build_manifest(root)
    skipped = {s.split(": ", 1)[0] for s in meta.skipped}
    disk = on_disk[~on_disk["path"].isin(skipped)].set_index("path")
    listed = table.set_index("path")
    missing = sorted(set(listed.index) - set(disk.index))
    extra = sorted(set(disk.index) - set(listed.index))
    problems = []
    if missing:
        problems.append(f"{len(missing)} listed image(s) are missing: {short_list(missing)}")
    if extra:
        problems.append(f"{len(extra)} image(s) on disk are not in it: {short_list(extra)}")
    common = listed.index.intersection(disk.index)
    relabelled = [p for p in common if int(listed.at[p, "label"]) != int(disk.at[p, "label"])]
    if relabelled:
        problems.append(f"{len(relabelled)} image(s) changed class: {short_list(relabelled)}")
    # A subject renamed by hand (45 -> 45x) would hide a person in two folds from the crossing check.
    resubjected = [f"{p} (subject {listed.at[p, 'subject']} in the fold file, {disk.at[p, 'subject']} in the data)"
                   for p in common if str(listed.at[p, "subject"]) != str(disk.at[p, "subject"])]
    if resubjected:
        problems.append(f"{len(resubjected)} image(s) have another subject than the data say: {short_list(resubjected)}")
    digest, sizes = fingerprint(root, list(common)) if len(common) else ("", [])
    if "bytes" in listed.columns and len(common):
        recorded = pd.to_numeric(listed["bytes"], errors="coerce")
        bad = recorded.index[recorded.isna() | (recorded % 1 != 0)].tolist()
        if bad:
            raise UserError(f"fold file {path}: the bytes of {short_list(bad)} are not a whole number (the image's "
                            "size when the split was made). Was it edited by hand? Make it again with `alldetect split`")
        changed = [p for p, s in zip(common, sizes) if int(recorded[p]) != s]
        if changed:
            problems.append(f"{len(changed)} image(s) changed on disk since the split: {short_list(changed)}")
    if problems:
        raise UserError(f"fold file {path} does not match the data in {root}: " + "; ".join(problems)
                        + ". Re-make it with `alldetect split` (or point data.root at the data it was made from)")
    recorded_digest = meta.fingerprint
    if recorded_digest and recorded_digest != digest:  # every checkpoint records it: it must be these images'
        raise UserError(f"fold file {path}: its sidecar {sidecar_path(path).name} records data fingerprint "
                        f"{recorded_digest}, but the images the fold file lists (names and sizes) have {digest}. Was "
                        "the sidecar edited or copied from another fold file? Make both again with `alldetect split`")
