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
refused with a clear message.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from alldetect.atomic import atomic_path, write_csv
from alldetect.config import Config, validate
from alldetect.data.folds import fold_file_root
from alldetect.errors import UserError, short_list
from alldetect.models import default_input_size, model_from_config

SCHEMA_VERSION = 2  # 0: before select= (cannot be resumed); 1: one flat dict; 2: {"meta": RunMeta, tensors...}
OOF_COLUMNS = ("path", "subject", "label", "prob_all", "pred", "fold")
PRED_COLUMNS = ("path", "prob_all")  # + label, subject where the images' layout says them
TENSORS = ("model", "optimizer", "ema", "scaler")


class Progress(BaseModel):
    """The training loop's state: the last finished epoch, the best selection score so far and its epoch,
    epochs since it improved, and the W&B run."""

    model_config = ConfigDict(validate_assignment=True)
    epoch: int = -1
    best: float | None = None
    best_epoch: int = -1
    stale: int = 0
    wandb_id: str | None = None


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
    partial: dict[str, Any] | None = None  # last.pt of a stopped run: the half-done epoch's step count and sums
    saved_at: float = Field(default_factory=time.time)  # when the checkpoint was made: predictions name it

    @property
    def input_size(self) -> int:
        return self.config.input_size or default_input_size(self.config.arch)

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
    """mmap=True maps the weights instead of reading them: cheap when only the metadata are needed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train the run first (./train.sh ARCH FOLD)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is truncated or foreign
        raise UserError(f"cannot read checkpoint {path}: damaged or not a checkpoint (not a PyTorch archive)")
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
    return Checkpoint(_read_meta(state, path), state["model"], state.get("optimizer"), state.get("ema"),
                      state.get("scaler"), path=path)


def _read_meta(state: dict, path: Path) -> RunMeta:
    raw = state["meta"] if "meta" in state else _upgrade_flat(state)
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
        named = {p.name for p in self._result_files()}
        return [p.name for p in sorted(self.path.iterdir()) if p.name in named or p.name.startswith("pred_")]

    def remove_results(self) -> None:
        """overwrite=true: the run's files and config.yaml, its predictions (of the model being replaced) and
        W&B files."""
        for p in (*self._result_files(), self.config):
            p.unlink(missing_ok=True)
        for old in self.path.glob("pred_*"):
            old.unlink()
        shutil.rmtree(self.wandb, ignore_errors=True)

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

    def read_predictions(self, name: str) -> pd.DataFrame:
        return read_checked_csv(self.pred(name), set(PRED_COLUMNS), "prediction CSV")

    def read_pred_meta(self, name: str) -> dict:
        """pred_<name>.json: which data, layout, TTA and checkpoint the predictions are of."""
        path = self.pred_meta(name)
        if not path.is_file():
            raise UserError(f"{path} is missing (it records which data the predictions are of); rerun "
                            "`alldetect predict`")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}); rerun `alldetect predict`") from None

    def read_history(self) -> pd.DataFrame:
        return read_checked_csv(self.history, {"epoch", "train_loss"}, "training history")

    def write_scored(self, inner: bool, rows: pd.DataFrame, probs, fold: int) -> None:
        """oof.csv (or inner.csv): the kept model's probabilities of its validation (or inner) images."""
        table = rows[["path", "subject", "label"]].assign(
            prob_all=probs[:, 1].round(6), pred=(probs[:, 1] >= 0.5).astype(int), fold=fold)
        write_csv(self.inner if inner else self.oof, table[list(OOF_COLUMNS)])


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
