"""Test-time augmentation measured on out-of-fold predictions: each fold's best.pt predicts its own validation
images (those in its oof.csv, which it never trained on) under every `tta=` mode, and the pooled predictions are
scored at the fixed threshold 0.5. Nothing is chosen on these images; every mode is printed.

    .venv/bin/python bench/tta_oof.py runs/resnet18 [runs/proposed ...] [--modes none,flip,d8,rot8,rot16]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from alldetect.data.dataset import CellDataset, EpochSampler, make_loader
from alldetect.engine.loop import DeviceBatch, predict_probs, resolve_device
from alldetect.engine.predict import TTA_MODES, tta_views
from alldetect.engine.rundir.files import RunDir
from alldetect.engine.rundir.find import find_fold_runs
from alldetect.metrics import score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="runs/<arch> folders (every fold) or single fold runs")
    p.add_argument("--modes", default=",".join(TTA_MODES))
    p.add_argument("--data", help="where the images are now, if not where the fold file's sidecar says")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="also write the table to this CSV file")
    a = p.parse_args()
    device = resolve_device(a.device)
    rows = []
    for folder in a.runs:
        runs = find_fold_runs([folder])
        preds = {mode: [] for mode in a.modes.split(",")}
        seconds = dict.fromkeys(preds, 0.0)
        for run in runs:
            files = RunDir(run)
            state = files.load_best()
            model, size, crop = state.network().to(device), state.meta.input_size, state.meta.crop
            oof = files.read_oof()
            root = Path(a.data or state.meta.data_root())
            dataset = CellDataset(root, oof["path"], oof["label"], crop, size)
            dev = DeviceBatch(device, False, amp=False)
            for mode in preds:
                start = time.perf_counter()
                with make_loader(dataset, 64, EpochSampler(len(dataset), 0, shuffle=False), 2, False) as loader:
                    probs, _ = predict_probs(model, loader, dev, desc=f"{run} tta={mode}", views=tta_views(mode, dev))
                seconds[mode] += time.perf_counter() - start
                preds[mode].append((oof["label"].to_numpy(), probs[:, 1]))
                if mode == "none":  # the same weights on the same images: what training wrote
                    drift = float(np.abs(probs[:, 1] - oof["prob_all"].to_numpy()).max())
                    print(f"{run}: tta=none reproduces oof.csv to {drift:.1e}", flush=True)
        for mode, folds in preds.items():
            labels, probs = np.concatenate([f[0] for f in folds]), np.concatenate([f[1] for f in folds])
            pooled = score(labels, probs)
            per_fold = [score(y, q)["f1"] for y, q in folds]
            rows.append({"runs": folder, "tta": mode, "f1_mean": np.mean(per_fold), "f1_pooled": pooled["f1"],
                         "accuracy": pooled["accuracy"], "roc_auc": pooled["roc_auc"],
                         **{f"f1_fold{i}": f for i, f in enumerate(per_fold)}, "seconds": seconds[mode]})
    table = pd.DataFrame(rows)
    base = table[table["tta"] == "none"].set_index("runs")["seconds"]
    if len(base):
        table["time_x"] = table["seconds"] / table["runs"].map(base)
    print(table.round(4).to_string(index=False))
    if a.out:
        table.to_csv(a.out, index=False)


if __name__ == "__main__":
    main()
