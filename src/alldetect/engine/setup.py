"""What a fold trains with: the model (with its moving average and compiled forms), the updater that steps it,
and both restored from last.pt on a resume."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from alldetect.atomic import write_csv
from alldetect.config import Config
from alldetect.engine.accel import compiled
from alldetect.engine.distributed import Dist
from alldetect.engine.loop import DeviceBatch, Updater
from alldetect.engine.optim import Schedule
from alldetect.engine.rundir.files import Checkpoint, Progress, RunDir, RunMeta
from alldetect.errors import UserError
from alldetect.models import create_model

log = logging.getLogger("alldetect")


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


def build_model(cfg: Config, size: int, device: torch.device, d: Dist, dev: DeviceBatch) -> Model:
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


def build_updater(cfg: Config, model: Model, optimizer, schedule: Schedule, class_weights, device, dev,
                  loss_fn: nn.Module | None = None) -> Updater:
    """The step maker; `loss_fn` replaces the classification loss (pretraining's contrastive one)."""
    mixup = None
    if cfg.mixup or cfg.cutmix:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                      label_smoothing=cfg.label_smoothing, num_classes=2)
    weight = class_weights.to(device) if class_weights is not None else None
    # With mixup the targets arrive smoothed already (timm's Mixup applies label_smoothing to them).
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.0 if mixup else cfg.label_smoothing)
    scaler = torch.amp.GradScaler("cuda") if dev.needs_scaler else None
    return Updater(model.module, optimizer, schedule, loss_fn, scaler, cfg.accum_steps, cfg.clip_grad, model.ema,
                   mixup)


def restore(state: Checkpoint, cfg: Config, model: Model, optimizer, updater: Updater, run_dir: RunDir) -> Progress:
    model.module.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    if model.ema is not None:
        model.ema.module.load_state_dict(state.ema)
    if updater.scaler is not None and state.scaler:
        updater.scaler.load_state_dict(state.scaler)
    progress = state.meta.progress.model_copy()
    partial = state.meta.partial
    where = f"epoch {progress.epoch + 2}" + (f", batch {partial.steps + 1}" if partial else "")
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


def resumed_history(state: Checkpoint, run_dir: RunDir, main: bool) -> pd.DataFrame:
    """The history as last.pt left it, written again to history.csv (which a kill may have left an epoch behind);
    a checkpoint from before last.pt held its history: history.csv's rows up to last.pt's epoch."""
    if state.meta.history is not None:
        history = pd.DataFrame(state.meta.history)
        if main:
            write_csv(run_dir.history, history)
        return history
    if run_dir.history.is_file():
        return run_dir.read_history().query(f"epoch <= {state.meta.progress.epoch}")
    return pd.DataFrame()


def check_same_updates(meta: RunMeta, world: int, updates_per_epoch: int, run_dir: RunDir) -> None:
    """The learning rate and the moving average follow the update count: a resume must count updates as the run
    did (same number of processes, same updates per epoch)."""
    then = (meta.world or world, meta.updates_per_epoch or updates_per_epoch)  # unrecorded (older runs): as now
    if then != (world, updates_per_epoch):
        raise UserError(f"cannot resume {run_dir}: it ran {then[1]} updates per epoch on {then[0]} process(es), this "
                        f"run would make {updates_per_epoch} on {world} (--gpus or max_batches changed), which would "
                        "move its learning-rate schedule. Resume as it ran, or start over with overwrite=true")
