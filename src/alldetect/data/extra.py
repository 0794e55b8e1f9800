"""`data.extra=[FOLDER, ...]`: labelled images added to the training images of every run, never validated on, e.g.
C-NMC's preliminary test set with its labels file for a final model (./train.sh ARCH full)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pandas as pd

from alldetect.data.duplicates import ContentIndex
from alldetect.data.images import drop_bad_images
from alldetect.data.layouts import NUMBERED_RE, build_manifest
from alldetect.errors import UserError, short_list


def extra_rows(folders: list[str], fold_table: pd.DataFrame, data_root: str | Path) -> pd.DataFrame:
    """path (absolute), label, subject of every image under `folders`, checked: labelled, readable, each image
    once, and not one of the fold file's images under its own name or another (a copy would put validation images
    into training)."""
    known = frozenset(Path(p).name for p in fold_table["path"] if not NUMBERED_RE.match(Path(p).name))
    listed = tuple((f, str(Path(f).resolve())) for f in folders)
    return _checked_rows(listed, known, str(Path(data_root).resolve()), tuple(fold_table["path"])).copy()


@functools.lru_cache(maxsize=4)  # `train ARCH all` and a study's trials check the folders once, not per fold
def _checked_rows(folders: tuple[tuple[str, str], ...], known: frozenset[str], data_root: str,
                  fold_paths: tuple[str, ...]) -> pd.DataFrame:
    """folders: (as given, resolved) pairs: the cache keys on where they are, the messages name them as given."""
    parts = []
    fold_images = ContentIndex([Path(data_root, p) for p in fold_paths])
    seen: dict[str, str] = {}  # each image (its real path) -> the folder that added it
    for folder, resolved in folders:
        root = Path(resolved)
        if not root.is_dir():
            raise UserError(f"data.extra={folder}: no such folder; name folders of labelled images (class folders "
                            "all/ and hem/, or a C-NMC test folder with its labels file)")
        m = build_manifest(root)
        unlabelled = m.loc[m["label"] < 0, "path"].tolist()
        if unlabelled:
            raise UserError(f"data.extra={folder}: {len(unlabelled)} image(s) have no label ({short_list(unlabelled, 3)}); "
                            "extra training images need labels: class folders (all/, hem/) or a labels file")
        m, _ = drop_bad_images(m, root, skip_bad=False, hint="or move them out of the folder")
        twice = [p for p in m["path"] if Path(p).name in known]
        if twice:
            raise UserError(f"data.extra={folder}: {len(twice)} image(s) have the names of images in the fold file "
                            f"({short_list(twice, 3)}): they would be trained on and validated on. Leave them out")
        copies = fold_images.copies([root / p for p in m["path"]])
        if copies:
            raise UserError(f"data.extra={folder}: {len(copies)} image(s) are byte-identical to images of the fold file "
                            f"under other names ({short_list((f'{a.relative_to(root)} = {b}' for a, b in copies), 3)}): "
                            "they would be trained on and validated on. Leave them out")
        real = [os.path.realpath(root / p) for p in m["path"]]
        again = [(p, seen[r]) for p, r in zip(m["path"], real) if r in seen]
        if again:
            raise UserError(f"data.extra={folder}: {len(again)} of its image(s) were added already by data.extra="
                            f"{again[0][1]} (the same folder, or one inside the other: {short_list([p for p, _ in again], 3)}); "
                            "list each folder once")
        seen.update((r, folder) for r in real)
        parts.append(pd.DataFrame({"path": [str(root / p) for p in m["path"]], "label": m["label"].to_numpy(),
                                   "subject": m["subject"].astype(str).to_numpy()}))
    return pd.concat(parts, ignore_index=True)
