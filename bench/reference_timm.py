"""The plain reference: a short timm script that alldetect's defaults must match or beat on real cells.

What a competent Kaggler writes in a few minutes: images decoded once into memory (the same 450 -> 400 centre crop
and resize as alldetect), AdamW 1e-3 with a one-cycle schedule, random flips and quarter turns, plain
cross-entropy, the last epoch kept. It reads an alldetect fold file and writes, per fold, an `oof.csv` in the run
folder layout (path, subject, label, prob_all, pred, fold), so bench/real_cnmc.py scores it like any run.
  python bench/reference_timm.py FOLD_FILE DATA_ROOT OUT_DIR --arch resnet18 --size 96 --epochs 15
"""
import argparse
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import timm
import torch

p = argparse.ArgumentParser()
for name in ("fold_file", "data_root", "out"):
    p.add_argument(name)
p.add_argument("--arch", default="resnet18")
p.add_argument("--size", type=int, default=96)
p.add_argument("--epochs", type=int, default=15)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
table = pd.read_csv(a.fold_file, dtype={"subject": str})


def load(path):  # BGR file -> RGB, 450 -> 400 centre crop, resize (alldetect's preprocessing)
    img = cv2.cvtColor(cv2.imread(str(Path(a.data_root) / path)), cv2.COLOR_BGR2RGB)
    o = (img.shape[0] - 400) // 2
    return cv2.resize(img[o:o + 400, o:o + 400], (a.size, a.size), interpolation=cv2.INTER_AREA)


images = torch.from_numpy(np.stack([load(q) for q in table["path"]])).permute(0, 3, 1, 2).float().div(255)
images = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
labels = torch.tensor(table["label"].to_numpy())
for fold in sorted(table["fold"].unique()):
    torch.manual_seed(a.seed)
    train, val = np.flatnonzero(table["fold"] != fold), np.flatnonzero(table["fold"] == fold)
    if a.arch == "proposed":  # the report's network is not in timm: take alldetect's definition of it
        from alldetect.models import create_model
        model = create_model("proposed", input_size=a.size)
    else:
        model = timm.create_model(a.arch, num_classes=2)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    steps = len(train) // a.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.epochs * steps)
    for epoch in range(a.epochs):
        model.train()
        order = torch.randperm(len(train))[: steps * a.batch].view(steps, a.batch)
        for idx in order:
            x, y = images[train[idx.numpy()]], labels[train[idx.numpy()]]
            for dim in (2, 3):  # each image flipped up-down and left-right with probability 0.5
                m = torch.rand(len(x)) < 0.5
                x[m] = x[m].flip(dim)
            k = torch.randint(4, (len(x),))  # and turned by 0, 90, 180 or 270 degrees
            x = torch.stack([torch.rot90(xi, int(ki), (1, 2)) for xi, ki in zip(x, k)])
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"fold {fold} epoch {epoch + 1}/{a.epochs} loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        prob = torch.cat([model(images[val[i:i + 256]]).softmax(1)[:, 1] for i in range(0, len(val), 256)]).numpy()
    run = Path(a.out) / f"fold{fold}"
    run.mkdir(parents=True, exist_ok=True)
    table.iloc[val][["path", "subject", "label"]].assign(prob_all=prob.round(6), pred=(prob >= 0.5).astype(int),
                                                         fold=fold).to_csv(run / "oof.csv", index=False)
