"""The decoded-image cache, GPU-style batch augmentation, and two-process data-parallel training."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from alldetect.commands.train import train_command
from alldetect.config import AugConfig
from alldetect.data.cache import image_cache
from alldetect.data.dataset import CellDataset
from alldetect.data.folds import make_fold_file
from alldetect.engine.gpu_augment import BatchAugment
from alldetect.engine.rundir.files import load_checkpoint

from conftest import FAST


def test_cache_gives_byte_identical_images(tiny_demo, workdir):
    ff = make_fold_file(tiny_demo, workdir / "f.csv", k=3, seed=0)
    paths = ff.table["path"].tolist()
    cache = image_cache(tiny_demo, paths, crop=400, size=48, cache_dir=workdir / "cache")
    plain = CellDataset(tiny_demo, paths[::-1], [0] * len(paths), 400, 48)
    cached = CellDataset(tiny_demo, paths[::-1], [0] * len(paths), 400, 48, image_source=cache.source(paths[::-1]))
    for i in range(len(paths)):
        assert torch.equal(plain[i][0], cached[i][0])
    files = sorted(p.name for p in (workdir / "cache").iterdir())
    assert len(files) == 2 and files[0].endswith("-c400-s48.json") and files[1].endswith("-c400-s48.u8")
    # reused, not rebuilt
    mtime = (workdir / "cache" / files[1]).stat().st_mtime_ns
    image_cache(tiny_demo, paths, crop=400, size=48, cache_dir=workdir / "cache")
    assert (workdir / "cache" / files[1]).stat().st_mtime_ns == mtime


def test_cache_is_invalidated_when_data_change(tiny_demo, workdir):
    data = workdir / "data"
    shutil.copytree(tiny_demo, data)
    ff = make_fold_file(data, workdir / "f.csv", k=3, seed=0)
    paths = ff.table["path"].tolist()
    first = image_cache(data, paths, 400, 32, workdir / "cache").file
    victim = data / paths[0]
    victim.write_bytes(victim.read_bytes() + b"\0")  # same name, other content and size
    second = image_cache(data, paths, 400, 32, workdir / "cache").file
    assert first != second and first.name.split("-")[1] != second.name.split("-")[1]


def test_cache_is_invalidated_when_an_image_is_rewritten_at_the_same_size(tiny_demo, workdir):
    """Every C-NMC BMP has the same size, so the size-based data fingerprint alone cannot see a replaced image."""
    import cv2

    data = workdir / "data"
    shutil.copytree(tiny_demo, data)
    paths = make_fold_file(data, workdir / "f.csv", k=3, seed=0).table["path"].tolist()
    first = image_cache(data, paths, 400, 32, workdir / "cache")
    victim = data / paths[0]
    img = cv2.imread(str(victim))
    cv2.imwrite(str(victim), 255 - img)  # other pixels, the same number of bytes
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    second = image_cache(data, paths, 400, 32, workdir / "cache")
    assert first.file != second.file
    row = sorted(paths).index(paths[0])
    assert not np.array_equal(first.array[row], second.array[row])


@pytest.mark.slow
def test_training_with_cache_matches_training_without(tiny_demo, workdir):
    train_command("proposed", "fold0", [*FAST, f"data.root={tiny_demo}", "runs_dir=plain"])
    train_command("proposed", "fold0", [*FAST, f"data.root={tiny_demo}", "runs_dir=cached", "data.cache=true"])
    a = load_checkpoint(workdir / "plain/proposed/fold0/last.pt").model
    b = load_checkpoint(workdir / "cached/proposed/fold0/last.pt").model
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert list((workdir / "data/cache").glob("demo-*-c400-s32.u8"))


def test_batch_augment_uses_the_eight_square_symmetries():
    x = torch.arange(2 * 2 * 3, dtype=torch.float32).view(1, 3, 2, 2).repeat(400, 1, 1, 1) / 12
    out = BatchAugment(AugConfig())(x, seed=5)
    views = {tuple(v.flatten().tolist()) for v in out}
    assert len(views) == 8  # rot90/rot270/flips at 0.5 reach the whole dihedral group
    again = BatchAugment(AugConfig())(x, seed=5)
    assert torch.equal(out, again)
    none = BatchAugment(AugConfig(rot90=0, rot270=0, hflip=0, vflip=0))(x, seed=5)
    assert torch.equal(none, x)


def test_batch_augment_rotation_and_jitter_keep_range():
    x = torch.rand(8, 3, 16, 16)
    out = BatchAugment(AugConfig(rotate=1.0, color_jitter=1.0))(x, seed=1)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)


def test_gpu_augmentation_trains(tiny_demo, workdir):
    [r] = train_command("proposed", "fold0", [*FAST, f"data.root={tiny_demo}", "augment_on=gpu", "epochs=1"])
    assert r.epochs_run == 1


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tiny_demo, workdir):
    # timm's tiny test ViT normalises each image on its own (layer norm): batch-norm statistics would stay per
    # process on the CPU (gloo), as AlexNet (which this test trained before, 57 M weights at 64 px) has none either.
    common = [*FAST, f"data.root={tiny_demo}", "dropout=0", "class_balance=none", "epochs=2", "batch_size=8",
              "optimizer=sgd", "lr=0.01"]
    train_command("test_vit", "fold0", [*common, "runs_dir=single"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*torchrun, "-m", "alldetect", "train", "test_vit", "fold0", *common, "runs_dir=ddp"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_checkpoint(workdir / "single/test_vit/fold0/last.pt").model
    b = load_checkpoint(workdir / "ddp/test_vit/fold0/last.pt").model
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    ha = pd.read_csv(workdir / "single/test_vit/fold0/history.csv")
    hb = pd.read_csv(workdir / "ddp/test_vit/fold0/history.csv")
    np.testing.assert_allclose(ha["val_loss"], hb["val_loss"], rtol=1e-3)
    np.testing.assert_allclose(ha["f1"], hb["f1"])
    oof_a = pd.read_csv(workdir / "single/test_vit/fold0/oof.csv")
    oof_b = pd.read_csv(workdir / "ddp/test_vit/fold0/oof.csv")
    assert list(oof_a["path"]) == list(oof_b["path"])
    np.testing.assert_allclose(oof_a["prob_all"], oof_b["prob_all"], atol=1e-3)


def test_cache_command_builds_the_cache_training_reads(tiny_demo, workdir, capsys):
    from alldetect.cli import main

    assert main(["cache", "proposed", "input_size=40", "data.k=3", f"data.root={tiny_demo}"]) == 0
    assert "cache ready" in capsys.readouterr().out
    assert len(list((workdir / "data/cache").glob("demo-*-c400-s40.u8"))) == 1
