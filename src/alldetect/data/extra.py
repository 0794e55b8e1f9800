"""`data.extra=[FOLDER, ...]`: labelled images added to the training images of every run, never validated on, e.g.
C-NMC's preliminary test set with its labels file for a final model (./train.sh ARCH full)."""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd

from alldetect.data.images import drop_bad_images
from alldetect.data.layouts import NUMBERED_RE, build_manifest
from alldetect.errors import UserError, short_list


def extra_rows(folders: list[str], fold_table: pd.DataFrame) -> pd.DataFrame:
    """path (absolute), label, subject of every image under `folders`, checked: labelled, readable, and not one
    of the fold file's images (a C-NMC name seen twice would put validation images into training)."""
    known = frozenset(Path(p).name for p in fold_table["path"] if not NUMBERED_RE.match(Path(p).name))
    return _checked_rows(tuple((f, str(Path(f).resolve())) for f in folders), known).copy()


@functools.lru_cache(maxsize=4)  # `train ARCH all` and a study's trials check the folders once, not per fold
def _checked_rows(folders: tuple[tuple[str, str], ...], known: frozenset[str]) -> pd.DataFrame:
    """folders: (as given, resolved) pairs: the cache keys on where they are, the messages name them as given."""
    parts = []
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
        parts.append(pd.DataFrame({"path": [str(root / p) for p in m["path"]], "label": m["label"].to_numpy(),
                                   "subject": m["subject"].astype(str).to_numpy()}))
    return pd.concat(parts, ignore_index=True)
