"""Fit one fold: everything a later step needs ends up in the run folder (what each file holds: runfiles).

runs/<arch>/full/ (fold FULL: trained on every image of the fold file) has no validation fold, so no oof.csv and
no validation columns in history.csv; it keeps the weights of a fixed schedule (select=ema or last).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from alldetect.atomic import check_writable, write_csv
from alldetect.config import Config, save_config
from alldetect.data.folds import FoldFile
from alldetect.engine.accel import compiled
from alldetect.engine.distributed import Dist, init_distributed
from alldetect.engine.folddata import EvalSet, fold_data
from alldetect.engine.gpu_augment import BatchAugment
from alldetect.engine.loop import DeviceBatch, NonFiniteLoss, Updater, predict_probs, resolve_device, train_one_epoch
from alldetect.engine.optim import Schedule, create_optimizer, set_frozen
from alldetect.engine.rundir import check_free_space, check_resume, prepare_run_dir, run_dir_for, run_name
from alldetect.engine.runfiles import Checkpoint, Progress, RunDir, RunMeta, load_checkpoint, save_checkpoint
from alldetect.engine.select import Selector
from alldetect.engine.stopping import StopRequested, stop_on_signals
from alldetect.errors import UserError
from alldetect.locks import exclusive
from alldetect.metrics import METRIC_NAMES, score
from alldetect.models import create_model
from alldetect.tracking import Tracker, start_tracker

log = logging.getLogger("alldetect")

__all__ = ["FULL", "FitResult", "TrainingDiverged", "fit_fold", "run_dir_for"]

FULL = None  # the "fold" of a final model trained on every image, with nothing held out (runs/<arch>/full)


@dataclass
class FitResult:
    run_dir: Path
    best_epoch: int
    best_score: float
    metrics: dict  # the validation fold's scores of best.pt
    epochs_run: int
    stopped_early: bool = False
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    select: str = "last"
    fold: int | None = 0  # FULL (None): trained on every image, metrics empty
    train_images: int = 0


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: a bad setting (a tuning trial fails, the study goes on)."""


@dataclass
class Model:
    """The weights being trained, what runs them (DDP / compiled), and the moving average that is evaluated."""

    module: nn.Module
    forward: nn.Module
    ema: Any = None  # timm ModelEmaV3
    use_ema: bool = True  # False with select=last: the average is kept up (in last.pt) but not evaluated or kept
    averaged_forward: nn.Module | None = None  # the average compiled (compile=true on CUDA)

    @property
    def averaged(self) -> nn.Module | None:
        """The moving average when it is what gets evaluated and kept (ema=true, select other than last)."""
        return self.ema.module if self.ema is not None and self.use_ema else None

    @property
    def evaluated(self) -> nn.Module:
        if self.averaged is None:
            return self.forward
        return self.averaged_forward if self.averaged_forward is not None else self.averaged

    def weights(self) -> dict:
        """What best.pt keeps: the averaged weights with ema=true (except with select=last: the final ones)."""
        return (self.module if self.averaged is None else self.averaged).state_dict()


def fit_fold(cfg: Config, fold: int | None, folds: FoldFile, run_dir: Path | RunDir | None = None,
             on_epoch: Callable[[int, dict], None] | None = None, wandb_name: str | None = None,
             job_type: str = "train") -> FitResult:
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
        return _fit_locked(cfg, fold, folds, files, d, on_epoch, wandb_name, job_type)


def _fit_locked(cfg: Config, fold: int | None, folds: FoldFile, run_dir: RunDir, d: Dist, on_epoch, wandb_name,
                job_type):
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
    data = fold_data(cfg, folds, fold, size, device, d)
    model = _build_model(cfg, size, device, d, dev)
    compiling = cfg.compile and device.type == "cuda"
    dev.graphs = compiling and cfg.compile_mode == "reduce-overhead"
    optimizer = create_optimizer(cfg, model.module)
    if d.main:
        check_free_space(cfg, model.module, run_dir)
    batches = min(len(data.train_loader), cfg.max_batches) if cfg.max_batches else len(data.train_loader)
    updates_per_epoch = -(-batches // cfg.accum_steps)
    updater = _updater(cfg, model, optimizer, Schedule(cfg, optimizer, updates_per_epoch), data.class_weights,
                       device, dev)
    # The validation loss is the plain (class-weighted) cross-entropy, comparable across training settings.
    val_loss_fn = nn.CrossEntropyLoss(weight=data.class_weights.to(device) if data.class_weights is not None else None)
    augment = BatchAugment(data.aug) if cfg.augment_on == "gpu" else None
    selector = Selector(cfg)

    progress, history = Progress(), pd.DataFrame()
    partial = resume_state.meta.partial if resume_state is not None else None  # a half-done epoch to finish
    if resume_state is not None:
        _check_same_updates(resume_state.meta, d.world, updates_per_epoch, run_dir)
        progress = _restore(resume_state, cfg, model, optimizer, updater, run_dir)
        if run_dir.history.is_file():
            history = run_dir.read_history().query("epoch <= @progress.epoch")
    tracker = Tracker()
    if d.main:
        tracker = start_tracker(cfg.wandb, run_dir.path, name=wandb_name or f"{cfg.arch}-{run_name(fold)}", group=cfg.study,
                                config=cfg.to_dict(), job_type=job_type, resume_id=progress.wandb_id)
        progress.wandb_id = tracker.run_id

    def checkpoint(metrics: dict | None, partial: dict | None = None) -> Checkpoint:
        """last.pt as it stands now (best.pt: the same with the kept weights)."""
        meta = RunMeta(config=cfg, run=run_name(fold), progress=progress.model_copy(), metrics=metrics,
                       fold_file=str(folds.path), fold_fingerprint=folds.meta.get("fingerprint", ""), fold_k=folds.k,
                       fold_assignment=folds.assignment, leaky_split=folds.leaky, world=d.world,
                       updates_per_epoch=updates_per_epoch, train_images=data.train_images, partial=partial)
        return Checkpoint(meta, model.module.state_dict(), optimizer.state_dict(),
                          model.ema.module.state_dict() if model.ema is not None else None,
                          updater.scaler.state_dict() if updater.scaler is not None else None)

    stopped_early, exit_code, ahead = False, 1, None
    try:
        with stop_on_signals() as stop:
            for epoch in range(progress.epoch + 1, cfg.epochs):
                if selector.should_stop(progress.stale):
                    stopped_early = True
                    break
                if (float(bool(stop)) if not d.enabled else d.mean(float(bool(stop)))) > 0:  # every rank together
                    raise StopRequested(f"stopped by {stop.signal_name} after epoch {epoch}; {run_dir.last} "
                                        "holds it: continue with the same command and resume=true")
                if cfg.freeze_epochs:
                    set_frozen(model.module, epoch < cfg.freeze_epochs)
                carry = partial if partial is not None and partial["epoch"] == epoch else None
                if ahead is None:  # the run's first epoch (the only one a resume can carry): start it here
                    data.sampler.set_epoch(epoch, skip=carry["steps"] * data.batch if carry else 0)
                    ahead = iter(data.train_loader)
                batches, ahead = ahead, None
                stats = train_one_epoch(model.forward, data.train_loader, updater, dev, epoch=epoch, seed=cfg.seed,
                                        updates_per_epoch=updates_per_epoch, max_batches=cfg.max_batches,
                                        augment_batch=augment, reduce=d.mean if d.enabled else None, stop=stop,
                                        carry=carry, rank=d.rank, batches=batches,
                                        desc=f"{cfg.arch} {run_name(fold)} epoch {epoch + 1}/{cfg.epochs}")
                if not stats["completed"]:  # a signal: keep the half-done epoch so that resume continues it
                    if d.main:
                        save_checkpoint(run_dir.last, checkpoint(None, partial={"epoch": epoch, **stats["carry"]}))
                    raise StopRequested(
                        f"stopped by {stop.signal_name} in epoch {epoch + 1} after batch {stats['carry']['steps']}; "
                        f"{run_dir.last} holds it: continue with the same command and resume=true")
                if epoch + 1 < cfg.epochs:  # the workers fetch the next epoch's first batches while this one validates
                    data.sampler.set_epoch(epoch + 1)
                    ahead = iter(data.train_loader)
                outer_probs = metrics = inner_probs = inner = None
                if data.outer is not None:
                    outer_probs, metrics = _evaluate(model.evaluated, data.outer, dev, val_loss_fn, d, "validate",
                                                         static=compiling)
                if data.inner is not None:
                    inner_probs, inner = _evaluate(model.evaluated, data.inner, dev, val_loss_fn, d, "select",
                                                        static=compiling)
                chosen = selector.chooses(epoch, inner if data.inner is not None else metrics, progress.best)
                progress.epoch = epoch
                if selector.curve is not None:
                    judged = inner if data.inner is not None else metrics
                    progress.stale = 0 if chosen else progress.stale + 1
                    if chosen and judged is not None:
                        progress.best = judged[cfg.monitor]
                if chosen:
                    progress.best_epoch = epoch
                row = _history_row(epoch, stats, metrics, inner, updater.schedule.lr, chosen, d.world)
                history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
                if d.main:
                    try:  # checkpoints first: history.csv is never ahead of last.pt
                        state = checkpoint(metrics)
                        if chosen:
                            save_checkpoint(run_dir.best, replace(state, model=model.weights(), optimizer=None,
                                                                  ema=None, scaler=None))
                            if outer_probs is not None and data.outer is not None and fold is not None:
                                run_dir.write_scored(False, data.outer.rows, outer_probs, fold)
                            if inner_probs is not None and data.inner is not None and fold is not None:
                                run_dir.write_scored(True, data.inner.rows, inner_probs, fold)
                        save_checkpoint(run_dir.last, state)
                        write_csv(run_dir.history, history)
                    except UserError as e:
                        raise UserError(f"training stopped in epoch {epoch + 1}: {e}. Make room (or raise the limit) "
                                        "and continue with the same command and resume=true, from the last epoch "
                                        "last.pt holds") from None
                    logged = {f"val/{k}": v for k, v in (metrics or {}).items() if k != "confusion"}
                    if inner is not None:
                        logged.update({f"inner/{k}": v for k, v in inner.items() if k != "confusion"})
                    tracker.log({**logged, "train/loss": stats["loss"], "train/images_per_s": row["images_per_s"],
                                 "train/data_wait": stats["data_wait"], "lr": row["lr"]}, step=epoch + 1)
                    tqdm.write(_epoch_line(cfg, fold, row, chosen))
                if on_epoch is not None and metrics is not None:
                    on_epoch(epoch, metrics)
        if progress.best_epoch < 0:
            done = progress.epoch + 1
            raise UserError(f"{run_dir} kept no weights: {done} epoch(s) were done before and epochs={cfg.epochs}"
                            + (f" runs no more; resume with epochs={done + 1} or more" if done >= cfg.epochs else ""))
        d.barrier()  # rank 0 has written best.pt
        kept_metrics = load_checkpoint(run_dir.best, mmap=True).meta.metrics or {}
        tracker.summary({"best_epoch": progress.best_epoch + 1,
                         **{f"best/{k}": v for k, v in kept_metrics.items() if k != "confusion"}})
        exit_code = 0
    except NonFiniteLoss as e:
        kept = (f"{run_dir.last} keeps the last good epoch ({progress.epoch + 1})" if progress.epoch >= 0
                else f"{run_dir.last} keeps the half-done first epoch" if run_dir.last.is_file()
                else "no epoch finished, so no checkpoint was written")
        raise TrainingDiverged(f"{e}. Training stopped; {kept}. Try a lower lr (e.g. lr=1e-4), clip_grad=1, "
                               "or class_balance=none") from None
    except torch.cuda.OutOfMemoryError:
        raise UserError(_out_of_memory(cfg, size)) from None
    except ValueError as e:
        if "Expected more than 1 value per channel" not in str(e):
            raise
        raise UserError(_one_value_per_channel(cfg, size, data.batch)) from None
    finally:
        tracker.finish(exit_code)
        data.close()
    return FitResult(run_dir.path, progress.best_epoch, kept_metrics.get(cfg.monitor, float("nan")), kept_metrics,
                     len(history), stopped_early, history, cfg.select, fold, data.train_images)


def _build_model(cfg: Config, size: int, device: torch.device, d: Dist, dev: DeviceBatch) -> Model:
    torch.manual_seed(cfg.seed)
    module = create_model(cfg.arch, num_classes=2, dropout=cfg.dropout, pretrained=cfg.pretrained,
                          pretrained_path=cfg.pretrained_path, input_size=size, subtract_mean=cfg.subtract_mean)
    if d.enabled and device.type == "cuda":  # batch statistics over the global batch (SyncBN needs CUDA)
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    module = module.to(device)
    if dev.channels_last:
        module = module.to(memory_format=torch.channels_last)
    forward: nn.Module = module
    if d.enabled:
        forward = DistributedDataParallel(module, device_ids=[d.local_rank] if device.type == "cuda" else None)
    if cfg.compile:  # CUDA only (accel.compiled leaves a CPU model eager)
        forward = compiled(forward, cfg.compile_mode, device)
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3

        # timm's decay warm-up (1 - (1 + step) ** -2/3, capped at ema_decay) suits short runs as well as long ones
        ema = ModelEmaV3(module, decay=cfg.ema_decay, use_warmup=True)
    model = Model(module, forward, ema, use_ema=cfg.select != "last")
    if cfg.compile and model.averaged is not None:  # the average is what validation runs: compile it too
        model.averaged_forward = compiled(model.averaged, cfg.compile_mode, device)
    return model


def _updater(cfg: Config, model: Model, optimizer, schedule: Schedule, class_weights, device, dev) -> Updater:
    mixup = None
    if cfg.mixup or cfg.cutmix:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                      label_smoothing=cfg.label_smoothing, num_classes=2)
    weight = class_weights.to(device) if class_weights is not None else None
    # With mixup the targets arrive smoothed already (timm's Mixup applies label_smoothing to them).
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.0 if mixup else cfg.label_smoothing)
    scaler = torch.amp.GradScaler("cuda") if dev.needs_scaler else None
    return Updater(model.module, optimizer, schedule, loss_fn, scaler, cfg.accum_steps, cfg.clip_grad, model.ema,
                   mixup)


def _restore(state: Checkpoint, cfg: Config, model: Model, optimizer, updater: Updater, run_dir: RunDir) -> Progress:
    model.module.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    if model.ema is not None:
        model.ema.module.load_state_dict(state.ema)
    if updater.scaler is not None and state.scaler:
        updater.scaler.load_state_dict(state.scaler)
    progress = state.meta.progress.model_copy()
    partial = state.meta.partial
    where = f"epoch {progress.epoch + 2}" + (f", batch {partial['steps'] + 1}" if partial else "")
    so_far = (f"best selection score {progress.best:.4f} at epoch {progress.best_epoch + 1}"
              if progress.best is not None else f"{progress.epoch + 1} epoch(s) done")
    if progress.epoch + 1 >= cfg.epochs and not partial:
        log.info("%s has finished its %d epochs already (epochs=N continues it for longer)", run_dir, cfg.epochs)
    else:
        log.info("resuming %s from %s (%s)", run_dir, where, so_far)
    saved_epochs = state.meta.config.epochs
    if saved_epochs != cfg.epochs and cfg.scheduler != "none":
        log.warning("epochs %s -> %d: the %s schedule now spans %d epochs and continues from where the run is",
                    saved_epochs, cfg.epochs, cfg.scheduler, cfg.epochs)
    return progress


def _check_same_updates(meta: RunMeta, world: int, updates_per_epoch: int, run_dir: RunDir) -> None:
    """The learning rate and the moving average follow the update count: a resume must count updates as the run
    did (same number of processes, same updates per epoch)."""
    then = (meta.world or world, meta.updates_per_epoch or updates_per_epoch)  # unrecorded (older runs): as now
    if then != (world, updates_per_epoch):
        raise UserError(f"cannot resume {run_dir}: it ran {then[1]} updates per epoch on {then[0]} process(es), this "
                        f"run would make {updates_per_epoch} on {world} (--gpus or max_batches changed), which would "
                        "move its learning-rate schedule. Resume as it ran, or start over with overwrite=true")


def _evaluate(model: nn.Module, which: EvalSet, dev: DeviceBatch, loss_fn, d: Dist, desc: str,
              static: bool = False) -> tuple[np.ndarray, dict]:
    probs, loss = predict_probs(model, which.loader, dev, loss_fn, desc=desc, static=static)
    probs = d.gather_rows(which.order, probs, len(which.rows))
    metrics = score(which.rows["label"], probs[:, 1])
    metrics["loss"] = d.mean(loss)
    return probs, metrics


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


def _history_row(epoch: int, stats: dict, metrics: dict | None, inner: dict | None, lr: float, chosen: bool,
                 world: int = 1) -> dict:
    row = {"epoch": epoch, "train_loss": round(stats["loss"], 6)}
    if metrics is not None:  # None: trained on every image (full), nothing validated
        row.update({"val_loss": round(metrics["loss"], 6), **{k: round(metrics[k], 6) for k in METRIC_NAMES}})
    if inner is not None:
        row.update({"inner_loss": round(inner["loss"], 6), **{f"inner_{k}": round(inner[k], 6) for k in METRIC_NAMES}})
    row.update({"selected": int(chosen), "lr": lr, "seconds": round(stats["seconds"], 2),
                "images_per_s": round(world * stats["images"] / max(stats["seconds"], 1e-9), 1),
                "data_wait": round(stats["data_wait"], 4)})
    return row


def _epoch_line(cfg: Config, fold: int | None, row: dict, chosen: bool) -> str:
    inner = f"  inner f1 {row['inner_f1']:.4f}" if "inner_f1" in row else ""
    star = " *" if chosen and cfg.select in ("inner", "outer") else ""
    val = (f"val_loss {row['val_loss']:.4f}  f1 {row['f1']:.4f}  acc {row['accuracy']:.4f}  auc {row['roc_auc']:.4f}"
           if "f1" in row else "(no validation: every image trains)")
    return (f"{cfg.arch} {run_name(fold)} epoch {row['epoch'] + 1:>3}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
            f"{val}{inner}  lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s  wait {row['data_wait']:.0%}{star}")
