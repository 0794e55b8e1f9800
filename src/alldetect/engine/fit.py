"""Fit one fold: everything a later step needs ends up in the run folder (what each file holds: runfiles).

`fit_fold` checks the request, takes the run folder's lock and builds what the fold trains with (data, model,
optimizer, updater, selection policy, tracker; restored from last.pt on a resume); engine/trainer.py runs the
epochs as stages. runs/<arch>/full/ (fold FULL: trained on every image of the fold file) has no validation fold,
so no oof.csv and no validation columns in history.csv; it keeps the weights of a fixed schedule (select=ema or
last).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alldetect.atomic import check_writable
from alldetect.config import Config, save_config
from alldetect.data.folds import FoldFile
from alldetect.engine.distributed import Dist, init_distributed
from alldetect.engine.folddata import FoldData, fold_data
from alldetect.engine.gpu_augment import BatchAugment
from alldetect.engine.loop import DeviceBatch, NonFiniteLoss, resolve_device
from alldetect.engine.optim import Schedule, create_optimizer
from alldetect.engine.rundir.files import RunDir
from alldetect.engine.rundir.prepare import check_free_space, check_resume, prepare_run_dir, run_dir_for, run_name
from alldetect.engine.select import selection_policy
from alldetect.engine.setup import Model, build_model, build_updater, check_same_updates, restore, resumed_history
from alldetect.engine.trainer import FitResult, FoldState, FoldTrainer, TrainingDiverged
from alldetect.errors import UserError
from alldetect.locks import exclusive
from alldetect.tracking import Tracker, start_tracker

__all__ = ["CLASSIFY", "FULL", "FitResult", "Task", "TrainingDiverged", "fit_fold", "run_dir_for"]

FULL = None  # the "fold" of a final model trained on every image, with nothing held out (runs/<arch>/full)


@dataclass(frozen=True)
class Task:
    """What a run trains: its images (training loader and what is evaluated), its network, and its loss (None:
    the classification loss of the config). Classification is CLASSIFY; pretraining is engine/pretrain.PRETRAIN."""

    data: Callable[[Config, FoldFile, int | None, int, torch.device, Dist], FoldData] = fold_data
    model: Callable[[Config, int, torch.device, Dist, DeviceBatch], Model] = build_model
    loss: Callable[[], nn.Module] | None = None


CLASSIFY = Task()


def fit_fold(cfg: Config, fold: int | None, folds: FoldFile, run_dir: Path | RunDir | None = None,
             on_epoch: Callable[[int, dict], None] | None = None, wandb_name: str | None = None,
             job_type: str = "train", task: Task = CLASSIFY) -> FitResult:
    """Train `cfg.arch` on every fold but `fold`, validate on `fold`. `on_epoch(epoch, metrics)` (the validation
    fold's scores) may raise to stop early (Optuna pruning). `wandb_name` names the W&B run (default
    <arch>-fold<k>). Under torchrun every rank calls this; only rank 0 writes. fold FULL trains on every image and
    validates nothing."""
    if fold is FULL:
        if cfg.select in ("inner", "outer"):
            raise UserError(f"full trains on every image, so no images are left to choose an epoch on (select="
                            f"{cfg.select}): use select=ema (the default) or select=last, a fixed schedule of "
                            f"epochs={cfg.epochs} as the fold runs had")
    elif not 0 <= fold < folds.k:
        raise UserError(f"fold{fold} does not exist: {folds.path} has folds fold0..fold{folds.k - 1}")
    d = init_distributed()
    if d.enabled and cfg.freeze_epochs:
        raise UserError("freeze_epochs is not supported with several GPUs (--gpus): train on one")
    files = RunDir(run_dir) if run_dir is not None else run_dir_for(cfg, fold)
    if d.main:
        check_writable(files.path, "the run folder")
    lock = exclusive(files.path / ".lock", f"the run folder {files}") if d.main else contextlib.nullcontext()
    with lock:
        return _fit_locked(cfg, fold, folds, files, d, on_epoch, wandb_name, job_type, task)


def _fit_locked(cfg: Config, fold: int | None, folds: FoldFile, run_dir: RunDir, d: Dist, on_epoch, wandb_name,
                job_type, task: Task) -> FitResult:
    trainer = _build_trainer(cfg, fold, folds, run_dir, d, on_epoch, task)
    if d.main:
        trainer.tracker = start_tracker(
            cfg.wandb, run_dir.path, name=wandb_name or f"{cfg.arch}-{run_name(fold)}", group=cfg.study,
            config=cfg.to_dict(), job_type=job_type, resume_id=trainer.state.progress.wandb_id)
        trainer.state.progress.wandb_id = trainer.tracker.run_id
    exit_code = 1
    try:
        result = trainer.run()
        exit_code = 0
        return result
    except NonFiniteLoss as e:
        raise trainer.diverged(e) from None
    except torch.cuda.OutOfMemoryError:
        raise UserError(_out_of_memory(cfg, cfg.resolved_input_size)) from None
    except ValueError as e:
        if "Expected more than 1 value per channel" not in str(e):
            raise
        raise UserError(_one_value_per_channel(cfg, cfg.resolved_input_size, trainer.data.batch)) from None
    finally:
        trainer.tracker.finish(exit_code)
        trainer.data.close()


def _build_trainer(cfg: Config, fold: int | None, folds: FoldFile, run_dir: RunDir, d: Dist,
                   on_epoch: Callable[[int, dict], None] | None, task: Task) -> FoldTrainer:
    """What the fold trains with, restored from last.pt when the run resumes."""
    resume_state = prepare_run_dir(cfg, run_dir, d)
    if resume_state is not None:
        check_resume(cfg, resume_state, folds, run_dir)
    if d.main:
        save_config(cfg, run_dir.config)
    device = torch.device("cuda", d.local_rank) if d.enabled and torch.cuda.is_available() else resolve_device(cfg.device)
    dev = DeviceBatch(device, cfg.channels_last, cfg.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fastest kernels for fixed shapes; CPU runs stay deterministic
    size = cfg.resolved_input_size
    data = task.data(cfg, folds, fold, size, device, d)
    model = task.model(cfg, size, device, d, dev)
    compiling = cfg.compile and device.type == "cuda"
    dev.graphs = compiling and cfg.compile_mode == "reduce-overhead"
    optimizer = create_optimizer(cfg, model.module)
    if d.main:
        check_free_space(cfg, model.module, run_dir)
    batches = min(len(data.train_loader), cfg.max_batches) if cfg.max_batches else len(data.train_loader)
    updates_per_epoch = -(-batches // cfg.accum_steps)
    updater = build_updater(cfg, model, optimizer, Schedule(cfg, optimizer, updates_per_epoch), data.class_weights,
                            device, dev, task.loss() if task.loss is not None else None)
    state = FoldState()
    if resume_state is not None:
        check_same_updates(resume_state.meta, d.world, updates_per_epoch, run_dir)
        state.progress = restore(resume_state, cfg, model, optimizer, updater, run_dir)
        state.partial = resume_state.meta.partial  # a half-done epoch to finish
        state.history = resumed_history(resume_state, run_dir, d.main)
    # The validation loss is the plain (class-weighted) cross-entropy, comparable across training settings.
    val_loss_fn = nn.CrossEntropyLoss(weight=data.class_weights.to(device) if data.class_weights is not None else None)
    return FoldTrainer(cfg, fold, folds, run_dir, d, data, model, optimizer, updater, dev, selection_policy(cfg),
                       Tracker(), state, val_loss_fn, BatchAugment(data.aug) if cfg.augment_on == "gpu" else None,
                       static=compiling, on_epoch=on_epoch)


def _out_of_memory(cfg: Config, size: int) -> str:
    smaller = max(1, cfg.batch_size // 2)
    return (f"the GPU ran out of memory training {cfg.arch} at batch_size={cfg.batch_size}, input {size} x {size}. "
            f"Try batch_size={smaller}" + ("" if cfg.amp else ", amp=true") + " (or accum_steps=2 to keep the "
            "effective batch), or a smaller input_size; resume=true continues from the last completed epoch")


def _one_value_per_channel(cfg: Config, size: int, batch: int) -> str:
    """torch's BatchNorm in training needs two values per channel: a batch of one image on a 1 x 1 feature map."""
    return (f"{cfg.arch} at input_size={size} shrinks its input to a 1 x 1 feature map, where batch norm of a batch of "
            f"{batch} image(s) has a single value per channel to normalise (batch_size={cfg.batch_size}"
            + (f" on {cfg.batch_size // batch} processes" if cfg.batch_size != batch else "")
            + f"). Use batch_size={2 * cfg.batch_size // batch} or more, or a larger input_size (e.g. input_size={2 * size})")
