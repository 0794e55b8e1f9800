"""`alldetect pretrain`: self-supervised pretraining on tiny demo data (engine/pretrain.py)."""

from __future__ import annotations

import dataclasses
import os
import signal

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from alldetect.commands.pretrain import pretrain_command
from alldetect.commands.train import train_command
from alldetect.config import load_config
from alldetect.data.prepare import resolve_folds
from alldetect.engine.pretrain import FORCED, NTXent, pretrain_data, pretrain_fold
from alldetect.engine.stopping import StopRequested
from alldetect.errors import UserError

from conftest import TINY

PRE = ["input_size=32", "epochs=2", "batch_size=8", "data.num_workers=0", "wandb=off", "data.k=3", "aug.stain=0"]


def _cfg(root, *extra):
    return load_config(TINY, [*PRE, f"data.root={root}", *extra, *FORCED])


def _same(a, b) -> bool:
    a, b = torch.load(a), torch.load(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_batch_is_two_views_of_its_images_and_their_targets_are_the_images_not_labels(tiny_data, workdir):
    cfg = _cfg(tiny_data)
    folds = resolve_folds(cfg)
    data = pretrain_data(cfg, folds, 0, 32, torch.device("cpu"), _one_process())
    data.sampler.set_epoch(0)
    views, targets, rows = next(iter(data.train_loader))
    n = cfg.batch_size
    assert views.shape == (2 * n, 32, 32, 3) and torch.equal(targets[:n], targets[n:]) and torch.equal(targets, rows)
    assert len(set(targets[:n].tolist())) == n  # n different images, each twice
    assert not torch.equal(views[:n], views[n:])  # differently augmented
    assert data.train_images == int((folds.table["fold"] != 0).sum())  # fold 0's people are never seen


@pytest.mark.slow
def test_pretraining_reads_no_label_and_its_encoder_starts_a_training_run(tiny_data, workdir, monkeypatch, capsys):
    [encoder] = pretrain_command(TINY, "fold0", [*PRE, f"data.root={tiny_data}"])
    out = capsys.readouterr().out
    assert str(encoder) == f"pretrained/{TINY}/fold0/encoder.pth" and f"pretrained_path={encoder}" in out
    history = pd.read_csv(encoder.parent / "history.csv")
    assert len(history) == 2 and np.isfinite(history["train_loss"]).all() and "f1" not in history
    kept = encoder.read_bytes()
    with pytest.raises(UserError, match=rf"pretrained/{TINY}/fold0 already holds a run .*resume=true"):
        pretrain_command(TINY, "fold0", [*PRE, f"data.root={tiny_data}"])  # another run's folder: untouched
    assert encoder.read_bytes() == kept
    (encoder.parent / "last.pt").write_bytes(b"PK\x03\x04 cut short")  # a damaged checkpoint, resumed
    with pytest.raises(UserError, match=rf"cannot read checkpoint pretrained/{TINY}/fold0/last.pt: damaged"):
        pretrain_command(TINY, "fold0", [*PRE, f"data.root={tiny_data}", "resume=true"])
    assert encoder.read_bytes() == kept
    # the same run with every label hidden writes the same encoder: no label was read
    cfg = _cfg(tiny_data)
    folds = resolve_folds(cfg)
    blind = dataclasses.replace(folds, table=folds.table.assign(label=-1))
    (workdir / "blind").mkdir()
    monkeypatch.chdir(workdir / "blind")
    _, unseen = pretrain_fold(cfg, 0, blind)
    assert _same(workdir / encoder, unseen)
    monkeypatch.chdir(workdir)
    train_command(TINY, "fold0", [*PRE, "epochs=1", f"data.root={tiny_data}", f"pretrained_path={encoder}",
                                         "aug.stain=0"])
    start = timm.create_model(TINY, num_classes=2, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(encoder))).state_dict()
    saved = torch.load(encoder)
    assert all(torch.equal(start[k], v) for k, v in saved.items())  # every encoder weight loads, the head is new
    assert set(start) - set(saved) == {"fc.weight", "fc.bias"}


@pytest.mark.slow
def test_a_pretraining_stopped_by_sigterm_resumes_to_the_same_encoder(tiny_data, workdir, monkeypatch):
    cfg = _cfg(tiny_data, "epochs=3")
    folds = resolve_folds(cfg)
    (workdir / "a").mkdir(), (workdir / "b").mkdir()
    monkeypatch.chdir(workdir / "a")
    _, whole = pretrain_fold(cfg, 0, folds)
    real, calls = NTXent.forward, []

    def signal_at_fourth(self, embeddings, images):
        calls.append(1)
        if len(calls) == 4:  # epoch 2 (3 batches an epoch), its first batch
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, embeddings, images)

    monkeypatch.chdir(workdir / "b")
    monkeypatch.setattr(NTXent, "forward", signal_at_fourth)
    with pytest.raises(StopRequested, match=r"stopped by SIGTERM in epoch 2 after batch 1.*resume=true"):
        pretrain_fold(cfg, 0, folds)
    monkeypatch.setattr(NTXent, "forward", real)
    _, resumed = pretrain_fold(_cfg(tiny_data, "epochs=3", "resume=true"), 0, folds)
    assert _same(workdir / "a" / whole, workdir / "b" / resumed)


def test_pretrain_refuses_networks_pretrained_path_cannot_load_and_bad_folds(tiny_data, workdir):
    with pytest.raises(UserError, match=r"pretrained_path= loads, which proposed does not take: pretrain a timm"):
        pretrain_command("proposed", "fold0", [*PRE, f"data.root={tiny_data}"])
    with pytest.raises(UserError, match=r"'fold' is not what pretrain takes: fold<k>"):
        pretrain_command(TINY, "fold", [*PRE, f"data.root={tiny_data}"])
    with pytest.raises(UserError, match=r"'fold3' is not a fold of .*: use fold0 .. fold2, each, or all"):
        pretrain_command(TINY, "fold3", [*PRE, f"data.root={tiny_data}"])


def _one_process():
    from alldetect.engine.distributed import init_distributed

    return init_distributed()
