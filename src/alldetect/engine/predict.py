"""`alldetect predict RUN... --data DIR --name NAME`: run trained models over a folder of images.
`alldetect predict RUN... --oof`: each fold run predicts its own validation images again (name `oof`), e.g. to
keep their features for `ensemble --oof correct=knn`, or to score a TTA mode out of fold.

Each fold run's model is rebuilt from its best.pt alone (architecture, dropout, input size and crop come from the
config inside it) and writes, beside the checkpoint:
  pred_<NAME>.csv   path, prob_all (softmax of `all`, averaged over the TTA views), label and subject where known
  pred_<NAME>.json  the data root, fingerprint and content digest, layout, TTA and checkpoint: what `ensemble`
                    checks; with the SHA-256 of the CSV (and features) it describes (RunDir.write_predictions)
  feat_<NAME>.npz   with features=true: `paths` and `features`, each image's pre-logit features (averaged over
                    the TTA views), which `ensemble ... correct=knn` finds neighbours with
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from alldetect import __version__
from alldetect.data.background import inspect_background
from alldetect.data.dataset import CellDataset, EpochSampler, make_loader
from alldetect.data.duplicates import ContentIndex
from alldetect.data.images import content_digest, drop_bad_images, fingerprint
from alldetect.data.layouts import NUMBERED_RE, build_manifest, find_images
from alldetect.engine.accel import compiled
from alldetect.engine.features import FeatureTap
from alldetect.engine.gpu_augment import rotate
from alldetect.engine.loop import DeviceBatch, predict_probs
from alldetect.engine.rundir.files import PredictionRecord, RunDir, RunMeta
from alldetect.errors import UserError, short_list
from alldetect.metrics import score
from alldetect.options import PREDICT_OPTIONS, TTA_VIEWS

log = logging.getLogger("alldetect")

OOF_NAME = "oof"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Below this many images x TTA views predict stays eager even for a run with compile=true. Measured on an H100
# (bench/h100-2026-11-28.txt): ResNet50 inference at batch 64 ran 11,141 images/s eager (bf16, channels_last) and
# 18,272 with CUDA graphs, 35 microseconds saved an image, against tens of seconds of compiling (55 s for the
# training and inference graphs together): it repays itself only from about half a million images.
COMPILE_MIN_VIEWS = 500_000
NAME_MAX = 200  # characters: pred_<NAME>.json, submissions/<NAME>/ and their temporary files stay within 255 bytes
OPTIONS = PREDICT_OPTIONS  # declared in alldetect.options, where the CLI's help reads them too


@dataclass
class HeldOutData:
    """The images to predict, checked once for every run."""

    root: Path
    manifest: pd.DataFrame
    fingerprint: str  # names and sizes (what fold files record)
    content: str  # names and the SHA-256 of every file (content_digest): what `ensemble` compares

    @property
    def labelled(self) -> bool:
        return bool((self.manifest["label"] >= 0).all())

    @property
    def subjects_known(self) -> bool:
        """Subjects come from C-NMC names or a labels file; otherwise each image is its own 'subject'."""
        m = self.manifest
        return self.labelled and bool((m["subject"] != m["path"]).all())


def tta_views(mode: str, dev: DeviceBatch, reflect: bool = False):
    """Test-time augmentation on the device batch (NCHW, square, normalised by `dev`): None, or a function
    batch -> views. rot8 / rot16: rotations by every 45 / 22.5 degrees (quarter turns exact, the others bilinear
    with black corners, like the cell's background, or with `reflect` the image mirrored at its edges, for
    full-frame images), as Prellberg and Kramer averaged them for C-NMC."""
    if mode == "none":
        return None
    if mode == "flip":
        return lambda x: [x, x.flip(-1)]
    if mode == "d8":  # the 8 symmetries of the square: 4 rotations of the image and of its mirror image
        return lambda x: [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]
    if mode in ("rot8", "rot16"):
        n = int(mode[3:])
        black = -dev.mean / dev.std  # what a black pixel becomes after normalisation

        def views(x: torch.Tensor) -> list[torch.Tensor]:
            return [torch.rot90(x, k * 4 // n, dims=(-2, -1)) if (k * 4) % n == 0
                    else rotate(x, torch.full((len(x),), 2 * math.pi * k / n, device=x.device), fill=black,
                                reflect=reflect)
                    for k in range(n)]
        return views
    raise UserError(f"tta={mode}: choose none, flip, d8, rot8 or rot16")


def check_name(name: str) -> str:
    if not name or not NAME_RE.match(name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (it becomes a file name), "
                        "e.g. --name prelim")
    if len(name) > NAME_MAX:
        raise UserError(f"--name {name[:20]}... is {len(name)} characters long: use at most {NAME_MAX} (it becomes "
                        "part of file names), e.g. --name prelim")
    return name


def load_held_out(data: str | Path) -> HeldOutData:
    """Find the images (any layout the project reads) and check every one up front."""
    root = Path(data).resolve()
    manifest = build_manifest(root)
    manifest, _ = drop_bad_images(manifest, root, skip_bad=False, hint=(
        "or move them out of the folder: every image of a held-out set gets a prediction, so predict has no "
        "--skip-bad"))
    paths = manifest["path"].tolist()
    return HeldOutData(root, manifest, fingerprint(root, paths)[0], content_digest(root, paths))


def predict_run(run: Path, data: HeldOutData, name: str, opts: dict, device: torch.device) -> dict:
    """Predict every image with one fold run; write pred_<name>.csv and .json; return a summary row."""
    files = RunDir(run)
    state = files.load_best()
    model, meta = state.network(), state.meta
    size, crop = meta.input_size, meta.crop
    dev = DeviceBatch(device, meta.config.channels_last, amp=meta.config.amp)
    model = model.to(device)
    if dev.channels_last:
        model = model.to(memory_format=torch.channels_last)
    m = data.manifest
    dataset = CellDataset(data.root, m["path"], m["label"], crop, size)
    start = time.perf_counter()
    tap = FeatureTap(model) if opts["features"] else None
    reflect = opts["tta"] in ("rot8", "rot16") and _full_frame(data, crop, run)
    static = _compiles(meta.config, device, len(m) * TTA_VIEWS[opts["tta"]], tap is not None)
    forward = compiled(model, meta.config.compile_mode, device) if static else model
    dev.graphs = static and meta.config.compile_mode == "reduce-overhead"
    with make_loader(dataset, opts["batch_size"], EpochSampler(len(dataset), 0, shuffle=False),
                     opts["num_workers"], device.type == "cuda") as loader, tap or nullcontext():
        probs, _ = predict_probs(forward, loader, dev, desc=f"{run} (tta={opts['tta']})",
                                 views=tta_views(opts["tta"], dev, reflect), static=static)
    seconds = time.perf_counter() - start
    broken = ~np.isfinite(probs).all(axis=1)
    if broken.any():  # finite weights (checked when loading) that still overflow: never write them
        raise UserError(f"{run}'s model gave no probability (NaN or infinite) for {int(broken.sum())} image(s) of "
                        f"{data.root} ({short_list(m['path'][broken], 3)}): its best.pt's weights overflow on these "
                        "images; nothing was written for it. Retrain the run (overwrite=true)")
    features = (m["path"].to_numpy(str), tap.features(TTA_VIEWS[opts["tta"]])) if tap is not None else None
    frame = pd.DataFrame({"path": m["path"], "prob_all": probs[:, 1].round(6)})
    if data.labelled:
        frame["label"] = m["label"].to_numpy()
    if data.subjects_known:
        frame["subject"] = m["subject"].to_numpy()
    about = PredictionRecord(name=name, run=str(run), arch=meta.config.arch, epoch=meta.progress.epoch,
                             data_root=str(data.root), data_fingerprint=data.fingerprint, data_content=data.content,
                             layout=str(m["source_layout"].iloc[0]), images=len(m), labelled=data.labelled,
                             checkpoint_saved_at=meta.saved_at, tta=opts["tta"], features=opts["features"],
                             input_size=size, crop=crop, made_by=f"alldetect {__version__}")
    files.write_predictions(name, frame, about, features)  # a checked pair: see RunDir.write_predictions
    if name != OOF_NAME:
        _warn_if_trained_on(run, meta, data)
    row = {"run": str(run), "images": len(m), "tta": opts["tta"], "seconds": round(seconds, 1),
           "images_per_s": round(len(m) / max(seconds, 1e-9), 1)}
    if data.labelled:
        s = score(m["label"], probs[:, 1])
        row.update({k: round(s[k], 4) for k in ("f1", "accuracy", "roc_auc")})
    return row


def _full_frame(data: HeldOutData, crop: int, run: Path) -> bool:
    """Whether the images being predicted are full-frame (not cells on black), so that tta=rot8/rot16 fills the
    corners its rotations uncover with a reflection of the image rather than black: the same test of sampled
    corners that training's aug.border=auto makes (data/background.py), said in the log."""
    background = inspect_background(data.root, data.manifest["path"].tolist(), crop)
    log.info("%s: tta rotations fill the corners they uncover with %s: %s", run, background.fill,
             background.describe())
    return background.border == "reflect"


def _compiles(cfg, device: torch.device, views: int, features: bool) -> bool:
    """Whether predict compiles the network: where the run's config compiles it (compile=true, on CUDA), and
    only for sets large enough to repay the compilation (COMPILE_MIN_VIEWS images x TTA views); never with
    features=true (the feature tap's hooks would break the compiled graph)."""
    return bool(cfg.compile) and device.type == "cuda" and not features and views >= COMPILE_MIN_VIEWS


def _warn_if_trained_on(run: Path, meta: RunMeta, data: HeldOutData) -> None:
    """Predictions on images the run was trained or validated on are not held-out; say so."""
    if meta.fold_fingerprint and meta.fold_fingerprint == data.fingerprint:
        log.warning("%s was trained on these very images (same data fingerprint %s): its scores on them are not "
                    "held-out scores", run, data.fingerprint)
        return
    fold_file = Path(meta.fold_file)
    if not (meta.fold_file and fold_file.is_file()):
        return
    seen = set(pd.read_csv(fold_file, usecols=["path"])["path"].map(lambda p: Path(p).name))
    overlap = [p for p in data.manifest["path"] if Path(p).name in seen and not NUMBERED_RE.match(Path(p).name)]
    if overlap:
        log.warning("%d image(s) of %s have the names of images in %s's fold file (%s): they are probably "
                    "not held-out", len(overlap), data.root, run, short_list(overlap, 3))
    root = Path(meta.data_root() or "").resolve()
    if meta.data_root() and root.is_dir():  # renamed copies: the same bytes under another name
        named = set(overlap)
        index = _trained_images(str(fold_file.resolve()), fold_file.stat().st_mtime_ns, str(root),
                                tuple(str(Path(f).resolve()) for f in meta.config.data.extra))
        copies = index.copies([data.root / p for p in data.manifest["path"] if p not in named])
        if copies:
            log.warning("%d image(s) of %s are byte-identical to images %s was trained or validated on (%s): their "
                        "scores are not held-out scores", len(copies), data.root, run,
                        short_list((f"{a.relative_to(data.root)} = {b}" for a, b in copies), 3))


@functools.lru_cache(maxsize=2)  # the folds of one architecture share their fold file: its images are hashed once
def _trained_images(fold_file: str, modified: int, root: str, extra: tuple[str, ...]) -> ContentIndex:
    """The images of a run's fold file and of its data.extra folders (those still there)."""
    paths = [Path(root, p) for p in pd.read_csv(fold_file, usecols=["path"])["path"]]
    paths += [Path(folder, p) for folder in extra if Path(folder).is_dir() for p in find_images(Path(folder))]
    return ContentIndex(paths)


def own_validation_images(run: Path, meta: RunMeta, data: str | None) -> HeldOutData:
    """The images a fold run was validated on (its oof.csv), where they are now: `data`, else the run's data
    root (its config, else its fold file's sidecar)."""
    oof = RunDir(run).read_oof()
    root = Path(data or meta.data_root())
    missing = [p for p in oof["path"] if not (root / p).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {run}'s validation images are not under {root} ({short_list(missing, 3)}): "
                        "say where the data set is now with --data DIR")
    manifest = oof[["path", "label"] + (["subject"] if "subject" in oof else [])].assign(
        source_layout=f"validation images of {run.name}")
    if "subject" not in manifest:
        manifest["subject"] = manifest["path"]
    paths = manifest["path"].tolist()
    return HeldOutData(root.resolve(), manifest.reset_index(drop=True), fingerprint(root, paths)[0],
                       content_digest(root, paths))
