"""Batch-norm statistics recomputed on clean images, measured on out-of-fold predictions (issue 21).

A network trained with strong colour, stain and rotation augmentation keeps running batch-norm statistics of
augmented images, and is then evaluated on clean ones. For each fold run: its best.pt's weights, batch-norm
statistics recomputed over the run's own training images without augmentation (the other folds of its fold file,
the cumulative average of every batch, as torch.optim.swa_utils.update_bn does; dropout and drop-path stay off),
then its validation images (oof.csv, never trained on) predicted again. Scored at threshold 0.5 at the folds' own
class mix and re-weighted to a balanced one (bench/shift.py's weights). Nothing is chosen on the scored images.

    .venv/bin/python bench/bn_clean.py bench/results/real-cnmc/runs/defaults/s42/tf_efficientnet_lite0 [...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from alldetect.data.dataset import CellDataset, EpochSampler, make_loader
from alldetect.engine.loop import DeviceBatch, predict_probs
from alldetect.engine.rundir.files import RunDir
from alldetect.engine.rundir.find import find_fold_runs

sys.path.insert(0, str(Path(__file__).parent))
from shift import mix_weights, scored  # noqa: E402  (bench/shift.py: the balanced mix's sample weights)


@torch.no_grad()
def recompute_bn(model: nn.Module, loader, dev: DeviceBatch) -> int:
    """Reset every batch norm's running statistics and average them over the loader's clean batches (cumulative
    average: momentum None). Only the batch norms run in training mode. Returns the number of layers reset."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for x, _, _ in loader:
        model(dev.images(x))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()
    return len(norms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="runs/<arch> folders (every fold)")
    p.add_argument("--data", help="where the images are now, if not where the runs' configs say")
    p.add_argument("--out", help="also write the table to this CSV file")
    a = p.parse_args()
    torch.set_num_threads(1)
    dev = DeviceBatch(torch.device("cpu"), False, amp=False)
    rows = []
    for folder in a.runs:
        runs = find_fold_runs([folder])
        pooled: dict[str, list] = {"as trained": [], "clean BN": []}
        for run in runs:
            files = RunDir(run)
            state = files.load_best()
            meta = state.meta
            model, size, crop = state.network(), meta.input_size, meta.crop
            root = Path(a.data or meta.data_root())
            oof = files.read_oof()
            folds = pd.read_csv(meta.fold_file)
            fold = int(oof["fold"].iloc[0])
            train = folds[folds["fold"] != fold]
            clean = CellDataset(root, train["path"], train["label"], crop, size)
            with make_loader(clean, 64, EpochSampler(len(clean), 0, shuffle=False), 1, False) as loader:
                layers = recompute_bn(model, loader, dev)
            held = CellDataset(root, oof["path"], oof["label"], crop, size)
            with make_loader(held, 64, EpochSampler(len(held), 0, shuffle=False), 1, False) as loader:
                probs, _ = predict_probs(model, loader, dev, desc=f"{run} clean BN")
            labels = oof["label"].to_numpy()
            for name, q in (("as trained", oof["prob_all"].to_numpy()), ("clean BN", probs[:, 1])):
                pooled[name].append((labels, q))
                for mix, share in (("own", labels.mean()), ("balanced", 0.5)):
                    s = scored(labels, q, mix_weights(labels, share))
                    rows.append({"runs": folder, "fold": fold, "bn": name, "mix": mix, **s})
            print(f"{run}: {layers} batch norms recomputed on {len(clean)} clean training images", flush=True)
    table = pd.DataFrame(rows)
    summary = table.groupby(["runs", "bn", "mix"], sort=False)[["f1", "roc_auc"]].agg(["mean", "min"])
    print(table.round(4).to_string(index=False))
    print(summary.round(4).to_string())
    if a.out:
        table.to_csv(a.out, index=False)


if __name__ == "__main__":
    main()
