"""The one place that talks to Weights & Biases. One W&B run per (architecture, fold) or tuning trial,
grouped by study; offline unless WANDB_MODE or `wandb=online` says otherwise; `wandb=off` disables it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from alldetect.errors import UserError

log = logging.getLogger("alldetect")
PROJECT = "alldetect"


class Tracker:
    """Does nothing: used for wandb=off, on non-zero ranks, and as the interface."""

    run_id: str | None = None
    where: str = "W&B off"

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, mode: str, run_dir: Path, name: str, group: str, config: dict, job_type: str,
                 resume_id: str | None = None):
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True,
                                  init_timeout=120)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=name, group=group,
                                  job_type=job_type, dir=str(run_dir), config=config, mode=mode,  # type: ignore[arg-type]
                                  id=resume_id, resume="allow" if resume_id else None,
                                  reinit="create_new", settings=settings)
        except Exception as e:  # wandb raises its own error types for login and network problems
            raise UserError(f"W&B could not start a {mode} run ({type(e).__name__}: {str(e)[:300]}). "
                            "Run `wandb login` for online runs, or use wandb=offline or wandb=off") from None
        self.run_id = self.run.id
        self.where = f"W&B {mode} run {self.run.id} in {Path(self.run.dir).parent}"

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def resolve_mode(setting: str) -> str:
    """auto -> $WANDB_MODE (online, offline, disabled) or offline."""
    if setting != "auto":
        return setting
    env = os.environ.get("WANDB_MODE", "offline").lower()
    return {"disabled": "off", "dryrun": "offline", "run": "online"}.get(env, env)


def start_tracker(setting: str, run_dir: Path, name: str, group: str, config: dict, job_type: str = "train",
                  resume_id: str | None = None) -> Tracker:
    mode = resolve_mode(setting)
    if mode == "off":
        return Tracker()
    if mode not in ("offline", "online"):
        raise UserError(f"W&B mode '{mode}' (from WANDB_MODE or wandb=) is not one of online, offline, off")
    return WandbTracker(mode, run_dir, name, group, config, job_type, resume_id)
