"""The images of one fold's run: loaders for training, the validation fold and (select=inner) an inner split of
the training folds, and the class weights of what it trains on."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from alldetect.config import AugConfig, Config
from alldetect.data.background import inspect_background
from alldetect.data.cache import image_cache
from alldetect.data.dataset import CellDataset, EpochSampler, Loader, make_loader
from alldetect.data.extra import extra_rows
from alldetect.data.folds import FoldFile
from alldetect.data.transforms import create_transform, worker_only
from alldetect.engine.distributed import Dist
from alldetect.engine.select import carve_inner
from alldetect.errors import UserError

log = logging.getLogger("alldetect")


@dataclass
class EvalSet:
    """Images scored after every epoch, in dataset order once gathered from the ranks."""

    loader: Loader
    rows: pd.DataFrame
    order: np.ndarray  # dataset rows this rank predicts, in loader order


@dataclass
class FoldData:
    train_loader: Loader
    sampler: EpochSampler  # the training loader's: set_epoch(epoch, skip) before each epoch
    outer: EvalSet | None  # the validation fold: what the run's scores and oof.csv are of (None: train=full)
    inner: EvalSet | None  # select=inner: held-out subjects of the training folds, which pick the epoch
    class_weights: torch.Tensor | None
    batch: int  # per process
    train_images: int
    aug: AugConfig  # cfg.aug with border=auto resolved from the training images

    def close(self) -> None:
        for loader in (self.train_loader, self.outer.loader if self.outer else None,
                       self.inner.loader if self.inner else None):
            if loader is not None:
                loader.close()


def fold_data(cfg: Config, folds: FoldFile, fold: int | None, size: int, device: torch.device, d: Dist) -> FoldData:
    """fold None: every image trains, and nothing is validated (a final model on all labelled data)."""
    held_out = folds.table["fold"] == fold if fold is not None else np.zeros(len(folds.table), bool)
    train_rows = folds.table[~held_out].reset_index(drop=True)
    val_rows = folds.table[held_out].reset_index(drop=True)
    inner_rows = None
    if cfg.select == "inner":
        assert fold is not None, "fit_fold refuses select=inner for full"
        train_rows, inner_rows = carve_inner(train_rows, cfg.select_share, cfg.seed, fold)
    aug = resolve_border(cfg, folds, train_rows)
    extra = extra_rows(cfg.data.extra, folds.table, folds.data_root) if cfg.data.extra else None
    if extra is not None:
        log.info("training on %d image(s) of the fold file and %d extra labelled image(s) (data.extra)",
                 len(train_rows), len(extra))
        train_rows = pd.concat([train_rows, extra], ignore_index=True)
    labels = train_rows["label"].to_numpy()
    if len(np.unique(labels)) < 2 or (val_rows.empty and fold is not None):
        raise UserError(f"fold file {folds.path}: training needs both classes and a non-empty validation fold")
    if fold is not None and val_rows["label"].nunique() == 1 and d.main:
        only = "all" if val_rows["label"].iloc[0] == 1 else "hem"
        log.warning("fold%d of %s holds '%s' images only: its ROC-AUC is undefined (NaN), and its F1, accuracy, "
                    "precision and recall score one class, so they do not compare with other folds' scores. Make "
                    "folds that hold both classes (`alldetect split`, with a smaller --k if a class has few people)",
                    fold, folds.path, only)
    if cfg.batch_size % d.world:
        raise UserError(f"batch_size={cfg.batch_size} is the global batch: it must divide by the {d.world} processes")
    if (cfg.mixup or cfg.cutmix) and cfg.batch_size // d.world < 2:
        raise UserError(f"batch_size={cfg.batch_size} on {d.world} processes is one image a process, and mixup/cutmix "
                        f"mix pairs of a process's images: use batch_size={2 * d.world} or more, or mixup=0 cutmix=0")
    class_weights, sample_weights = balance(cfg.class_balance, labels)
    cache = None
    if cfg.data.cache:
        paths = folds.table["path"].tolist() + (extra["path"].tolist() if extra is not None else [])
        cache = shared_cache(cfg, folds, paths, size, d)
    pin, batch = device.type == "cuda", cfg.batch_size // d.world

    def dataset(rows: pd.DataFrame, transform=None) -> CellDataset:
        source = cache.source(rows["path"]) if cache is not None else None
        return CellDataset(folds.data_root, rows["path"], rows["label"], cfg.data.crop, size, transform, cfg.seed,
                           source)

    def eval_set(rows: pd.DataFrame) -> EvalSet:
        sampler = EpochSampler(len(rows), cfg.seed, False, None, d.rank, d.world)
        return EvalSet(make_loader(dataset(rows), batch, sampler, cfg.data.num_workers, pin), rows, sampler.order())

    # augment_on=gpu: the device does the rest on whole batches; stain augmentation has no batched form and stays
    train_ds = dataset(train_rows, create_transform(aug if cfg.augment_on == "cpu" else worker_only(aug)))
    train_sampler = EpochSampler(len(train_ds), cfg.seed, True, sample_weights, d.rank, d.world)
    return FoldData(
        make_loader(train_ds, batch, train_sampler, cfg.data.num_workers, pin,
                    drop_last=len(train_ds) > cfg.batch_size), train_sampler,
        eval_set(val_rows) if fold is not None else None, eval_set(inner_rows) if inner_rows is not None else None,
        class_weights, batch, len(train_rows), aug)


def balance(mode: str, labels: np.ndarray) -> tuple[torch.Tensor | None, np.ndarray | None]:
    """class_balance=: (the loss's class weights, or each training image's sampling weight), inverse to the
    class's count; (None, None) for none."""
    counts = np.bincount(labels, minlength=2).astype(float)
    if mode == "loss":
        return torch.tensor(counts.sum() / (2 * counts), dtype=torch.float32), None
    if mode == "sampler":
        return None, 1.0 / counts[labels]
    return None, None


def shared_cache(cfg: Config, folds: FoldFile, paths: list[str], size: int, d: Dist):
    """data.cache: one rank builds the decoded-image cache, the others open it once it is there."""
    cache = image_cache(folds.data_root, paths, cfg.data.crop, size, cfg.data.cache_dir) if d.main else None
    d.barrier()
    return cache if cache is not None else image_cache(folds.data_root, paths, cfg.data.crop, size, cfg.data.cache_dir)


def resolve_border(cfg: Config, folds: FoldFile, train_rows: pd.DataFrame) -> AugConfig:
    """aug.border=auto becomes black or reflect by the training images' corners (data/background.py), said in
    the run's log; the same images give the same answer, so a resumed run augments as it began."""
    if not cfg.aug.rotate or cfg.aug.border != "auto":
        return cfg.aug
    background = inspect_background(folds.data_root, train_rows["path"].tolist(), cfg.data.crop)
    log.info("rotations fill the corners they uncover with %s (aug.border=auto; set aug.border=black or reflect to "
             "choose): %s", background.fill, background.describe())
    return cfg.aug.model_copy(update={"border": background.border})
