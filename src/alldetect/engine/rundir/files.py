"""Every file a run folder holds, and the one way each is written and read.

runs/<arch>/fold<k>/      a fold run (runs/<arch>/full: one final model trained on every image)
  config.yaml             the run's settings, written when training starts
  best.pt                 the kept weights and the run's metadata (RunMeta): what every later command reads
  last.pt                 the latest epoch: weights, optimiser, moving average, loss scaler and RunMeta (with a
                          half-done epoch after a stop): what resume=true continues
  history.csv             one row per epoch: losses, the validation fold's scores (inner_* with select=inner),
                          selected, lr, seconds, images/s, data wait
  oof.csv                 the kept model's predictions of its validation fold (OOF_COLUMNS)
  inner.csv               select=inner: predictions of the inner split the epoch was chosen on (OOF_COLUMNS)
  pred_<NAME>.csv         `predict`: each image's probability of `all` (PRED_COLUMNS; label and subject where known)
  pred_<NAME>.json        `predict`: which data, layout, TTA and checkpoint the predictions are of
  feat_<NAME>.npz         `predict features=true`: each image's classifier input (paths, features)
  wandb/                  the W&B run's files

Checkpoints are written atomically and read with `weights_only=True`, so that a file can never run code. Their
metadata is versioned (SCHEMA_VERSION): checkpoints of older versions are read and upgraded here; a newer one is
refused with a clear message. Every read checks the file first (once per file and process): the CRC-32 of each
record of the zip archive torch.save writes (a damaged block of the disk or a partly overwritten file), and that
the weights are finite (a NaN or infinite weight would give NaN probabilities everywhere downstream).

A prediction is a pair, written by `write_predictions` and read by `read_predictions` / `read_pred_meta`: the old
pred_<NAME>.json is removed before anything else is written, and the new one records the SHA-256 of the CSV (and
of feat_<NAME>.npz) it describes, so that a reader can tell the files belong together and refuses them otherwise
(a predict killed half-way never lets new probabilities pass for the old data).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from alldetect.atomic import atomic_path, file_sha256, write_csv, write_text
from alldetect.config import Config, validate
from alldetect.data.folds import fold_file_root
from alldetect.errors import UserError, short_list
from alldetect.models import model_from_config
from alldetect.records import parse_record

SCHEMA_VERSION = 2  # 0: before select= (cannot be resumed); 1: one flat dict; 2: {"meta": RunMeta, tensors...}
OOF_COLUMNS = ("path", "subject", "label", "prob_all", "pred", "fold")
PRED_COLUMNS = ("path", "prob_all")  # + label, subject where the images' layout says them
PRED_VERSION = 1  # of pred_<NAME>.json; files from before versions were recorded read as 1


class PredictionRecord(BaseModel):
    """pred_<NAME>.json: which images (root, names and sizes, content digest), layout, TTA and checkpoint the
    pred_<NAME>.csv beside it is of, and the SHA-256 of that CSV (and of feat_<NAME>.npz). Unknown keys, wrong
    types and a newer version are refused by `RunDir.read_pred_meta`, never read as defaults."""

    model_config = ConfigDict(extra="forbid")

    version: int = PRED_VERSION
    name: str
    run: str
    data_root: str
    data_fingerprint: str  # names and sizes, as fold files record
    data_content: str | None = None  # names and every file's SHA-256; older files lack it (ensemble refuses them)
    layout: str
    tta: str = "none"
    images: int | None = None
    labelled: bool | None = None
    arch: str | None = None
    epoch: int | None = None
    checkpoint_saved_at: float | None = None  # names the best.pt that predicted (RunMeta.saved_at)
    features: bool = False
    input_size: int | None = None
    crop: int | None = None
    made_by: str | None = None
    csv_sha256: str | None = None  # set by write_predictions; a record without it describes no file
    features_sha256: str | None = None
TENSORS = ("model", "optimizer", "ema", "scaler")
PREDICTION_FILE_RE = re.compile(r"^(pred_.+\.(csv|json)|feat_.+\.npz)$")
TEMPORARY_RE = re.compile(r"^\.(.+)\.[a-z0-9_]{8}\.tmp$")  # what atomic_path's mkstemp names


class Progress(BaseModel):
    """The training loop's state: the last finished epoch, the best selection score so far and its epoch,
    epochs since it improved, and the W&B run."""

    model_config = ConfigDict(validate_assignment=True)
    epoch: int = -1
    best: float | None = None
    best_epoch: int = -1
    stale: int = 0
    wandb_id: str | None = None


class PartialEpoch(BaseModel):
    """last.pt of a run stopped inside an epoch: the epoch, the training steps it finished and their sums, so that
    a resume continues the epoch where it stopped (engine/loop.train_one_epoch's `carry`)."""

    model_config = ConfigDict(extra="forbid")
    epoch: int
    steps: int
    loss_sum: float
    images: int
    seconds: float
    wait: float

    def carry(self) -> dict[str, Any]:
        return self.model_dump(exclude={"epoch"})


class RunMeta(BaseModel):
    """What a checkpoint says besides its tensors: how the run was trained, on which split, how far it got."""

    model_config = ConfigDict(extra="ignore")
    version: int = SCHEMA_VERSION  # the schema the file was written with (older ones are upgraded on reading)
    config: Config
    run: str = ""  # fold<k>, or full
    progress: Progress = Progress()
    metrics: dict[str, Any] | None = None  # the validation fold's scores at this epoch (None: full)
    fold_file: str = ""
    fold_fingerprint: str = ""  # of the data set the fold file lists
    fold_k: int | None = None
    fold_assignment: str = ""  # digest of which image is in which fold
    leaky_split: bool | None = None  # None: not recorded (older checkpoints)
    world: int | None = None  # processes that trained it (None: not recorded, older checkpoints)
    updates_per_epoch: int | None = None
    train_images: int = 0
    partial: PartialEpoch | None = None  # last.pt of a run stopped inside an epoch
    # history.csv's rows up to this checkpoint: a resume rebuilds history.csv from them, so a kill between writing
    # last.pt and history.csv loses no row (None: older checkpoints, whose resume reads history.csv)
    history: list[dict[str, Any]] | None = None
    saved_at: float = Field(default_factory=time.time)  # when the checkpoint was made: predictions name it

    @property
    def input_size(self) -> int:
        return self.config.resolved_input_size

    @property
    def crop(self) -> int:
        return self.config.data.crop

    @property
    def k(self) -> int:
        """Folds of the run's fold file (version 1 checkpoints without fold_k: the config's data.k)."""
        return self.fold_k or self.config.data.k

    def data_root(self) -> str:
        """Where the run's images were: its config's data.root, else its fold file's sidecar ('' if neither)."""
        return self.config.data.root or fold_file_root(self.fold_file)


@dataclass
class Checkpoint:
    """A checkpoint: its metadata and its tensors (optimizer, ema, scaler only in last.pt)."""

    meta: RunMeta
    model: dict
    optimizer: dict | None = None
    ema: dict | None = None
    scaler: dict | None = None
    path: Path | None = field(default=None, compare=False)  # where it was read from

    def network(self) -> nn.Module:
        """The network its config describes with its weights (without pretrained weights: nothing to fetch)."""
        model = model_from_config(self.meta.config)
        try:
            model.load_state_dict(self.model)
        except RuntimeError as e:
            raise UserError(f"{self.path}: its weights do not fit a {self.meta.config.arch} at input size "
                            f"{self.meta.input_size} ({str(e).splitlines()[0][:200]})") from None
        return model


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    # python mode, not json: JSON mode would turn a NaN score (ROC-AUC of a one-class fold) into None
    state = {"meta": ckpt.meta.model_dump(), **{k: getattr(ckpt, k) for k in TENSORS}}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location="cpu", mmap: bool = False) -> Checkpoint:
    """mmap=True maps the weights instead of reading them: cheap when only the metadata are needed (the file's
    checksums and weights are still checked, once per file and process)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train the run first (./train.sh ARCH FOLD)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is truncated or foreign
        raise UserError(f"cannot read checkpoint {path}: damaged or not a checkpoint (not a PyTorch archive)")
    identity = _identity(path)
    if identity not in _VERIFIED:
        _check_archive(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"refused to load {path}: it holds objects other than tensors and plain values, which could run code "
            f"when loaded ({str(e).splitlines()[0][:200]}). Only load checkpoints written by alldetect"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"cannot read checkpoint {path} (damaged or not a checkpoint): {str(e)[:200]}") from None
    if not isinstance(state, dict) or "model" not in state or not ("meta" in state or "config" in state):
        raise UserError(f"{path} is not an alldetect checkpoint (no model weights and metadata inside)")
    if not isinstance(state["model"], dict):
        raise UserError(f"{path} is not an alldetect checkpoint (its weights are not a state dict)")
    ckpt = Checkpoint(_read_meta(state, path), state["model"], state.get("optimizer"), state.get("ema"),
                      state.get("scaler"), path=path)
    if identity not in _VERIFIED:
        _check_finite(ckpt, path)
        _VERIFIED.add(identity)
    return ckpt


# Checkpoints whose archive and weights were checked by this process: (device, inode, size, mtime, ctime). A file
# rewritten in place gets another mtime; an atomic rewrite another inode.
_VERIFIED: set[tuple[int, ...]] = set()
_DAMAGED = "retrain the run (overwrite=true) or restore the file from a backup"


def _identity(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _check_archive(path: Path) -> None:
    """The CRC-32 of every record of the zip archive: torch.load itself reads a record without checking it, so a
    block of zeros in the middle of the weights would load as weights (about 0.1 s per 250 MB)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise UserError(f"cannot read checkpoint {path}: damaged ({str(e)[:200]}); {_DAMAGED}") from None
    if bad is not None:
        raise UserError(f"checkpoint {path} is damaged: the checksum of its record {bad} does not match its "
                        f"contents (a corrupted or partly overwritten file); {_DAMAGED}")


def _check_finite(ckpt: Checkpoint, path: Path) -> None:
    """Refuse NaN or infinite weights (of the model, and of the moving average in last.pt): the network would
    answer NaN for every image."""
    for part, weights in (("model", ckpt.model), ("ema", ckpt.ema)):
        for key, value in (weights.items() if isinstance(weights, dict) else ()):
            if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel()):
                continue
            # fast (0.05 s per 250 MB): a NaN or infinity anywhere makes the sum one; a sum that overflows is
            # checked value by value
            total = float(value.sum(dtype=torch.float32) if value.element_size() < 4 else value.sum())
            if math.isfinite(total) or bool(torch.isfinite(value).all()):
                continue
            bad = int((~torch.isfinite(value)).sum())
            where = f"{key}" if part == "model" else f"{key} of the moving average"
            raise UserError(f"checkpoint {path} holds non-finite weights: {bad} of the {value.numel()} values of "
                            f"{where} are NaN or infinite, so the network would answer NaN for every image. The run "
                            f"diverged or the file is damaged; {_DAMAGED}")


def _read_meta(state: dict, path: Path) -> RunMeta:
    raw = state["meta"] if "meta" in state else _upgrade_flat(state)
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not an alldetect checkpoint (its metadata are a {type(raw).__name__}, not a "
                        "dictionary of settings)")
    version = raw.get("version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise UserError(f"{path} was written by a newer alldetect (checkpoint schema {version}; this version reads "
                        f"up to {SCHEMA_VERSION}): upgrade alldetect to use it")
    if not isinstance(raw.get("config"), dict):
        raise UserError(f"{path} is not an alldetect checkpoint (its metadata hold no config)")
    config = validate(raw["config"], f"the config saved in {path}")
    try:
        return RunMeta.model_validate({**raw, "config": config})
    except ValidationError as e:
        raise UserError(f"{path}: damaged checkpoint metadata ({str(e).splitlines()[0][:200]})") from None


def _upgrade_flat(state: dict) -> dict:
    """Versions 0 and 1 kept the metadata beside the tensors in one dict, the loop's state at top level."""
    meta = {k: v for k, v in state.items() if k not in TENSORS and k not in Progress.model_fields}
    meta["progress"] = {k: state[k] for k in Progress.model_fields if state.get(k) is not None}
    meta.setdefault("saved_at", 0.0)  # stable across reads: predictions name the checkpoint by it
    config = state.get("config")
    meta["version"] = 1 if isinstance(config, dict) and "select" in config else 0
    if meta["version"] == 0 and isinstance(config, dict):  # they kept the epoch that scored best on the fold
        meta["config"] = {**config, "select": "outer"}
    return meta


class RunDir:
    """One run folder: the path of every file it holds, and their readers (see the module's docstring)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:  # Path(run_dir), open(...) take it
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    best = property(lambda self: self.path / "best.pt")
    last = property(lambda self: self.path / "last.pt")
    config = property(lambda self: self.path / "config.yaml")
    history = property(lambda self: self.path / "history.csv")
    oof = property(lambda self: self.path / "oof.csv")
    inner = property(lambda self: self.path / "inner.csv")
    wandb = property(lambda self: self.path / "wandb")

    def pred(self, name: str) -> Path:
        return self.path / f"pred_{name}.csv"

    def pred_meta(self, name: str) -> Path:
        return self.path / f"pred_{name}.json"

    def feat(self, name: str) -> Path:
        return self.path / f"feat_{name}.npz"

    @property
    def trained(self) -> bool:
        return self.best.is_file()

    def _result_files(self) -> tuple[Path, ...]:
        return self.best, self.last, self.history, self.oof, self.inner

    def results(self) -> list[str]:
        """The files that make the folder a run (what a plain rerun must never replace), with pred_*."""
        if not self.path.is_dir():
            return []
        named = {p.name for p in self._result_files()} | {p.name for p in self.prediction_files()}
        return [p.name for p in sorted(self.path.iterdir()) if p.name in named]

    def remove_results(self) -> None:
        """overwrite=true: the run's files and config.yaml, its predictions and features (of the model being
        replaced) and W&B files; nothing else in the folder."""
        for p in (*self._result_files(), self.config, *self.prediction_files()):
            p.unlink(missing_ok=True)
        shutil.rmtree(self.wandb, ignore_errors=True)

    def prediction_files(self) -> list[Path]:
        """What `predict` wrote here: pred_<NAME>.csv and .json, feat_<NAME>.npz."""
        return sorted(p for p in self.path.glob("*_*.*") if PREDICTION_FILE_RE.match(p.name))

    def stale_temporary_files(self) -> list[Path]:
        """Temporary files of this run's own files (.<file>.XXXXXXXX.tmp, see alldetect.atomic) that a process
        killed while writing left behind; a user's other hidden files are not among them."""
        own = {p.name for p in (*self._result_files(), self.config)}
        return [p for p in self.path.glob(".*.tmp")
                if (m := TEMPORARY_RE.match(p.name)) and (m.group(1) in own or PREDICTION_FILE_RE.match(m.group(1)))]

    def load_best(self, mmap: bool = False) -> Checkpoint:
        return load_checkpoint(self.best, mmap=mmap)

    def meta(self) -> RunMeta:
        """best.pt's metadata, read without loading its weights into memory."""
        return load_checkpoint(self.best, mmap=True).meta

    def read_oof(self) -> pd.DataFrame:
        if not self.oof.is_file():
            why = ("it was trained on every image (a final model), so it has none" if self.name == "full"
                   else "retrain it with this version of alldetect")
            raise UserError(f"{self.path} has no oof.csv, the out-of-fold predictions of its validation images: {why}")
        return read_checked_csv(self.oof, {"path", "label", "prob_all", "fold"}, "out-of-fold predictions")

    def write_predictions(self, name: str, frame: pd.DataFrame, record: PredictionRecord,
                          features: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """pred_<name>.csv and pred_<name>.json as a pair, and feat_<name>.npz (paths, features) with `features`
        (else an older one is removed: it may be of other images). The old JSON goes first, so that a write killed
        half-way leaves predictions without a record (refused by every reader), never new predictions beside an
        old record; the new record holds the SHA-256 of each file it describes."""
        self.pred_meta(name).unlink(missing_ok=True)
        digests: dict[str, Any] = {"version": PRED_VERSION, "features_sha256": None}
        if features is not None:
            paths, values = features
            with atomic_path(self.feat(name)) as tmp, open(tmp, "wb") as f:
                np.savez(f, paths=paths, features=values)
            digests["features_sha256"] = file_sha256(self.feat(name))
        else:
            self.feat(name).unlink(missing_ok=True)
        write_csv(self.pred(name), frame)
        digests["csv_sha256"] = file_sha256(self.pred(name))
        record = record.model_copy(update=digests)
        write_text(self.pred_meta(name), json.dumps(record.model_dump(mode="json"), indent=2) + "\n")

    def read_predictions(self, name: str) -> pd.DataFrame:
        """pred_<name>.csv, after checking that it is the file its pred_<name>.json describes."""
        self.read_pred_meta(name)
        return read_checked_csv(self.pred(name), set(PRED_COLUMNS), "prediction CSV")

    def read_pred_meta(self, name: str) -> PredictionRecord:
        """pred_<name>.json: which data, layout, TTA and checkpoint the predictions are of, checked to describe the
        pred_<name>.csv beside it."""
        path, csv = self.pred_meta(name), self.pred(name)
        rerun = f"rerun `{predict_command_for(self.path, name)}`"
        if not path.is_file():
            raise UserError(f"{path} is missing (it records which data the predictions are of, and a predict "
                            f"stopped half-way leaves none); {rerun}")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}); {rerun}") from None
        if isinstance(record, dict) and not isinstance(record.get("csv_sha256"), str):
            raise UserError(f"{path} does not record the digest of {csv.name} (written by an older alldetect, or by "
                            f"hand), so it cannot be told to describe that file; {rerun}")
        parsed = parse_record(record, path, PredictionRecord, PRED_VERSION, "a record `alldetect predict` writes",
                              rerun)
        if csv.is_file() and file_sha256(csv) != parsed.csv_sha256:
            raise UserError(f"{csv} is not the file {path.name} describes (its SHA-256 differs: a predict was "
                            f"stopped half-way, or one of the two was replaced or edited); {rerun}")
        return parsed

    def read_features(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """feat_<name>.npz: (paths, features: images x features), checked to be the file pred_<name>.json
        describes, of one row per path, and finite."""
        path = self.feat(name)
        rerun = f"rerun `{predict_command_for(self.path, name, features=True)}`"
        if not path.is_file():
            raise UserError(f"correct=knn needs each run's features, and {path} is missing: run "
                            f"`{predict_command_for(self.path, name, features=True)}` first")
        record = self.read_pred_meta(name)
        if record.features_sha256 != file_sha256(path):
            raise UserError(f"{path} is not the file {self.pred_meta(name).name} describes (made by another predict, "
                            f"or replaced since); {rerun}")
        try:
            with np.load(path) as z:
                paths, features = z["paths"].astype(str), z["features"]
        except Exception as e:  # a truncated or foreign file
            raise UserError(f"cannot read {path} ({type(e).__name__}: {str(e)[:120]}); {rerun}") from None
        if features.ndim != 2 or len(paths) != len(features):
            raise UserError(f"{path} holds {len(paths)} paths but features of shape {features.shape}; {rerun}")
        if not np.issubdtype(features.dtype, np.number):
            raise UserError(f"{path} holds features of type {features.dtype}, not numbers; {rerun}")
        bad = ~np.isfinite(features).all(axis=1)
        if bad.any():
            raise UserError(f"{path}: the features of {int(bad.sum())} image(s) are NaN or infinite "
                            f"({short_list(paths[bad], 3)}), so no neighbours can be found for them; {rerun}")
        return paths, features

    def read_history(self) -> pd.DataFrame:
        return read_checked_csv(self.history, {"epoch", "train_loss"}, "training history")

    def write_scored(self, inner: bool, rows: pd.DataFrame, probs, fold: int) -> None:
        """oof.csv (or inner.csv): the kept model's probabilities of its validation (or inner) images."""
        table = rows[["path", "subject", "label"]].assign(
            prob_all=probs[:, 1].round(6), pred=(probs[:, 1] >= 0.5).astype(int), fold=fold)
        write_csv(self.inner if inner else self.oof, table[list(OOF_COLUMNS)])


def predict_command_for(run: Path, name: str, features: bool = False) -> str:
    """The command that makes a run's predictions of this name again."""
    if name == "oof":
        return f"alldetect predict {run} --oof" + (" features=true" if features else "")
    return f"alldetect predict {run} --data DIR --name {name}" + (" features=true" if features else "")


def read_checked_csv(path: Path, need: set[str], what: str) -> pd.DataFrame:
    """A CSV with the columns `need`, its probabilities in [0, 1]; any problem is an error that names the file."""
    try:
        frame = pd.read_csv(path, dtype={"path": str, "subject": str, "image": str})
    except Exception as e:  # pandas raises many kinds for a broken CSV
        raise UserError(f"cannot read {what} {path}: {str(e)[:200]}") from None
    missing = need - set(frame.columns)
    if missing:
        raise UserError(f"{what} {path} lacks column(s) {', '.join(sorted(missing))} (found {', '.join(frame.columns)})")
    if "prob_all" in frame:
        p = pd.to_numeric(frame["prob_all"], errors="coerce")
        bad = frame.loc[~p.between(0, 1), frame.columns[0]].tolist()
        if bad:
            raise UserError(f"{what} {path}: prob_all must be a probability in [0, 1]; rows {short_list(bad)} are not")
    return frame
