"""`alldetect index` and `alldetect split`: what is in a data folder, and how it splits into folds."""

from __future__ import annotations

import logging
from pathlib import Path

from alldetect.data.background import inspect_background
from alldetect.data.duplicates import duplicates_note, identical_groups
from alldetect.data.folds import default_fold_path, few_subjects_note, fold_summary, make_fold_file
from alldetect.data.images import converted_note, inspect_images
from alldetect.data.layouts import build_manifest

log = logging.getLogger("alldetect")


def index_command(root: str) -> str:
    """Layout, images and subjects per class (and per official fold), image sizes and unreadable files."""
    manifest = build_manifest(root)
    info = inspect_images(Path(root), manifest["path"].tolist())
    frame = manifest.merge(info, on="path")
    lines = [f"data folder: {Path(root).resolve()}",
             f"layout:      {frame['source_layout'].iloc[0]}",
             f"images:      {len(frame)}    subjects: {frame['subject'].nunique()}", ""]
    per_class = frame.groupby("label_name").agg(label=("label", "first"), images=("path", "size"),
                                                subjects=("subject", "nunique"))
    lines += ["per class:", per_class.to_string(), ""]
    if (frame["official_fold"] >= 0).any():
        per_fold = frame.pivot_table(index="official_fold", columns="label_name", values="path", aggfunc="size")
        lines += ["per official fold (images):", per_fold.to_string(), ""]
    good = frame[frame["problem"] == ""]
    sizes = (good["width"].astype(str) + "x" + good["height"].astype(str)).value_counts()
    lines += ["image sizes:", sizes.rename("images").to_string(), ""]
    if len(good):
        background = inspect_background(root, good["path"].tolist())
        lines += [f"background: {background.describe()}; with aug.border=auto, training rotations fill the "
                  f"corners with {background.fill}", ""]
    bad = frame[frame["problem"] != ""]
    if len(bad):
        lines += [f"{len(bad)} unusable image(s) (leave them out with --skip-bad):"]
        lines += [f"  {r.path}: {r.problem}" for r in bad.itertuples()]
    duplicates = duplicates_note(identical_groups(Path(root), manifest[manifest["path"].isin(good["path"])]))
    if duplicates:
        lines += [duplicates]
    converted = converted_note(frame)
    if converted:
        lines += [converted]
    if not len(bad):
        lines += ["every image is readable" + (" (24-bit RGB, or converted as listed)" if converted else " 24-bit RGB")]
    return "\n".join(lines)


def split_command(root: str, k: int, seed: int, by: str, out: str | None, folds_dir: str, skip_bad: bool) -> str:
    path = Path(out) if out else default_fold_path(folds_dir, root, k, seed, by)
    folds = make_fold_file(root, path, k, seed, by, skip_bad)
    crossing = (folds.table.groupby("subject")["fold"].nunique() > 1).sum()
    lines = [f"wrote {path} and {path.with_suffix('.json').name} ({folds.meta.layout}, split by {by}, "
             f"fingerprint {folds.meta.fingerprint})", "", fold_summary(folds.table).to_string(), ""]
    if by == "image":
        lines.append(f"warning: leaky split by image: {crossing} subject(s) have images in more than one fold")
    else:
        lines.append("no subject appears in more than one fold")
    for note in (few_subjects_note(folds.table), duplicates_note(identical_groups(folds.data_root, folds.table))):
        if note:
            lines.append(note)
    return "\n".join(lines)
