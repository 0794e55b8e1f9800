"""One fold's training as stages, every epoch: train -> evaluate -> select -> persist -> report.

The trainer's state is one `FoldState` (how far it got, what it kept, the history so far); which weights become
best.pt is the selection policy's answer (engine/select.py), and early stopping is the policy's too. A `full` run
(every image trains) is the same trainer with no evaluations: nothing is scored, and the fixed schedule keeps the
final epoch. Under torchrun every rank runs every stage; only rank 0 writes (persist) and speaks (report).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from alldetect.atomic import write_csv
from alldetect.config import Config
from alldetect.data.folds import FoldFile
from alldetect.engine.distributed import Dist
from alldetect.engine.folddata import EvalSet, FoldData
from alldetect.engine.gpu_augment import BatchAugment
from alldetect.engine.loop import DeviceBatch, NonFiniteLoss, Updater, predict_probs, train_one_epoch
from alldetect.engine.optim import set_frozen
from alldetect.engine.rundir.files import (
    Checkpoint,
    PartialEpoch,
    Progress,
    RunDir,
    RunMeta,
    load_checkpoint,
    save_checkpoint,
)
from alldetect.engine.rundir.prepare import run_name
from alldetect.engine.select import SelectionPolicy
from alldetect.engine.setup import Model
from alldetect.engine.stopping import StopFlag, StopRequested, stop_on_signals
from alldetect.errors import UserError
from alldetect.metrics import METRIC_NAMES, score
from alldetect.tracking import Tracker

log = logging.getLogger("alldetect")

STAGE_DESC = {"outer": "validate", "inner": "select"}  # each evaluation's progress-bar label


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
class Scored:
    """One evaluation of one epoch: the probabilities of its images (dataset order) and their scores."""

    probs: np.ndarray
    metrics: dict


@dataclass
class FoldState:
    """What the epochs change: progress (saved in every checkpoint), the history so far, a half-done epoch to
    finish (from a stopped run), the next epoch's started loader, and whether early stopping ended the run."""

    progress: Progress = field(default_factory=Progress)
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    partial: PartialEpoch | None = None
    ahead: Iterator | None = None
    stopped_early: bool = False


@dataclass
class FoldTrainer:
    """Everything one fold's run trains with (built by engine/fit.py), and its epoch as stages."""

    cfg: Config
    fold: int | None
    folds: FoldFile
    run_dir: RunDir
    d: Dist
    data: FoldData
    model: Model
    optimizer: torch.optim.Optimizer
    updater: Updater
    dev: DeviceBatch
    policy: SelectionPolicy
    tracker: Tracker
    state: FoldState
    val_loss_fn: nn.Module
    augment: BatchAugment | None = None
    static: bool = False  # compiled on CUDA: evaluation pads its last batch so one graph serves every batch
    on_epoch: Callable[[int, dict], None] | None = None

    @property
    def evaluations(self) -> dict[str, EvalSet]:
        """The images scored after every epoch: the validation fold ('outer') and the inner split; none for full."""
        sets = {"outer": self.data.outer, "inner": self.data.inner}
        return {name: s for name, s in sets.items() if s is not None}

    def run(self) -> FitResult:
        """Every remaining epoch, then the result; a signal leaves a resumable last.pt and raises StopRequested."""
        with stop_on_signals() as stop:
            for epoch in range(self.state.progress.epoch + 1, self.cfg.epochs):
                if self.policy.should_stop(self.state.progress):
                    self.state.stopped_early = True
                    break
                self.check_stop(stop, f"after epoch {epoch}")
                stats = self.train(epoch, stop)
                scores = self.evaluate()
                chosen = self.select(epoch, scores)
                row = self.record(epoch, stats, scores, chosen)
                self.persist(epoch, scores, chosen)
                self.report(epoch, stats, row, scores, chosen)
        return self.finish()

    def check_stop(self, stop: StopFlag, where: str) -> None:
        """A signal between epochs: every rank stops together, with last.pt as the last epoch left it."""
        if (float(bool(stop)) if not self.d.enabled else self.d.mean(float(bool(stop)))) > 0:
            raise StopRequested(f"stopped by {stop.signal_name} {where}; {self.run_dir.last} holds it: continue with "
                                "the same command and resume=true")

    def train(self, epoch: int, stop: StopFlag) -> dict:
        """Stage 1: one epoch of updates (the rest of a half-done one on a resume). The next epoch's loader is
        started before evaluation, so its workers fetch while the device evaluates."""
        cfg, data, state = self.cfg, self.data, self.state
        if cfg.freeze_epochs:
            set_frozen(self.model.module, epoch < cfg.freeze_epochs)
        carry = state.partial.carry() if state.partial is not None and state.partial.epoch == epoch else None
        if state.ahead is None:  # the run's first epoch (the only one a resume can carry): start it here
            data.sampler.set_epoch(epoch, skip=carry["steps"] * data.batch if carry else 0)
            state.ahead = iter(data.train_loader)
        batches, state.ahead = state.ahead, None
        stats = train_one_epoch(self.model.forward, data.train_loader, self.updater, self.dev, epoch=epoch,
                                seed=cfg.seed, updates_per_epoch=self.updater.schedule.updates_per_epoch,
                                max_batches=cfg.max_batches, augment_batch=self.augment,
                                reduce=self.d.mean if self.d.enabled else None, stop=stop, carry=carry,
                                rank=self.d.rank, batches=batches,
                                desc=f"{cfg.arch} {run_name(self.fold)} epoch {epoch + 1}/{cfg.epochs}")
        if not stats["completed"]:  # a signal: keep the half-done epoch so that resume continues it
            if self.d.main:
                save_checkpoint(self.run_dir.last, self.checkpoint(None, PartialEpoch(epoch=epoch, **stats["carry"])))
            raise StopRequested(
                f"stopped by {stop.signal_name} in epoch {epoch + 1} after batch {stats['carry']['steps']}; "
                f"{self.run_dir.last} holds it: continue with the same command and resume=true")
        if epoch + 1 < cfg.epochs:
            data.sampler.set_epoch(epoch + 1)
            state.ahead = iter(data.train_loader)
        return stats

    def evaluate(self) -> dict[str, Scored]:
        """Stage 2: the weights that would be kept (the moving average, with ema) score every evaluation set."""
        scores = {}
        for name, which in self.evaluations.items():
            probs, loss = predict_probs(self.model.evaluated, which.loader, self.dev, self.val_loss_fn,
                                        desc=STAGE_DESC[name], static=self.static)
            probs = self.d.gather_rows(which.order, probs, len(which.rows))
            metrics = score(which.rows["label"], probs[:, 1])
            metrics["loss"] = self.d.mean(loss)
            scores[name] = Scored(probs, metrics)
        return scores

    def select(self, epoch: int, scores: dict[str, Scored]) -> bool:
        """Stage 3: the policy says whether this epoch's weights become best.pt."""
        progress = self.state.progress
        chosen = self.policy.chooses(epoch, {name: s.metrics for name, s in scores.items()}, progress)
        progress.epoch = epoch
        if chosen:
            progress.best_epoch = epoch
        return chosen

    def record(self, epoch: int, stats: dict, scores: dict[str, Scored], chosen: bool) -> dict:
        row = history_row(epoch, stats, _metrics(scores, "outer"), _metrics(scores, "inner"),
                          self.updater.schedule.lr, chosen, self.d.world)
        self.state.history = pd.concat([self.state.history, pd.DataFrame([row])], ignore_index=True)
        return row

    def persist(self, epoch: int, scores: dict[str, Scored], chosen: bool) -> None:
        """Stage 4 (rank 0): checkpoints first, so history.csv is never ahead of last.pt (which holds the history
        too: a kill before history.csv is written loses no row); a chosen epoch also writes best.pt and the kept
        model's predictions of each evaluation (oof.csv, inner.csv)."""
        if not self.d.main:
            return
        try:
            state = self.checkpoint(_metrics(scores, "outer"))
            if chosen:
                save_checkpoint(self.run_dir.best, replace(state, model=self.model.weights(), optimizer=None,
                                                           ema=None, scaler=None))
                for name, scored in scores.items():
                    assert self.fold is not None, "a full run evaluates nothing"
                    self.run_dir.write_scored(name == "inner", self.evaluations[name].rows, scored.probs, self.fold)
            save_checkpoint(self.run_dir.last, state)
            write_csv(self.run_dir.history, self.state.history)
        except UserError as e:
            raise UserError(f"training stopped in epoch {epoch + 1}: {e}. Make room (or raise the limit) and continue "
                            "with the same command and resume=true, from the last epoch last.pt holds") from None

    def report(self, epoch: int, stats: dict, row: dict, scores: dict[str, Scored], chosen: bool) -> None:
        """Stage 5: the epoch's line and W&B (rank 0); then `on_epoch` (Optuna's pruning), which may raise."""
        if self.d.main:
            logged = {f"{'val' if name == 'outer' else name}/{k}": v
                      for name, s in scores.items() for k, v in s.metrics.items() if k != "confusion"}
            self.tracker.log({**logged, "train/loss": stats["loss"], "train/images_per_s": row["images_per_s"],
                              "train/data_wait": stats["data_wait"], "lr": row["lr"]}, step=epoch + 1)
            tqdm.write(epoch_line(self.cfg, self.fold, row, chosen))
        if self.on_epoch is not None and "outer" in scores:
            self.on_epoch(epoch, scores["outer"].metrics)

    def checkpoint(self, metrics: dict | None, partial: PartialEpoch | None = None) -> Checkpoint:
        """last.pt as it stands now (best.pt: the same with the kept weights)."""
        folds, model = self.folds, self.model
        meta = RunMeta(config=self.cfg, run=run_name(self.fold), progress=self.state.progress.model_copy(),
                       metrics=metrics, fold_file=str(folds.path), fold_fingerprint=folds.meta.fingerprint,
                       fold_k=folds.k, fold_assignment=folds.assignment, leaky_split=folds.leaky, world=self.d.world,
                       updates_per_epoch=self.updater.schedule.updates_per_epoch,
                       train_images=self.data.train_images, partial=partial,
                       history=self.state.history.to_dict("records"))
        return Checkpoint(meta, model.module.state_dict(), self.optimizer.state_dict(),
                          model.ema.module.state_dict() if model.ema is not None else None,
                          self.updater.scaler.state_dict() if self.updater.scaler is not None else None)

    def finish(self) -> FitResult:
        progress = self.state.progress
        if progress.best_epoch < 0:
            done = progress.epoch + 1
            raise UserError(f"{self.run_dir} kept no weights: {done} epoch(s) were done before and epochs="
                            f"{self.cfg.epochs}" + (f" runs no more; resume with epochs={done + 1} or more"
                                                    if done >= self.cfg.epochs else ""))
        self.d.barrier()  # rank 0 has written best.pt
        kept = load_checkpoint(self.run_dir.best, mmap=True).meta.metrics or {}
        self.tracker.summary({"best_epoch": progress.best_epoch + 1,
                              **{f"best/{k}": v for k, v in kept.items() if k != "confusion"}})
        return FitResult(self.run_dir.path, progress.best_epoch, kept.get(self.cfg.monitor, float("nan")), kept,
                         len(self.state.history), self.state.stopped_early, self.state.history, self.cfg.select,
                         self.fold, self.data.train_images)

    def diverged(self, error: NonFiniteLoss) -> TrainingDiverged:
        epoch, last = self.state.progress.epoch, self.run_dir.last
        kept = (f"{last} keeps the last good epoch ({epoch + 1})" if epoch >= 0
                else f"{last} keeps the half-done first epoch" if last.is_file()
                else "no epoch finished, so no checkpoint was written")
        return TrainingDiverged(f"{error}. Training stopped; {kept}. Try a lower lr (e.g. lr=1e-4), clip_grad=1, or "
                                "class_balance=none")


def _metrics(scores: dict[str, Scored], name: str) -> dict | None:
    return scores[name].metrics if name in scores else None


def history_row(epoch: int, stats: dict, metrics: dict | None, inner: dict | None, lr: float, chosen: bool,
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


def epoch_line(cfg: Config, fold: int | None, row: dict, chosen: bool) -> str:
    inner = f"  inner f1 {row['inner_f1']:.4f}" if "inner_f1" in row else ""
    star = " *" if chosen and cfg.select in ("inner", "outer") else ""
    val = (f"val_loss {row['val_loss']:.4f}  f1 {row['f1']:.4f}  acc {row['accuracy']:.4f}  auc {row['roc_auc']:.4f}"
           if "f1" in row else "(nothing validated)")
    return (f"{cfg.arch} {run_name(fold)} epoch {row['epoch'] + 1:>3}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
            f"{val}{inner}  lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s  wait {row['data_wait']:.0%}{star}")
