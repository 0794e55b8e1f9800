"""A run folder before training: refuse to overwrite a run by accident, check that a resume continues the same
experiment on the same split, and that the checkpoints will fit on the disk."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from torch import nn

from alldetect.atomic import check_writable
from alldetect.config import RESUMABLE_ROLES, Config, flatten, keys_with_role
from alldetect.data.folds import FoldFile
from alldetect.engine.distributed import Dist
from alldetect.engine.rundir.files import Checkpoint, RunDir, load_checkpoint
from alldetect.errors import UserError

log = logging.getLogger("alldetect")

# Keys that may change when a run is resumed (config.RESUMABLE_ROLES); any other difference is another experiment.
RESUMABLE_CHANGES = keys_with_role(RESUMABLE_ROLES)


def run_name(fold: int | None) -> str:
    """fold3 -> 'fold3'; None (trained on every image) -> 'full'."""
    return "full" if fold is None else f"fold{fold}"


def run_dir_for(cfg: Config, fold: int | None) -> RunDir:
    return RunDir(Path(cfg.runs_dir) / cfg.arch / run_name(fold))


def prepare_run_dir(cfg: Config, run_dir: RunDir, d: Dist) -> Checkpoint | None:
    """Refuse to overwrite a run by accident; return last.pt when resuming. Rank 0 checks and prepares the
    folder; the other ranks wait for it, then read the same checkpoint."""
    if not d.main:
        d.barrier()
        return load_checkpoint(run_dir.last) if cfg.resume and run_dir.last.is_file() else None
    try:
        return _prepare_on_main(cfg, run_dir)
    finally:
        d.barrier()


def _prepare_on_main(cfg: Config, run_dir: RunDir) -> Checkpoint | None:
    results, last = run_dir.results(), run_dir.last
    if cfg.overwrite and run_dir.path.exists():
        run_dir.remove_results()
    elif results and not cfg.resume:
        raise UserError(f"{run_dir} already holds a run ({', '.join(results)}). Continue it with resume=true, or "
                        "start over with overwrite=true (or choose another runs_dir=)")
    elif results and cfg.resume and not last.is_file():
        raise UserError(f"cannot resume {run_dir}: its last.pt is gone (it holds {', '.join(results)}). Start "
                        "over with overwrite=true (or choose another runs_dir=)")
    check_writable(run_dir.path, "the run folder")
    for stale_tmp in run_dir.stale_temporary_files():  # left by a process killed while writing a checkpoint
        stale_tmp.unlink()
    if cfg.resume and last.is_file():
        return load_checkpoint(last)
    if cfg.resume:
        log.warning("resume=true but %s has no last.pt: starting a new run", run_dir)
    return None


def check_resume(cfg: Config, state: Checkpoint, folds: FoldFile, run_dir: RunDir) -> None:
    """A resumed run must be the same experiment (only RESUMABLE_CHANGES may differ) and validate on the images
    it validated on before, never on ones it has trained on."""
    meta = state.meta
    if meta.version == 0:
        raise UserError(f"cannot resume {run_dir}: it was made by an older alldetect (before select=, the moving "
                        "average and per-update schedules), which this version cannot continue exactly. Start over "
                        "with overwrite=true")
    saved, now = flatten(meta.config.to_dict()), flatten(cfg.to_dict())  # keys added since read as their defaults
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise UserError(f"cannot resume {run_dir} with different settings ({detail}). Resume with the run's own "
                        "settings, or start over with overwrite=true")
    assigned = meta.fold_assignment
    if assigned and assigned != folds.assignment:
        old = meta.fold_file
        what = (f"its fold file {folds.path} was made again since the run started" if str(old) == str(folds.path)
                else f"it was trained on the fold file {old}, and {folds.path}")
        raise UserError(f"cannot resume {run_dir}: {what} splits the images differently, so its validation fold "
                        "would hold images it trained on. Resume with the split it was trained on "
                        "(data.fold_file=FILE), or start over with overwrite=true")


def check_free_space(cfg: Config, model: nn.Module, run_dir: RunDir) -> None:
    """Fail now, not after the first epoch, when best.pt + last.pt + a temporary copy would not fit."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    slots = {"sgd": 1 if cfg.momentum else 0, "momentum": 1 if cfg.momentum else 0}.get(cfg.optimizer, 2)
    needed = 3 * weights * (1 + slots + int(cfg.ema))
    free = shutil.disk_usage(run_dir.path).free
    if free < needed:
        raise UserError(f"only {free / 2**20:.0f} MiB free where {run_dir} lies; this run's checkpoints need about "
                        f"{needed / 2**20:.0f} MiB (best.pt, last.pt and a temporary copy). Free some space or "
                        "choose another runs_dir=")
