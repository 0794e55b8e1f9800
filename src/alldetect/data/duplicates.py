"""Byte-identical images under different classes or people: a label contradiction, or the same cell on both sides
of a split; and images byte-identical to a known set under other names (data.extra's copies of the fold file's
images, predict's copies of a run's training images). Found by hashing a 64 KiB slice from the middle of each file
(where the cell is, not the black border every C-NMC image shares), then the whole of the files whose slices
agree."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from alldetect.atomic import file_sha256
from alldetect.errors import short_list

SLICE = 1 << 16


def _slice_digest(path: Path) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size // 2 - SLICE // 2))
        return f"{size}:{hashlib.sha1(f.read(SLICE)).hexdigest()}"


def _full_digest(path: Path) -> str:
    return file_sha256(path)  # hashlib.file_digest would need Python 3.11; alldetect supports 3.10


class ContentIndex:
    """Finds files byte-identical to `known` files under any name: sizes first, then the slice, then the whole file.
    Digests of the known files are made only for sizes asked about, and kept for later questions."""

    def __init__(self, known: list[Path], workers: int = 8):
        self.by_size: dict[int, list[Path]] = {}
        for path in known:
            try:
                self.by_size.setdefault(Path(path).stat().st_size, []).append(Path(path))
            except OSError:
                continue  # a known file that is gone cannot be a copy's original
        self.workers = workers
        self._slices: dict[Path, str] = {}
        self._full: dict[Path, str] = {}

    def _digests(self, cache: dict[Path, str], paths: list[Path], digest) -> list[str]:
        todo = [p for p in dict.fromkeys(paths) if p not in cache]
        with ThreadPoolExecutor(self.workers) as pool:
            cache.update(zip(todo, pool.map(digest, todo)))
        return [cache[p] for p in paths]

    def copies(self, paths: list[Path]) -> list[tuple[Path, Path]]:
        """(path, a known file it is byte-identical to) for each of `paths` that is a copy of one."""
        sizes: dict[Path, int] = {}
        for path in map(Path, paths):
            try:
                sizes[path] = path.stat().st_size
            except OSError:
                continue
        sized = [p for p, size in sizes.items() if size in self.by_size]
        if not sized:
            return []
        known = [k for size in {sizes[p] for p in sized} for k in self.by_size[size]]
        known_slices: dict[str, list[Path]] = {}
        for k, d in zip(known, self._digests(self._slices, known, _slice_digest)):
            known_slices.setdefault(d, []).append(k)
        queried = dict(zip(sized, self._digests({}, sized, _slice_digest)))
        suspects = [p for p in sized if queried[p] in known_slices]
        originals = [k for p in suspects for k in known_slices[queried[p]]]
        self._digests(self._full, originals, _full_digest)
        out = []
        for p, d in zip(suspects, self._digests({}, suspects, _full_digest)):
            same = next((k for k in known_slices[queried[p]] if self._full[k] == d), None)
            if same is not None:
                out.append((p, same))
        return out


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
