"""Run folders made by hand (no training): a checkpoint with a config, out-of-fold and held-out predictions."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from alldetect.atomic import write_csv
from alldetect.config import load_config
from alldetect.engine.rundir.files import (
    Checkpoint,
    PredictionRecord,
    Progress,
    RunDir,
    RunMeta,
    load_checkpoint,
    save_checkpoint,
)
from alldetect.models import model_from_config


def make_run(run: Path, arch: str = "proposed", *, weights: bool = False, input_size: int = 32, crop: int = 400,
             fold_file: str = "folds/data_k3_s42.csv", fingerprint: str = "abc123", seed: int = 0,
             oof: pd.DataFrame | None = None, select: str = "last", overrides: tuple[str, ...] = ()) -> Path:
    """best.pt with the run's config; real (randomly initialised) weights only when `weights`, with batch-norm
    statistics taken from one batch of noise so that the output depends on the input."""
    cfg = load_config(arch, [f"input_size={input_size}", "dropout=0.0", f"data.crop={crop}", "data.k=3",
                             f"select={select}", *overrides])
    model = {}
    if weights:
        torch.manual_seed(seed)
        net = model_from_config(cfg)
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = 1.0
        with torch.no_grad():
            net.train()(torch.randn(8, 3, input_size, input_size))
        model = net.state_dict()
    meta = RunMeta(config=cfg, run=run.name, progress=Progress(epoch=0), metrics={}, fold_file=fold_file,
                   fold_fingerprint=fingerprint, fold_k=3)
    save_checkpoint(run / "best.pt", Checkpoint(meta, model))
    if oof is not None:
        write_csv(run / "oof.csv", oof)
    return run


def edit_checkpoint(path: Path, config: dict | None = None, **meta) -> None:
    """Rewrite a checkpoint with some metadata (and config keys) changed, as an older or other run would have
    it; a hard link to a shared checkpoint becomes a file of its own."""
    state = load_checkpoint(path)
    new = state.meta.model_copy(update=meta)
    if config:
        new.config = new.config.model_copy(update=config)
    path.unlink()
    save_checkpoint(path, Checkpoint(new, state.model, state.optimizer, state.ema, state.scaler))


def oof_frame(paths, labels, probs, fold: int, subjects=None) -> pd.DataFrame:
    subjects = list(subjects) if subjects is not None else [Path(p).name.split("_")[1] for p in paths]
    return pd.DataFrame({"path": list(paths), "subject": subjects, "label": list(labels), "prob_all": list(probs),
                         "pred": [int(p >= 0.5) for p in probs], "fold": fold})


def write_predictions(run: Path, name: str, paths, probs, labels=None, fingerprint: str = "data1",
                      tta: str = "none", data_root: str = "/data/test", subjects=None) -> None:
    """pred_<name>.csv and .json as `predict` writes them; `fingerprint` stands for the images' content digest."""
    frame = pd.DataFrame({"path": list(paths), "prob_all": list(probs)})
    if labels is not None:
        frame["label"] = list(labels)
    if subjects is not None:
        frame["subject"] = list(subjects)
    meta = PredictionRecord(name=name, run=str(run), data_root=data_root, data_fingerprint=fingerprint,
                            data_content=fingerprint, layout="unlabelled", tta=tta)
    RunDir(run).write_predictions(name, frame, meta)
