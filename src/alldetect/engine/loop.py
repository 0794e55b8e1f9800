"""One training epoch and batched inference: device placement, normalisation, AMP, progress bars."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from alldetect.data.transforms import IMAGENET_MEAN, IMAGENET_STD, sample_seed
from alldetect.engine.accel import pad_batch
from alldetect.errors import UserError

if TYPE_CHECKING:
    from alldetect.engine.optim import Schedule


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise UserError(f"device={setting} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={setting} but no CUDA GPU is available here; use device=cpu or device=auto")
    return device


class DeviceBatch:
    """Moves uint8 NCHW batches to the device and normalises them there (4x fewer bytes to copy)."""

    def __init__(self, device: torch.device, channels_last: bool, amp: bool):
        self.device = device
        self.cuda = device.type == "cuda"
        self.channels_last = channels_last and self.cuda
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.graphs = False  # the model runs as CUDA graphs (compile_mode=reduce-overhead): mark each step's start
        self.amp_dtype = None
        if amp and self.cuda:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def images(self, batch: torch.Tensor, augment=None, seed: int = 0) -> torch.Tensor:
        """uint8 N x H x W x 3 -> normalised float N x 3 x H x W on the device (channels_last in memory on
        CUDA). `augment(x01, seed)` runs on [0, 1] values."""
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # a view: NHWC memory = channels_last
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.to(torch.float32, memory_format=layout)
        if augment is not None:
            x = augment(x.div_(255), seed)
            return (x - self.mean) / self.std
        return x.sub_(self.mean * 255).mul_(1 / (self.std * 255))

    def ahead(self, batches):
        """The loader's batches with each one's copy to the GPU issued on a side stream one batch early, so that
        it overlaps the step before instead of queueing behind it (pinned memory makes the copy asynchronous).
        On the CPU the batches pass through unchanged."""
        if not self.cuda:
            yield from batches
            return
        stream, pending = torch.cuda.Stream(self.device), None
        for x, y, index in batches:
            with torch.cuda.stream(stream):
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(stream)
            if pending is not None:
                yield self._arrived(*pending)
            pending = (x, y, index, copied)
        if pending is not None:
            yield self._arrived(*pending)

    @staticmethod
    def _arrived(x, y, index, copied):
        current = torch.cuda.current_stream()
        current.wait_event(copied)
        x.record_stream(current)  # the allocator must not reuse the copy's memory while this stream reads it
        y.record_stream(current)
        return x, y, index

    def step_begin(self) -> None:
        """A new training step or batch: CUDA graphs may reuse the last one's output memory (torch.compile's
        reduce-overhead mode)."""
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    @property
    def needs_scaler(self) -> bool:
        return self.amp_dtype == torch.float16


def logits_of(output) -> torch.Tensor:
    """Some models (Inception with aux heads) return a tuple in training mode; the first is the logits."""
    return output[0] if isinstance(output, (tuple, list)) else output


CHECK_EVERY = 20  # updates between reads of the loss on the host: each read makes the CPU wait for the GPU


@dataclass
class Updater:
    """Turns batches' losses into optimiser updates: gradient accumulation (`accum` batches an update), clipping
    of the gradients' global norm, the learning rate of each update, mixup/cutmix and the moving average of the
    weights. `module` is the bare model (under DistributedDataParallel or torch.compile)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    loss_fn: Any  # an nn.Module, or timm's soft-target loss
    scaler: torch.amp.GradScaler | None = None
    accum: int = 1
    clip: float = 0.0
    ema: Any = None  # timm ModelEmaV3
    mixup: Any = None  # timm.data.Mixup

    def targets(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup / cutmix on the device. timm's Mixup draws from numpy's global generator: seed it per step (and
        restore it after), so a resumed run mixes the same pairs. timm pairs image i with image n-1-i and needs an
        even batch: of an odd batch, all images but the last are mixed (the config refuses batch_size=1, fold_data
        a batch of 1 per process, and a training loader drops its last, smaller batch)."""
        if self.mixup is None:
            return x, y
        if len(x) % 2:
            from timm.data.mixup import mixup_target

            alone = mixup_target(y[-1:], 2, 1.0, self.mixup.label_smoothing)
            if len(x) == 1:
                return x, alone
            mixed, target = self.targets(x[:-1], y[:-1], seed)
            return torch.cat([mixed, x[-1:]]), torch.cat([target, alone])
        state = np.random.get_state()
        np.random.seed(seed % 2**32)
        try:
            return self.mixup(x, y)
        finally:
            np.random.set_state(state)

    def step(self, update: int) -> None:
        """Apply the accumulated gradients as update number `update` of the run."""
        self.schedule.set(update)
        if self.clip:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.grad is not None], self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.module, step=update + 1)


def train_one_epoch(model: nn.Module, loader, updater: Updater, dev: DeviceBatch, *, epoch: int, seed: int,
                    updates_per_epoch: int, max_batches: int = 0, desc: str = "train", augment_batch=None,
                    reduce=None, stop=None, carry: dict | None = None, rank: int = 0, batches=None) -> dict:
    """Train one epoch (or, with `carry` from a stopped run, the rest of it: the loader already skips the
    steps done). Returns the mean loss, images, seconds, the fraction of time spent waiting for data, and
    `completed`; with `completed` False (a stop was requested) also the sums needed to carry on later.

    A stop is honoured only after a whole update (never inside an accumulation), so a resumed epoch starts on one.
    The loss is summed on the device and read every CHECK_EVERY updates, so the CPU queues work ahead instead of
    syncing each step; a NaN or infinite loss raises NonFiniteLoss then. `reduce` averages a number over
    data-parallel ranks, so every rank sees the same loss and stop request and they act together. `batches`: the
    loader's iterator when it was started early (fit starts the next epoch's before it validates)."""
    model.train()
    carry = carry or {"steps": 0, "loss_sum": 0.0, "images": 0, "seconds": 0.0, "wait": 0.0}
    first = carry["steps"]
    loss_sum = torch.tensor(carry["loss_sum"], dtype=torch.float64, device=dev.device)
    total_loss, images, wait = carry["loss_sum"], carry["images"], carry["wait"]
    n_batches = first + len(loader)
    n_batches = min(n_batches, max_batches) if max_batches else n_batches
    accum = updater.accum
    start = tick = time.perf_counter() - carry["seconds"]
    completed, step = True, first - 1
    updater.optimizer.zero_grad(set_to_none=True)
    bar = tqdm(total=n_batches, initial=first, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
               disable=None)
    with bar:  # closed also when a non-finite loss raises
        for step, (x, y, _) in enumerate(dev.ahead(loader if batches is None else batches), start=first):
            if step >= n_batches:
                step -= 1
                break
            wait += time.perf_counter() - tick
            step_seed = sample_seed(seed, epoch, step, rank)
            torch.manual_seed(step_seed)  # dropout, GPU augmentation, mixup: functions of (seed, epoch, step, process)
            x, y = dev.images(x, augment_batch, step_seed), y.to(dev.device, non_blocking=True)
            x, target = updater.targets(x, y, step_seed)
            dev.step_begin()
            group_end = min(step - step % accum + accum, n_batches)
            boundary = step + 1 == group_end
            loss = _backward(model, updater, dev, x, target, group_end - (step - step % accum), boundary)
            if boundary:
                updater.step(epoch * updates_per_epoch + step // accum)
            loss_sum += loss.detach().double() * len(y)
            images += len(y)
            check = boundary and ((step // accum + 1) % CHECK_EVERY == 0 or step + 1 == n_batches)
            stopping = stop is not None and boundary and (
                bool(stop) if reduce is None else check and reduce(float(bool(stop))) > 0)
            if check or stopping:
                total_loss = _finite_sum(loss_sum, reduce, epoch, step)
                bar.set_postfix(loss=f"{total_loss / images:.4f}",
                                img_s=f"{images / (time.perf_counter() - start):.1f}")
            bar.update()
            tick = time.perf_counter()
            if stopping and step + 1 < n_batches:
                completed = False
                break
    seconds = time.perf_counter() - start
    return {"loss": total_loss / max(images, 1), "images": images, "seconds": seconds,
            "data_wait": wait / seconds if seconds else 0.0, "completed": completed,
            "carry": {"steps": step + 1, "loss_sum": total_loss, "images": images, "seconds": seconds, "wait": wait}}


def _backward(model: nn.Module, updater: Updater, dev: DeviceBatch, x, target, share: int,
              boundary: bool) -> torch.Tensor:
    """One batch's loss and gradients, `1 / share` of its accumulation group's update. Under
    DistributedDataParallel the gradients are all-reduced only at the group's end (`boundary`)."""
    no_sync = getattr(model, "no_sync", None)
    sync = no_sync() if callable(no_sync) and not boundary else nullcontext()
    with sync:
        with dev.autocast():
            loss = updater.loss_fn(logits_of(model(x)), target)
        scaled = loss / share
        (updater.scaler.scale(scaled) if updater.scaler is not None else scaled).backward()
    return loss


def _finite_sum(loss_sum: torch.Tensor, reduce, epoch: int, step: int) -> float:
    """The epoch's summed loss so far (over every rank), read from the device; NonFiniteLoss when NaN or inf."""
    total = loss_sum.item() if reduce is None else reduce(loss_sum.item())
    if not math.isfinite(total):
        raise NonFiniteLoss(f"the training loss became {total} at epoch {epoch + 1} (by batch {step + 1})")
    return total


@torch.inference_mode()
def predict_probs(model: nn.Module, loader, dev: DeviceBatch, loss_fn=None, desc: str = "predict",
                  views=None, static: bool = False) -> tuple[np.ndarray, float]:
    """Softmax probabilities (N x classes) in loader order, and the mean loss when labels and loss_fn are
    given. `views` (test-time augmentation) maps a batch to a list of views whose softmax outputs are averaged.
    `static` (a compiled model): the last, shorter batch is padded to the loader's batch size, so that one
    compiled graph serves every batch."""
    model.eval()
    probs, total_loss, n = [], 0.0, 0
    pad_to = loader.batch_size if static else None
    for x, y, _ in tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=None):
        x = dev.images(x)
        dev.step_begin()
        with dev.autocast():
            batch_views = views(x) if views is not None else [x]
            logits = [logits_of(model(pad_batch(v, pad_to)))[:len(v)].float() for v in batch_views]
        p = torch.stack([torch.softmax(lg, dim=1) for lg in logits]).mean(0)
        if loss_fn is not None:
            total_loss += loss_fn(logits[0], y.to(dev.device)).item() * len(y)
        n += len(x)
        probs.append(p.cpu())
    out = torch.cat(probs).numpy() if probs else np.zeros((0, 2), np.float32)
    return out, total_loss / max(n, 1)
