"""`alldetect tune ARCH`: an Optuna study over the search space, each trial trained on the chosen folds (the study
itself: alldetect.tune)."""

from __future__ import annotations

import re
from pathlib import Path

import optuna

from alldetect.atomic import check_writable
from alldetect.config import (
    tuned_config_path,
)
from alldetect.engine.fit import TrainingDiverged
from alldetect.engine.train import parse_fold_spec
from alldetect.errors import UserError
from alldetect.search_space import load_search_space, space_file
from alldetect.tune import (
    best_trial,
    check_study_matches,
    make_objective,
    open_study,
    print_trial,
    quiet_experimental,
    safe_url,
    shown_path,
    storage_errors,
    study_identity,
    study_summary,
    trial_base,
    write_tuned_config,
)

STUDY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def tune_command(arch: str, overrides: list[str], files: list[str] | None = None, *, trials: int = 20,
                 folds: str = "fold0", study: str | None = None, storage: str | None = None,
                 space: str | None = None, pruner: str = "median", timeout: float | None = None,
                 heartbeat: int = 60, out: str | None = None) -> optuna.Study:
    if trials < 0:
        raise UserError(f"--trials {trials}: give the number of trials to add (0 only reports the study)")
    if study is not None and not (STUDY_RE.match(study) and len(study) <= 100):
        raise UserError(f"--study {study!r}: use up to 100 letters, digits, '.', '_' or '-', starting with a letter or "
                        "digit (it names studies/<study>.db and runs/tune/<study>/, so it cannot be a path), "
                        "e.g. --study resnet50-lr")
    if heartbeat < 1:
        raise UserError(f"--heartbeat {heartbeat}: give the seconds between heartbeats (1 or more)")
    if out:  # every output place is checked before any work
        check_writable(Path(out).parent, "the folder of --out")
    if storage is None:
        check_writable("studies", "the studies folder")
    cfg, demo, fold_file = trial_base(arch, overrides, files or [])
    if "full" in [spec.strip() for spec in folds.split(",")]:
        raise UserError("--folds full: a trial is scored on its validation folds, and full has none; name folds "
                        "(fold0,fold1) or all")
    wanted = sorted({f for spec in folds.split(",") for f in parse_fold_spec(spec.strip(), fold_file.k)
                     if f is not None})  # full is refused above
    search = load_search_space(space_file(arch, space), cfg)
    name = study or (f"{arch}-demo" if demo else arch)
    url = storage or f"sqlite:///{Path('studies') / f'{name}.db'}"
    the_study = open_study(name, url, heartbeat, pruner, cfg.seed)
    check_study_matches(the_study, url, study_identity(cfg, search, wanted, fold_file))
    cfg = cfg.model_copy(update={"study": name})
    print(f"study '{name}' in {safe_url(url)}: {len(the_study.trials)} trial(s) so far; adding {trials} "
          f"({', '.join(search.params)} from {shown_path(search.source)}; folds {', '.join(f'fold{f}' for f in wanted)})",
          flush=True)
    objective = make_objective(cfg, search, fold_file, wanted, name)
    with storage_errors(url, "lost the connection to"):
        the_study.optimize(objective, n_trials=trials, timeout=timeout, catch=(TrainingDiverged,),
                           callbacks=[print_trial], gc_after_trial=True)
        with quiet_experimental():
            optuna.storages.fail_stale_trials(the_study)
        print(study_summary(the_study, url, wanted, demo))
        best = best_trial(the_study)
    if best is not None:
        path = Path(out) if out else shown_path(tuned_config_path(arch))
        write_tuned_config(path, arch, best, name, url, len(the_study.trials), wanted, demo)
        hint = "tuned=true" if not out else f"--config {path}"
        print(f"wrote {path}; train with it: ./train.sh {arch} fold{wanted[0]} {hint}")
    return the_study
