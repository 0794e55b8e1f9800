"""`alldetect tune ARCH`: an Optuna study of one architecture's hyperparameters.

Each trial is a real `fit_fold` run per requested fold under runs/tune/<study>/trial<n>/fold<k>/, reports the
validation weighted F1 after every epoch to the pruner, and scores the mean over folds of the kept
checkpoint's weighted F1. Studies live in studies/<study>.db (SQLite) or in any storage URL: several
workers pointed at one PostgreSQL database share one study. Heartbeats mark a killed worker's trial failed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml

from alldetect.atomic import write_text
from alldetect.config import (
    STUDY_RUNTIME_ROLES,
    Config,
    configs_dir,
    deep_merge,
    flatten,
    keys_with_role,
    load_config,
    nest,
    validate,
)
from alldetect.data.folds import FoldFile
from alldetect.data.prepare import data_line, resolve_folds
from alldetect.engine.fit import fit_fold
from alldetect.engine.rundir.files import RunDir
from alldetect.engine.train import resolve_config
from alldetect.errors import UserError
from alldetect.options import PRUNERS
from alldetect.search_space import SearchSpace

log = logging.getLogger("alldetect")

# Settings that may differ between the workers and the runs of one study (config.STUDY_RUNTIME_ROLES).
RUNTIME_KEYS = keys_with_role(STUDY_RUNTIME_ROLES)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Optuna's TPE seeded with seed + trial number. The same study replays the same first trials, a resumed
    study does not repeat its earlier proposals, and workers started together (each with its own trial
    numbers) do not propose the same point, as one TPESampler(seed=seed) per process would."""

    def __init__(self, seed: int):
        self.seed = seed
        self._tpe = self._make(0)

    def _make(self, number: int) -> optuna.samplers.TPESampler:
        return optuna.samplers.TPESampler(seed=self.seed + number, constant_liar=True)

    def before_trial(self, study, trial):
        self._tpe = self._make(trial.number)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self._tpe.after_trial(study, trial, state, values)


def trial_base(arch: str, overrides: list[str], files: list[str]) -> tuple[Config, bool, FoldFile]:
    """The settings every trial starts from, whether they are the demo data's, and the verified fold file."""
    cfg, demo = resolve_config(arch, overrides, files)
    if demo:  # shorter trials on the synthetic data: configs/demo-tune.yaml after the demo profile
        demo_tune = configs_dir() / "demo-tune.yaml"
        cfg = load_config(arch, [*overrides, f"data.root={cfg.data.root}"], [demo_tune, *files], profile="demo")
        print(f"tuning on the demo data: {shown_path(demo_tune)} after the demo profile (epochs={cfg.epochs})")
    fold_file = resolve_folds(cfg)
    print(data_line(cfg, fold_file), flush=True)
    if cfg.data.root is None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": str(fold_file.data_root)})})
    return cfg, demo, fold_file


def shown_path(path: str | Path) -> Path:
    """A path as the user would type it: relative to the current folder when it lies inside it."""
    try:
        return Path(path).resolve().relative_to(Path.cwd())
    except ValueError:
        return Path(path)


def safe_url(url: str) -> str:
    """The storage URL without its password, for messages and files."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: say it as given
        return url


@contextlib.contextmanager
def storage_errors(url: str, doing: str, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Database trouble reaches users as one line naming the URL, never as a SQLAlchemy traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    caught: tuple[type[BaseException], ...] = (SQLAlchemyError, optuna.exceptions.StorageInternalError, *also)
    try:
        yield
    except caught as e:
        cause: BaseException = e
        while isinstance(cause, (optuna.exceptions.StorageInternalError, ImportError)) and cause.__cause__:
            cause = cause.__cause__  # Optuna's wrapper -> SQLAlchemy's or the import's own error
        cause = getattr(cause, "orig", None) or cause  # SQLAlchemy's -> the database driver's message
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0].rstrip(".")
        raise UserError(f"{doing} the study storage {safe_url(url)}: {reason}. Check the URL and that its database "
                        "server is running and reachable (for SQLite: that the file's folder exists)") from None


@contextlib.contextmanager
def quiet_experimental() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def driver_url(url: str) -> str:
    """postgresql:// -> postgresql+psycopg2://: the driver alldetect installs (SQLAlchemy 2.1 would pick psycopg 3)."""
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return "postgresql+psycopg2://" + url.removeprefix(bare)
    return url


def open_storage(url: str, heartbeat: int) -> optuna.storages.RDBStorage:
    engine: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        engine = {"connect_args": {"timeout": 60}}  # workers sharing one file wait for its lock
    elif url.startswith("postgres"):
        engine = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    with storage_errors(url, "cannot open", also=(ImportError, ValueError)), quiet_experimental():
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(driver_url(url), engine_kwargs=engine,
                                                  heartbeat_interval=heartbeat, grace_period=2 * heartbeat)
            except Exception as e:
                if attempt == 4 or not _lost_creation_race(e):
                    raise
                time.sleep(0.2 + random.random())  # another worker is making the same tables: use theirs
    raise AssertionError("unreachable: the fifth attempt returns or raises")


def _lost_creation_race(e: Exception) -> bool:
    """Two workers that open a new database at once both create Optuna's tables and bookkeeping rows (schema
    version, alembic stamp); one of them loses with a duplicate row or table."""
    from sqlalchemy.exc import DBAPIError, IntegrityError

    return isinstance(e, IntegrityError) or (isinstance(e, DBAPIError) and "already exists" in str(e).lower())


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"--pruner {name}: choose one of {', '.join(PRUNERS)}")


def open_study(name: str, url: str, heartbeat: int, pruner: str, seed: int) -> optuna.Study:
    """Create the study, or load it when it exists (re-running a command resumes its study)."""
    # Optuna logs a failed trial with its traceback; alldetect reports trials itself (print_trial, error:).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    the_pruner = make_pruner(pruner)
    storage = open_storage(url, heartbeat)
    with storage_errors(url, "cannot open", also=(ImportError, ValueError)):
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                    sampler=TrialSeededSampler(seed), pruner=the_pruner)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise UserError(f"study '{name}' in {safe_url(url)} minimises its objective; it was not made by "
                        "alldetect tune. Choose another --study NAME")
    return study


def study_identity(cfg: Config, search: SearchSpace, folds: list[int], fold_file: FoldFile) -> dict[str, Any]:
    """What makes two trials comparable: stored with the study, checked whenever a worker joins it."""
    split = fold_file.table[["path", "label", "fold"]].sort_values("path").to_csv(index=False)
    settings = {k: v for k, v in flatten(cfg.to_dict()).items() if k not in RUNTIME_KEYS | set(search.params)}
    return {"arch": cfg.arch, "folds": folds, "split": hashlib.sha256(split.encode()).hexdigest()[:16],
            "search_space": search.params, "settings": settings}


def check_study_matches(study: optuna.Study, url: str, identity: dict[str, Any]) -> None:
    """A study is one objective: refuse to add trials of another architecture, space, split or recipe."""
    stored = study.user_attrs
    if not stored.get("alldetect"):
        if study.trials:
            raise UserError(f"study '{study.study_name}' in {safe_url(url)} already has trials that alldetect tune "
                            "did not make. Choose another --study NAME")
        for key, value in identity.items():
            study.set_user_attr(key, value)
        study.set_user_attr("alldetect", True)  # last: a worker joining meanwhile sees the whole identity or none
        return
    where = f"study '{study.study_name}' in {safe_url(url)}"
    fix = "Use the study's own settings, or start a new study with --study NAME"
    old_space, new_space = stored.get("search_space") or {}, identity["search_space"]
    if old_space != new_space:
        keys = sorted(k for k in set(old_space) | set(new_space) if old_space.get(k) != new_space.get(k))
        detail = "".join(f"\n  {k}: {_flow(old_space.get(k))} -> {_flow(new_space.get(k))}" for k in keys)
        raise UserError(f"{where} has a different search space (study -> now):{detail}\n{fix}")
    for key, what in (("arch", "architecture"), ("folds", "validation folds"), ("split", "fold file (data or split)")):
        if stored.get(key) != identity[key]:
            raise UserError(f"{where} was made with another {what} ({stored.get(key)} -> {identity[key]}). {fix}")
    old, new = stored.get("settings", {}), identity["settings"]
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise UserError(f"{where} was made with other settings ({detail}), so its scores would not compare. {fix}")


def _flow(spec: dict | None) -> str:
    if spec is None:
        return "(absent)"
    return yaml.safe_dump(spec, default_flow_style=True, sort_keys=False, width=10_000).strip()


def make_objective(base: Config, search: SearchSpace, folds: FoldFile, wanted: list[int], study_name: str):
    # Steps of later folds follow the earlier folds' epochs, so each step compares one fold and epoch.
    searched_epochs = search.params.get("epochs", {})
    steps_per_fold = max([base.epochs, searched_epochs.get("high", 0), *searched_epochs.get("choices", [])])

    def objective(trial: optuna.Trial) -> float:
        params = search.suggest(trial)
        cfg = validate(deep_merge(base.to_dict(), nest(params)), where=f"trial {trial.number}")
        trial_dir = Path(cfg.runs_dir) / "tune" / study_name / f"trial{trial.number}"
        trial.set_user_attr("run_dir", str(trial_dir))
        scores = []
        for i, fold in enumerate(wanted):
            run_dir = RunDir(trial_dir / f"fold{fold}")
            if run_dir.last.is_file():
                raise UserError(f"{run_dir} already holds a run of an earlier study named '{study_name}' (was its "
                                f"storage deleted?). Move {trial_dir.parent} away, or choose another --study NAME")

            def report(epoch: int, metrics: dict, i: int = i, fold: int = fold) -> None:
                trial.report(metrics["f1"], step=i * steps_per_fold + epoch)
                if trial.should_prune():
                    where = f"weighted F1 {metrics['f1']:.4f} at fold{fold} epoch {epoch + 1}"
                    trial.set_user_attr("pruned_at", where)
                    raise optuna.TrialPruned(where)

            try:
                result = fit_fold(cfg, fold, folds, run_dir, on_epoch=report, job_type="tune",
                                  wandb_name=f"{study_name}-trial{trial.number}-fold{fold}")
            except UserError as e:
                trial.set_user_attr("error", str(e))
                raise
            scores.append(result.metrics["f1"])
            trial.set_user_attr(f"fold{fold}_f1", result.metrics["f1"])
            trial.set_user_attr(f"fold{fold}_best_epoch", result.best_epoch + 1)
        return float(np.mean(scores))

    return objective


def print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    if trial.state == optuna.trial.TrialState.COMPLETE:
        best = best_trial(study)
        line = f"trial {trial.number} finished: weighted F1 {trial.value:.4f} ({params})"
        if best is not None:
            line += f"; best so far: trial {best.number} ({best.value:.4f})"
    elif trial.state == optuna.trial.TrialState.PRUNED:
        line = f"trial {trial.number} pruned ({params}): {trial.user_attrs.get('pruned_at', 'by the pruner')}"
    else:
        line = f"trial {trial.number} failed ({params}): {trial.user_attrs.get('error', 'see the log above')}"
    print(line, flush=True)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    # The lowest number wins a tie, so every worker names the same best trial.
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def study_summary(study: optuna.Study, url: str, folds: list[int], demo: bool) -> str:
    states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    counts = ", ".join(f"{states.count(s)} {s}" for s in ("complete", "pruned", "fail", "running") if s in states)
    lines = [f"\nstudy '{study.study_name}' in {safe_url(url)}: {len(states)} trial(s) ({counts or 'none yet'})"]
    best = best_trial(study)
    if best is None:
        lines.append("no trial has completed yet, so there is no best trial and no tuned config")
        return "\n".join(lines)
    on = ", ".join(f"fold{f}" for f in folds)
    note = "  (SYNTHETIC demo data)" if demo else ""
    lines.append(f"best: trial {best.number}, mean weighted F1 {best.value:.4f} on {on}{note}")
    lines += [f"  {k}: {_short(v)}" for k, v in best.params.items()]
    lines.append(f"  runs: {best.user_attrs.get('run_dir', '?')}")
    return "\n".join(lines)


def write_tuned_config(path: Path, arch: str, best: optuna.trial.FrozenTrial, study: str, url: str, n_trials: int,
                       folds: list[int], demo: bool) -> None:
    """Only the tuned keys, under a header that says where they come from."""
    on = ", ".join(f"fold{f}" for f in folds)
    header = [
        f"# Tuned by `alldetect tune {arch}`: study '{study}' in {safe_url(url)}, best of {n_trials} trial(s):",
        f"# trial {best.number}, mean weighted F1 {best.value:.4f} on {on}"
        + (" of the SYNTHETIC demo data (demo profile)." if demo else "."),
        "# Only the tuned keys; the rest comes from base.yaml and the architecture's file (the layers of any run).",
        f"# Use: ./train.sh {arch} fold0 tuned=true   (or --config {path})",
    ]
    write_text(path, "\n".join(header) + "\n" + yaml.safe_dump(nest(best.params), sort_keys=False))
