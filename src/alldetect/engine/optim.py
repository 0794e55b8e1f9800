"""Optimiser, learning-rate schedule and backbone freezing, from timm's factories.

The schedule is a pure function of the optimiser update (warm-up, then the decay), set before every update:
a resumed run, even one resumed mid-epoch or with more epochs, gets its learning rate from where it is, with
nothing to restore or patch.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from alldetect.config import Config
from alldetect.engine.accel import fused_args
from alldetect.errors import UserError

log = logging.getLogger("alldetect")

WARMUP_START = 1 / 25  # warm-up (and one-cycle) starts at lr / 25, as torch's OneCycleLR does
ONECYCLE_WARMUP = 0.3  # one-cycle: the learning rate rises over the first 30 % of the run, unless warmup_epochs


def create_optimizer(cfg: Config, model: nn.Module):
    """timm's `create_optimizer_v2`: no weight decay on biases and norms; `layer_decay` scales each layer
    group's learning rate by layer_decay ** (groups after it), so the head learns fastest."""
    from timm.optim import create_optimizer_v2, list_optimizers

    if cfg.optimizer not in list_optimizers():
        raise UserError(f"optimizer={cfg.optimizer} is not one of timm's optimisers; use sgd, adam, adamw, or "
                        "another of timm.optim.list_optimizers()")
    extra: dict[str, Any] = {"momentum": cfg.momentum} if cfg.optimizer in ("sgd", "momentum") else {}
    # timm's "sgd" is Nesterov SGD; the report's (Keras') SGD and `momentum` here are plain
    name = "momentum" if cfg.optimizer == "sgd" else cfg.optimizer
    first = next(model.parameters(), None)
    if first is not None:  # one fused update (engine/accel.py)
        extra.update(fused_args(name, first.device))
    if cfg.lr_stages:
        return create_optimizer_v2(stage_groups(model, cfg.lr_stages, cfg.weight_decay), name, lr=cfg.lr,
                                   weight_decay=cfg.weight_decay, **extra)
    return create_optimizer_v2(model, name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               layer_decay=cfg.layer_decay, **extra)


def stage_groups(model: nn.Module, stages: list[float], weight_decay: float) -> list[dict]:
    """Parameter groups with one learning rate per coarse layer group (timm's group_matcher(coarse=True): for a
    ResNet the stem, its 4 stages and the head), as Prellberg and Kramer trained SE-ResNeXt50 for C-NMC (1e-6 for
    the stem and first stage, 1e-4 for the others, 1e-2 for the head). Each rate is an `lr_scale` of the peak, so
    warm-up and decay move all of them together. No weight decay on biases and norms, as timm does."""
    from timm.models import group_parameters

    matcher = getattr(model, "group_matcher", None)
    if not callable(matcher):
        raise UserError(f"lr_stages: {type(model).__name__} has no layer groups; use lr (and layer_decay) instead")
    groups = group_parameters(model, matcher(coarse=True))
    if len(groups) != len(stages):
        raise UserError(f"lr_stages has {len(stages)} learning rates but this network has {len(groups)} layer groups "
                        f"(stem to head; they begin with {', '.join(names[0] for names in groups.values())}): give "
                        f"{len(groups)}")
    params = dict(model.named_parameters())
    peak = max(stages)
    out = []
    for (_, names), lr in zip(groups.items(), stages):
        trainable = [n for n in names if params[n].requires_grad]
        decay = [params[n] for n in trainable if params[n].ndim > 1]
        no_decay = [params[n] for n in trainable if params[n].ndim <= 1]
        out += [{"params": ps, "weight_decay": wd, "lr_scale": lr / peak}
                for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
    return out


class Schedule:
    """The learning rate of every update: timm's scheduler (cosine, step or constant) stepped per update, with
    `warmup_epochs` of linear warm-up from lr/25 inside the run's `epochs`."""

    def __init__(self, cfg: Config, optimizer, updates_per_epoch: int):
        from timm.scheduler import create_scheduler_v2

        self.updates_per_epoch = updates_per_epoch
        warmup = cfg.warmup_epochs
        if warmup is None:
            warmup = ONECYCLE_WARMUP * cfg.epochs if cfg.scheduler == "onecycle" else 0.0
        if warmup >= cfg.epochs:
            raise UserError(f"warmup_epochs={warmup:g} must be shorter than the run (epochs={cfg.epochs})")
        sched = {"none": "constant", "onecycle": "cosine"}.get(cfg.scheduler, cfg.scheduler)
        self.scheduler, _ = create_scheduler_v2(  # timm takes fractional epochs, though typed int
            optimizer, sched=sched, num_epochs=cfg.epochs - warmup, warmup_epochs=warmup,  # type: ignore[arg-type]
            warmup_prefix=True,
            warmup_lr=cfg.lr * WARMUP_START if warmup else cfg.lr, min_lr=cfg.min_lr, decay_epochs=cfg.step_size,
            decay_rate=cfg.gamma, step_on_epochs=False, updates_per_epoch=updates_per_epoch)
        self.optimizer = optimizer

    def set(self, update: int) -> None:
        """Set every parameter group's learning rate for update number `update` (0-based, over the run)."""
        self.scheduler.step_update(update)

    @property
    def lr(self) -> float:
        """The largest learning rate of the groups (the head's under layer_decay)."""
        return max(g["lr"] for g in self.optimizer.param_groups)


def head_prefix(model: nn.Module) -> str:
    """The name of the model's classification head: timm records it; alldetect's own models call it classifier."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "classifier"


def set_frozen(model: nn.Module, frozen: bool) -> int:
    """Freeze (or unfreeze) everything but the head; returns how many parameters train. Batch-norm statistics
    keep adapting (the layers stay in training mode)."""
    head = head_prefix(model)
    heads = (head,) if isinstance(head, str) else tuple(head)
    trainable = 0
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen or name.startswith(heads))
        trainable += p.numel() if p.requires_grad else 0
    if trainable == 0:
        raise UserError(f"freeze_epochs: no parameter of the head '{head}' found in {type(model).__name__}")
    return trainable
