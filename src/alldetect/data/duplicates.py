"""Byte-identical images under different classes or people: a label contradiction, or the same cell on both sides
of a split. Found by hashing a 64 KiB slice from the middle of each file (where the cell is, not the black border
every C-NMC image shares), then the whole of the files whose slices agree."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from alldetect.errors import short_list

SLICE = 1 << 16


def _slice_digest(path: Path) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size // 2 - SLICE // 2))
        return f"{size}:{hashlib.sha1(f.read(SLICE)).hexdigest()}"


def _full_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def identical_groups(root: Path, manifest: pd.DataFrame, workers: int = 8) -> list[pd.DataFrame]:
    """Groups (rows of `manifest`) of byte-identical images that differ in label or subject."""
    root = Path(root)
    paths = manifest["path"].tolist()
    with ThreadPoolExecutor(workers) as pool:
        quick = pd.Series(list(pool.map(lambda p: _slice_digest(root / p), paths)), index=manifest.index)
        suspects = manifest[quick.duplicated(keep=False)]
        full = pd.Series(list(pool.map(lambda p: _full_digest(root / p), suspects["path"])), index=suspects.index)
    groups = []
    for _, group in suspects.groupby(full):
        if len(group) > 1 and (group["label"].nunique() > 1 or group["subject"].nunique() > 1):
            groups.append(group)
    return groups


def duplicates_note(groups: list[pd.DataFrame]) -> str | None:
    """What `index` and `split` say about identical images, or None."""
    if not groups:
        return None
    classes = [g for g in groups if g["label"].nunique() > 1]
    people = [g for g in groups if g["label"].nunique() == 1]
    parts = []
    if classes:
        parts.append(f"{len(classes)} image(s) appear, byte for byte, under both classes: "
                     + short_list(" = ".join(g["path"]) for g in classes) + ". Their labels contradict each other: "
                     "remove the wrong copies")
    if people:
        parts.append(f"{len(people)} image(s) appear, byte for byte, under two or more people: "
                     + short_list(" = ".join(g["path"]) for g in people) + ". A subject-grouped split may put "
                     "the copies in different folds, so a model is validated on images it trained on")
    return "warning: " + "; ".join(parts)
