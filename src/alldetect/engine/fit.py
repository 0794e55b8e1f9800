"""Fit one fold: everything a later step needs ends up in the run folder.

runs/<arch>/fold<k>/
  config.yaml   the resolved config          history.csv  one row per epoch
  best.pt       best weights by `monitor`     last.pt      the latest epoch, for resume=true
  oof.csv       validation predictions of best.pt (path, subject, label, prob_all, pred, fold)
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from alldetect.atomic import write_csv
from alldetect.config import Config, save_config
from alldetect.data.cache import image_cache
from alldetect.data.dataset import CellDataset, EpochSampler, Loader, make_loader
from alldetect.data.folds import FoldFile
from alldetect.data.transforms import create_transform
from alldetect.engine.checkpoint import load_checkpoint, save_checkpoint
from alldetect.engine.distributed import Dist, init_distributed
from alldetect.engine.gpu_augment import BatchAugment
from alldetect.engine.stopping import StopRequested, stop_on_signals
from alldetect.engine.loop import DeviceBatch, NonFiniteLoss, predict_probs, resolve_device, train_one_epoch
from alldetect.errors import UserError
from alldetect.metrics import score
from alldetect.models import create_model, default_input_size
from alldetect.tracking import Tracker, start_tracker

log = logging.getLogger("alldetect")

# Keys that may change when a run is resumed; any other difference means a different experiment.
RESUMABLE_CHANGES = {"resume", "overwrite", "epochs", "patience", "wandb", "device", "data.num_workers",
                     "data.root", "data.cache", "data.cache_dir",
                     "max_batches", "compile", "augment_on"}
RUN_FILES = ("best.pt", "last.pt", "history.csv", "oof.csv", "config.yaml")


@dataclass
class FitResult:
    run_dir: Path
    best_epoch: int
    best_score: float
    metrics: dict
    epochs_run: int
    stopped_early: bool = False
    history: pd.DataFrame = field(default_factory=pd.DataFrame)


def run_dir_for(cfg: Config, fold: int) -> Path:
    return Path(cfg.runs_dir) / cfg.arch / f"fold{fold}"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: a bad setting (a tuning trial fails, the study goes on)."""


def fit_fold(cfg: Config, fold: int, folds: FoldFile, run_dir: Path | None = None,
             on_epoch: Callable[[int, dict], None] | None = None, run_name: str | None = None,
             job_type: str = "train") -> FitResult:
    """Train `cfg.arch` on every fold but `fold`, validate on `fold`. `on_epoch(epoch, metrics)` may raise
    to stop early (Optuna pruning). `run_name` names the W&B run (default <arch>-fold<k>). Under torchrun every
    rank calls this; only rank 0 writes."""
    if not 0 <= fold < folds.k:
        raise UserError(f"fold{fold} does not exist: {folds.path} has folds fold0..fold{folds.k - 1}")
    d = init_distributed()
    run_dir = Path(run_dir or run_dir_for(cfg, fold))
    resume_state = _prepare_run_dir(cfg, run_dir, d)
    if resume_state is not None:
        cfg = _config_for_resume(cfg, resume_state, run_dir)
        _check_same_split(resume_state, folds, run_dir)
    if d.main:
        save_config(cfg, run_dir / "config.yaml")

    device = torch.device("cuda", d.local_rank) if d.enabled and torch.cuda.is_available() else resolve_device(cfg.device)
    dev = DeviceBatch(device, cfg.channels_last, cfg.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fastest kernels for fixed shapes; CPU runs stay deterministic
    size = cfg.input_size or default_input_size(cfg.arch)
    data = _fold_data(cfg, folds, fold, size, device, d)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.arch, num_classes=2, dropout=cfg.dropout, pretrained=cfg.pretrained,
                         pretrained_path=cfg.pretrained_path, input_size=size)
    if d.enabled and device.type == "cuda":  # batch statistics over the global batch (SyncBN needs CUDA)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if dev.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(cfg, model)
    if d.main:
        _check_free_space(cfg, model, run_dir)
    scheduler = _scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler("cuda") if dev.needs_scaler else None
    loss_fn = nn.CrossEntropyLoss(weight=data.class_weights.to(device) if data.class_weights is not None else None)
    forward_model = model
    if d.enabled:
        forward_model = DistributedDataParallel(model, device_ids=[d.local_rank] if device.type == "cuda" else None)
    if cfg.compile and device.type == "cuda":
        forward_model = torch.compile(forward_model)
    augment = BatchAugment(cfg.aug) if cfg.augment_on == "gpu" else None

    start_epoch, best, best_epoch, stale, wandb_id = 0, None, -1, 0, None
    history = pd.DataFrame()
    partial = resume_state.get("partial") if resume_state is not None else None  # a half-done epoch to finish
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scheduler is not None and resume_state.get("scheduler"):
            scheduler.load_state_dict(resume_state["scheduler"])
            _stretch_cosine(scheduler, cfg.epochs)
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        start_epoch, best, best_epoch = resume_state["epoch"] + 1, resume_state["best"], resume_state["best_epoch"]
        stale, wandb_id = resume_state["stale"], resume_state.get("wandb_id")
        if (run_dir / "history.csv").is_file():
            history = pd.read_csv(run_dir / "history.csv").query("epoch < @start_epoch")
        where = f"epoch {start_epoch + 1}" + (f", batch {partial['steps'] + 1}" if partial else "")
        so_far = f"best {cfg.monitor} {abs(best):.4f} at epoch {best_epoch + 1}" if best is not None else "no epoch done"
        log.info("resuming %s from %s (%s)", run_dir, where, so_far)

    tracker = Tracker()
    if d.main:
        tracker = start_tracker(cfg.wandb, run_dir, name=run_name or f"{cfg.arch}-fold{fold}", group=cfg.study,
                                config=cfg.to_dict(), job_type=job_type, resume_id=wandb_id)
    stopped_early, exit_code = False, 1
    try:
        with stop_on_signals() as stop:
            for epoch in range(start_epoch, cfg.epochs):
                if stale >= cfg.patience > 0:
                    stopped_early = True
                    break
                if stop:
                    raise StopRequested(f"stopped by {stop.signal_name} after epoch {epoch}; {run_dir / 'last.pt'} "
                                        "holds it: continue with the same command and resume=true")
                carry = partial if partial is not None and partial["epoch"] == epoch else None
                data.train_loader.sampler.set_epoch(epoch, skip=carry["steps"] * data.batch if carry else 0)
                stats = train_one_epoch(forward_model, data.train_loader, optimizer, scaler, loss_fn, dev,
                                        epoch=epoch, seed=cfg.seed, max_batches=cfg.max_batches,
                                        augment_batch=augment, reduce=d.mean if d.enabled else None, stop=stop,
                                        carry=carry, desc=f"{cfg.arch} fold{fold} epoch {epoch + 1}/{cfg.epochs}")
                if not stats["completed"]:  # a signal: keep the half-done epoch so that resume continues it
                    if d.main:
                        state = _checkpoint(cfg, model, optimizer, scheduler, scaler, epoch - 1, best, best_epoch,
                                            stale, tracker.run_id, None, folds)
                        save_checkpoint(run_dir / "last.pt", {**state, "partial": {"epoch": epoch, **stats["carry"]}})
                    raise StopRequested(
                        f"stopped by {stop.signal_name} in epoch {epoch + 1} after batch {stats['carry']['steps']}; "
                        f"{run_dir / 'last.pt'} holds it: continue with the same command and resume=true")
                probs, val_loss = predict_probs(forward_model, data.val_loader, dev, loss_fn, desc="validate")
                probs = d.gather_rows(data.val_order, probs, len(data.val_rows))
                metrics = score(data.val_rows["label"], probs[:, 1])
                metrics["loss"] = d.mean(val_loss)
                value = -metrics["loss"] if cfg.monitor == "loss" else metrics[cfg.monitor]
                improved = best is None or value > best
                if improved:
                    best, best_epoch, stale = value, epoch, 0
                else:
                    stale += 1
                row = _history_row(epoch, stats, metrics, optimizer, d.world)
                history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
                if scheduler is not None:
                    scheduler.step()
                if d.main:
                    write_csv(run_dir / "history.csv", history)
                    state = _checkpoint(cfg, model, optimizer, scheduler, scaler, epoch, best, best_epoch, stale,
                                        tracker.run_id, metrics, folds)
                    if improved:
                        save_checkpoint(run_dir / "best.pt", state)
                        _write_oof(run_dir, data.val_rows, probs, fold)
                    save_checkpoint(run_dir / "last.pt", state)
                    tracker.log({**{f"val/{k}": v for k, v in metrics.items() if k != "confusion"},
                                 "train/loss": stats["loss"], "train/images_per_s": row["images_per_s"],
                                 "train/data_wait": stats["data_wait"], "lr": row["lr"]}, step=epoch + 1)
                    tqdm.write(_epoch_line(cfg, fold, epoch, row, improved))
                if on_epoch is not None:
                    on_epoch(epoch, metrics)
        if best is None:
            raise UserError(f"{run_dir} finished without a completed epoch")
        d.barrier()  # rank 0 has written best.pt
        best_state = load_checkpoint(run_dir / "best.pt")
        tracker.summary({"best_epoch": best_epoch + 1, **{f"best/{k}": v for k, v in best_state["metrics"].items()
                                                          if k != "confusion"}})
        exit_code = 0
    except NonFiniteLoss as e:
        raise TrainingDiverged(f"{e}. Training stopped; {run_dir / 'last.pt'} keeps the last good epoch. "
                        "Try a lower lr (e.g. lr=1e-4) or class_balance=none") from None
    except torch.cuda.OutOfMemoryError:
        raise UserError(_out_of_memory(cfg, size)) from None
    finally:
        tracker.finish(exit_code)
        data.train_loader.close()
        data.val_loader.close()
    return FitResult(run_dir, best_epoch, abs(best) if cfg.monitor == "loss" else best,
                     best_state["metrics"], len(history), stopped_early, history)


def _check_free_space(cfg: Config, model: nn.Module, run_dir: Path) -> None:
    """Fail now, not after the first epoch, when best.pt + last.pt + a temporary copy would not fit."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    slots = {"sgd": 1 if cfg.momentum else 0, "adam": 2, "adamw": 2}[cfg.optimizer]
    needed = 3 * weights * (1 + slots)
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise UserError(f"only {free / 2**20:.0f} MiB free where {run_dir} lies; this run's checkpoints need about "
                        f"{needed / 2**20:.0f} MiB (best.pt, last.pt and a temporary copy). Free some space or "
                        "choose another runs_dir=")


def _out_of_memory(cfg: Config, size: int) -> str:
    smaller = max(1, cfg.batch_size // 2)
    return (f"the GPU ran out of memory training {cfg.arch} at batch_size={cfg.batch_size}, input {size} x {size}. "
            f"Try batch_size={smaller}" + ("" if cfg.amp else ", amp=true") + ", or a smaller input_size; "
            "resume=true continues from the last completed epoch")


def _prepare_run_dir(cfg: Config, run_dir: Path, d: Dist) -> dict | None:
    """Refuse to overwrite a run by accident; return the last.pt state when resuming. Rank 0 checks and
    prepares the folder; the other ranks wait for it, then read the same checkpoint."""
    last = run_dir / "last.pt"
    if not d.main:
        d.barrier()
        return load_checkpoint(last) if cfg.resume and last.is_file() else None
    try:
        return _prepare_on_main(cfg, run_dir, last)
    finally:
        d.barrier()


def _prepare_on_main(cfg: Config, run_dir: Path, last: Path) -> dict | None:
    if cfg.overwrite and run_dir.exists():
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        for old in run_dir.glob("pred_*"):  # predictions of the model being replaced
            old.unlink()
        shutil.rmtree(run_dir / "wandb", ignore_errors=True)
    elif last.is_file() and not cfg.resume:
        raise UserError(f"{run_dir} already holds a run. Continue it with resume=true, or start over with "
                        "overwrite=true (or choose another runs_dir=)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale_tmp in run_dir.glob(".*.tmp"):  # left by a process killed while writing a checkpoint
            stale_tmp.unlink()
        probe = run_dir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to the run folder {run_dir} ({e.strerror}); choose another runs_dir=") from None
    if cfg.resume and last.is_file():
        return load_checkpoint(last)
    if cfg.resume:
        log.warning("resume=true but %s has no last.pt: starting a new run", run_dir)
    return None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _stretch_cosine(scheduler, epochs: int) -> None:
    """A resumed run asked for another number of epochs: the cosine schedule continues over the new length from
    where it is, instead of climbing back up from zero after its old end (the loaded state keeps the old T_max)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) or scheduler.T_max == epochs:
        return
    old, scheduler.T_max = scheduler.T_max, epochs
    t = min(scheduler.last_epoch, epochs)
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * t / epochs)) / 2
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
    log.warning("epochs %d -> %d: the cosine schedule now spans %d epochs; it continues at lr %.3g", old, epochs,
                epochs, scheduler.optimizer.param_groups[0]["lr"])


def _check_same_split(state: dict, folds: FoldFile, run_dir: Path) -> None:
    """A resumed run must validate on the images it validated on before, never on ones it has trained on."""
    saved = state.get("fold_assignment")
    if saved and saved != folds.assignment:
        old = state.get("fold_file")
        what = (f"its fold file {folds.path} was made again since the run started" if str(old) == str(folds.path)
                else f"it was trained on the fold file {old}, and {folds.path}")
        raise UserError(f"cannot resume {run_dir}: {what} splits the images differently, so its validation fold "
                        "would hold images it trained on. Resume with the split it was trained on "
                        "(data.fold_file=FILE), or start over with overwrite=true")


def _config_for_resume(cfg: Config, state: dict, run_dir: Path) -> Config:
    saved, now = _flatten(state["config"]), _flatten(cfg.to_dict())
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise UserError(f"cannot resume {run_dir} with different settings ({detail}). Resume with the run's own "
                        "settings, or start over with overwrite=true")
    return cfg


@dataclass
class FoldData:
    train_loader: Loader
    val_loader: Loader
    val_rows: pd.DataFrame
    val_order: np.ndarray  # dataset rows this rank validates, in loader order
    class_weights: torch.Tensor | None
    batch: int  # per process


def _fold_data(cfg: Config, folds: FoldFile, fold: int, size: int, device: torch.device, d: Dist) -> FoldData:
    train_rows = folds.table[folds.table["fold"] != fold].reset_index(drop=True)
    val_rows = folds.table[folds.table["fold"] == fold].reset_index(drop=True)
    labels = train_rows["label"].to_numpy()
    if len(np.unique(labels)) < 2 or val_rows.empty:
        raise UserError(f"fold file {folds.path}: training needs both classes and a non-empty validation fold")
    if cfg.batch_size % d.world:
        raise UserError(f"batch_size={cfg.batch_size} is the global batch: it must divide by the {d.world} processes")
    counts = np.bincount(labels, minlength=2).astype(float)
    class_weights = sample_weights = None
    if cfg.class_balance == "loss":
        class_weights = torch.tensor(counts.sum() / (2 * counts), dtype=torch.float32)
    elif cfg.class_balance == "sampler":
        sample_weights = 1.0 / counts[labels]
    train_source = val_source = None
    if cfg.data.cache:
        paths = folds.table["path"].tolist()
        if d.main:  # one rank builds it, the others open it once it is there
            cache = image_cache(folds.data_root, paths, cfg.data.crop, size, cfg.data.cache_dir)
        d.barrier()
        if not d.main:
            cache = image_cache(folds.data_root, paths, cfg.data.crop, size, cfg.data.cache_dir)
        train_source, val_source = cache.source(train_rows["path"]), cache.source(val_rows["path"])
    transform = create_transform(cfg.aug) if cfg.augment_on == "cpu" else None
    train_ds = CellDataset(folds.data_root, train_rows["path"], labels, cfg.data.crop, size, transform, cfg.seed,
                           train_source)
    val_ds = CellDataset(folds.data_root, val_rows["path"], val_rows["label"], cfg.data.crop, size, None, cfg.seed,
                         val_source)
    pin, batch = device.type == "cuda", cfg.batch_size // d.world
    train_sampler = EpochSampler(len(train_ds), cfg.seed, True, sample_weights, d.rank, d.world)
    val_sampler = EpochSampler(len(val_ds), cfg.seed, False, None, d.rank, d.world)
    return FoldData(
        make_loader(train_ds, batch, train_sampler, cfg.data.num_workers, pin, drop_last=len(train_ds) > cfg.batch_size),
        make_loader(val_ds, batch, val_sampler, cfg.data.num_workers, pin),
        val_rows, val_sampler.order(), class_weights, batch,
    )


def _optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(cfg: Config, optimizer):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    return None


def _checkpoint(cfg, model, optimizer, scheduler, scaler, epoch, best, best_epoch, stale, wandb_id, metrics, folds):
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch, "best": best, "best_epoch": best_epoch, "stale": stale,
        "metrics": metrics, "config": cfg.to_dict(), "wandb_id": wandb_id,
        "fold_file": str(folds.path), "fold_fingerprint": folds.meta.get("fingerprint", ""),
        "fold_k": folds.k, "fold_assignment": folds.assignment, "leaky_split": folds.leaky, "saved_at": time.time(),
    }


def _write_oof(run_dir: Path, val_rows: pd.DataFrame, probs: np.ndarray, fold: int) -> None:
    oof = val_rows[["path", "subject", "label"]].assign(
        prob_all=probs[:, 1].round(6), pred=(probs[:, 1] >= 0.5).astype(int), fold=fold)
    write_csv(run_dir / "oof.csv", oof)


def _history_row(epoch: int, stats: dict, metrics: dict, optimizer, world: int = 1) -> dict:
    return {
        "epoch": epoch, "train_loss": round(stats["loss"], 6), "val_loss": round(metrics["loss"], 6),
        **{k: round(metrics[k], 6) for k in ("f1", "accuracy", "precision", "recall", "roc_auc")},
        "lr": optimizer.param_groups[0]["lr"], "seconds": round(stats["seconds"], 2),
        "images_per_s": round(world * stats["images"] / max(stats["seconds"], 1e-9), 1),
        "data_wait": round(stats["data_wait"], 4),
    }


def _epoch_line(cfg: Config, fold: int, epoch: int, row: dict, improved: bool) -> str:
    star = " *" if improved else ""
    return (f"{cfg.arch} fold{fold} epoch {epoch + 1:>3}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
            f"val_loss {row['val_loss']:.4f}  f1 {row['f1']:.4f}  acc {row['accuracy']:.4f}  "
            f"auc {row['roc_auc']:.4f}  {row['images_per_s']:.0f} img/s  wait {row['data_wait']:.0%}{star}")
