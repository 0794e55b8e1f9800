"""Property-based: random folder trees thrown at the layout detector and the splitter. Whatever comes in,
the result is a manifest and a split that keep the invariants, or a clear UserError; never a traceback."""

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from alldetect.data.folds import assign_folds
from alldetect.data.images import drop_bad_images
from alldetect.data.layouts import build_manifest
from alldetect.errors import UserError

NAME = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"), exclude_characters="/\\:"),
               min_size=1, max_size=10).filter(lambda s: s.strip() not in ("", ".", "..") and not s.startswith("."))
KIND = st.sampled_from(["rgb"] * 24 + ["grey", "rgba", "16bit", "empty", "truncated", "text", "palette"])
EXT = st.sampled_from([".bmp", ".png", ".jpg", ".tif", ".BMP"])


def write_file(path: Path, kind: str, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    fmt = {".bmp": "BMP", ".png": "PNG", ".jpg": "JPEG", ".tif": "TIFF"}[path.suffix.lower()]
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not an image at all")
    elif kind == "grey":
        Image.fromarray(rgb[..., 0]).save(path, format=fmt)
    elif kind == "rgba" and fmt in ("PNG", "TIFF"):
        Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(path, format=fmt)
    elif kind == "16bit" and fmt in ("PNG", "TIFF"):
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 200).save(path, format=fmt)
    elif kind == "palette" and fmt != "JPEG":
        Image.fromarray(rgb).convert("P").save(path, format=fmt)
    else:
        Image.fromarray(rgb).save(path, format=fmt)
        if kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: max(1, len(data) // 2)])


FILE = st.tuples(KIND, st.integers(8, 40), st.integers(0, 2**16))
CLASS_TREE = st.dictionaries(NAME, st.dictionaries(st.tuples(NAME, EXT), FILE, min_size=1, max_size=8),
                             min_size=1, max_size=4)
SUBJECT = st.one_of(st.integers(1, 12).map(str), st.integers(1, 12).map(lambda i: f"H{i}"))
CNMC_FILE = st.tuples(st.integers(0, 2), st.sampled_from(["all", "hem"]), SUBJECT, st.integers(1, 3), FILE,
                      st.sampled_from([True] * 15 + [False]))


def build_tree(root: Path, layout: str, tree) -> None:
    if layout == "classes":
        for cls, files in tree.items():
            for (name, ext), (kind, size, seed) in files.items():
                write_file(root / cls / f"{name}{ext}", kind, size, seed)
    else:
        for i, (fold, cls, subject, image, (kind, size, seed), uid_name) in enumerate(tree):
            # the subject's class follows its name (H = healthy) most of the time, as in C-NMC
            name = f"UID_{subject}_{image}_{i}_{cls}.bmp" if uid_name else f"cell {i}.bmp"
            write_file(root / f"fold_{fold}" / cls / name, kind, size, seed)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=st.sampled_from(["classes", "cnmc"]), classes=CLASS_TREE,
       cnmc=st.lists(CNMC_FILE, min_size=1, max_size=24), k=st.sampled_from([2, 2, 3, 3, 5]),
       by=st.sampled_from(["subject", "image"]),
       skip_bad=st.booleans())
def test_random_trees_give_a_valid_split_or_a_clear_error(layout, classes, cnmc, k, by, skip_bad):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        build_tree(root, layout, classes if layout == "classes" else cnmc)
        try:
            manifest = build_manifest(root)
            kept, bad = drop_bad_images(manifest, root, skip_bad)
            folds = assign_folds(kept, k, seed=0, by=by)
        except UserError as e:
            assert str(e)  # a message, and nothing else escaped
            event(f"clear error: {str(e).split(':')[0][:40]}")
            return
        event(f"split {len(kept)} images, {len(bad)} skipped")
        table = kept.assign(fold=folds)
        # every usable image exactly once, in a fold 0..k-1
        assert sorted(table["path"]) == sorted(set(manifest["path"]) - set(bad["path"]))
        assert table["path"].is_unique and set(table["fold"]) <= set(range(k)) and (table["fold"] >= 0).all()
        if by == "subject":
            assert (table.groupby("subject")["fold"].nunique() == 1).all()
        if by == "image" or table["subject"].is_unique:
            # stratified: each class's count in each fold is within one image of an even share
            counts = pd.crosstab(table["fold"], table["label"]).reindex(range(k), fill_value=0)
            assert ((counts - counts.mean()).abs() < 1 + 1e-9).all().all(), counts
