"""Which weights a run keeps (`select=`), decided without looking at the images its scores are reported on.

  inner  a subject-grouped validation split carved out of the training folds picks the epoch (and early stopping)
  last   a fixed schedule: the final weights
  ema    a fixed schedule: the final exponential moving average of the weights
  outer  the epoch that scores best on the validation fold itself: its scores on that fold are OPTIMISTIC
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from alldetect.config import Config
from alldetect.engine.rundir.files import Progress
from alldetect.errors import UserError

OPTIMISTIC = "OPTIMISTIC: the epoch was chosen on the very images it is scored on (select=outer)"


def selection_label(configs: Iterable[Config]) -> str:
    """How some runs chose their weights, e.g. "last" or "outer (OPTIMISTIC)" (runs from before select= count as
    outer: they kept the epoch that scored best on the validation fold)."""
    modes = sorted({c.select for c in configs})
    text = "/".join(modes)
    return f"{text} (OPTIMISTIC)" if "outer" in modes else text


def selection_text(select: str, monitor: str) -> str:
    return {
        "inner": f"the epoch with the best {monitor} on an inner split of the training folds",
        "last": "the final weights of a fixed schedule",
        "ema": "the final moving average of the weights (fixed schedule)",
        "outer": f"the epoch with the best {monitor} on this validation fold: OPTIMISTIC",
    }[select]


class FixedSchedule:
    """select=ema or last: the final epoch's weights are kept; no score decides and nothing stops early."""

    judge: str | None = None  # which evaluation's scores decide: none

    def __init__(self, cfg: Config):
        self.last_epoch = cfg.epochs - 1

    def chooses(self, epoch: int, scores: dict[str, dict], progress: Progress) -> bool:
        return epoch == self.last_epoch

    def should_stop(self, progress: Progress) -> bool:
        return False


class BestEpoch:
    """select=inner or outer: the epoch whose `monitor` is best on that evaluation (higher is better, except for
    the loss) is kept; `patience` epochs without a better one stop the run (0: never)."""

    def __init__(self, cfg: Config, judge: str):
        self.judge, self.monitor, self.patience = judge, cfg.monitor, cfg.patience

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best if self.monitor == "loss" else value > best

    def chooses(self, epoch: int, scores: dict[str, dict], progress: Progress) -> bool:
        """Whether this epoch's weights become best.pt; keeps the best score and the epochs since it in progress."""
        value = scores[self.judge][self.monitor]
        chosen = self.better(value, progress.best)
        progress.stale = 0 if chosen else progress.stale + 1
        if chosen:
            progress.best = value
        return chosen

    def should_stop(self, progress: Progress) -> bool:
        return progress.stale >= self.patience > 0


SelectionPolicy = FixedSchedule | BestEpoch


def selection_policy(cfg: Config) -> SelectionPolicy:
    return BestEpoch(cfg, cfg.select) if cfg.select in ("inner", "outer") else FixedSchedule(cfg)


def carve_inner(rows: pd.DataFrame, share: float, seed: int, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the training rows of one fold into (fit, inner) by subject: for each class, whole subjects in a
    seeded random order go to the inner split until it holds about `share` of that class's images, at least one
    subject, and never the last one."""
    rng = np.random.default_rng([seed, fold, 7])
    inner_subjects: list[str] = []
    for label, group in rows.groupby("label"):
        sizes = group.groupby("subject").size()
        if len(sizes) < 2:
            name = "all" if label == 1 else "hem"
            raise UserError(
                f"select=inner needs two or more subjects of each class in the training folds of fold{fold}, and "
                f"they hold one '{name}' subject ({sizes.index[0]}). Use select=last (a fixed schedule), or a "
                "split with fewer folds")
        order = sizes.index.to_numpy()[rng.permutation(len(sizes))]
        taken = 0
        for subject in order[:-1]:
            inner_subjects.append(subject)
            taken += sizes[subject]
            if taken >= share * sizes.sum():
                break
    inner = rows["subject"].isin(inner_subjects)
    return rows[~inner].reset_index(drop=True), rows[inner].reset_index(drop=True)
