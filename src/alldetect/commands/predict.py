"""`alldetect predict RUN... --data DIR --name NAME` and `alldetect predict RUN... --oof`
(what the files hold: alldetect.engine.predict)."""

from __future__ import annotations

import logging

import pandas as pd

from alldetect.atomic import check_writable
from alldetect.engine.loop import resolve_device
from alldetect.engine.predict import OOF_NAME, OPTIONS, check_name, load_held_out, own_validation_images, predict_run
from alldetect.engine.rundir.files import RunDir
from alldetect.engine.rundir.find import find_fold_runs
from alldetect.errors import UserError
from alldetect.options import parse_options, split_options

log = logging.getLogger("alldetect")


def predict_command(runs: list[str], data: str | None, name: str | None, overrides: list[str] | None = None,
                    oof: bool = False) -> pd.DataFrame:
    paths, raw = split_options([*runs, *(overrides or [])])
    opts = parse_options(raw, OPTIONS, "predict")
    if oof and name:
        raise UserError(f"--oof and --name {name}: choose one. --oof predicts each fold run's own validation images "
                        "(as pred_oof.csv); --data DIR --name NAME predicts a folder of images")
    if not oof and not name:
        raise UserError("say what to predict: --data DIR --name NAME (a folder of images), or --oof (each fold run's "
                        "own validation images)")
    if not oof and not data:
        raise UserError(f"--name {name} needs --data DIR: the folder of images to predict")
    name = OOF_NAME if oof else check_name(name or "")
    if name == OOF_NAME and not oof:
        raise UserError(f"--name {OOF_NAME} is kept for --oof (each run's own validation images); choose another")
    fold_runs = find_fold_runs(paths)
    own = {}  # --oof: each run's validation images, found and checked with the rest
    for run in fold_runs:  # every checkpoint and run folder is checked before any prediction file is written
        state = RunDir(run).load_best(mmap=True)
        state.network()
        check_writable(run, "the run folder")
        if oof:
            own[run] = own_validation_images(run, state.meta, data)
    if oof:
        device = resolve_device(opts["device"])
        rows = [predict_run(run, own[run], name, opts, device) for run in fold_runs]
        table = pd.DataFrame(rows)
        print(f"\npredictions of each run's own validation images\n{table.to_string(index=False)}")
        print(f"Each run folder now holds pred_{name}.csv and pred_{name}.json"
              + (f" and feat_{name}.npz; use them with `alldetect ensemble RUN... --oof correct=knn`."
                 if opts["features"] else "."))
        return table
    assert data is not None  # checked above
    held_out = load_held_out(data)
    device = resolve_device(opts["device"])
    log.info("predicting %d image(s) of %s (%s) with %d run(s), tta=%s", len(held_out.manifest), held_out.root,
             held_out.manifest["source_layout"].iloc[0], len(fold_runs), opts["tta"])
    rows = [predict_run(run, held_out, name, opts, device) for run in fold_runs]  # predict_probs: no grad
    table = pd.DataFrame(rows)
    note = "" if held_out.labelled else " (unlabelled: no scores)"
    print(f"\npredictions '{name}' on {held_out.root}{note}\n{table.to_string(index=False)}")
    feats = f" and feat_{name}.npz" if opts["features"] else ""
    print(f"Each run folder now holds pred_{name}.csv and pred_{name}.json{feats}; combine them with "
          f"`alldetect ensemble RUN... --name {name}`.")
    return table
