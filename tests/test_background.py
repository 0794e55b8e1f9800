"""Images unlike C-NMC's: cells on a full-frame smear. Rotations must not paint black corners on them, and the run
says what it found and chose."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from alldetect.cli import main
from alldetect.config import AugConfig, load_config
from alldetect.data.background import corners_are_black, inspect_background
from alldetect.data.demo import make_demo_data
from alldetect.data.images import read_rgb
from alldetect.data.prepare import resolve_folds
from alldetect.data.transforms import Augment
from alldetect.engine.folddata import resolve_border
from alldetect.engine.gpu_augment import BatchAugment
from alldetect.engine.loop import DeviceBatch

ONLY_ROTATION = dict(rot90=0, rot270=0, hflip=0, vflip=0, rotate=1.0, rotate_limit=180)


@pytest.fixture(scope="module")
def full_frame(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("ff") / "ff", subjects=9, per_subject=2, seed=2, full_frame=True)


def _image(root):
    return read_rgb(sorted((root / "C-NMC_training_data").rglob("*.bmp"))[0])


def test_full_frame_demo_cells_sit_on_a_smear_and_the_classic_demo_on_black(full_frame, tiny_demo):
    paths = [str(p.relative_to(full_frame)) for p in full_frame.rglob("*.bmp")]
    assert inspect_background(full_frame, paths).kind == "full-frame"
    paths = [str(p.relative_to(tiny_demo)) for p in tiny_demo.rglob("*.bmp")]
    found = inspect_background(tiny_demo, paths, crop=400)
    assert (found.kind, found.black_corners, found.sampled) == ("black", 32, 32)  # 32 of its 36 images looked at


def test_real_cnmc_cells_are_found_on_black(sample_root):
    paths = [str(p.relative_to(sample_root)) for p in sample_root.rglob("*.bmp")]
    found = inspect_background(sample_root, paths, crop=400)
    assert found.kind == "black" and found.border == "black" and found.sampled == 32


@pytest.mark.parametrize("on", ["cpu", "gpu"])
def test_reflect_fills_rotated_corners_with_the_smear_and_black_with_black(full_frame, on):
    img = _image(full_frame)
    assert not corners_are_black(img)

    def rotated(border):
        aug = AugConfig(**ONLY_ROTATION, border=border)
        if on == "cpu":
            return [Augment(aug)(img, seed) for seed in range(6)]
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255).repeat(6, 1, 1, 1)
        return [(o.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for o in BatchAugment(aug)(x, seed=3)]

    black, reflected = rotated("black"), rotated("reflect")
    corner = (slice(0, 20), slice(0, 20))
    # some angle uncovers the corner: black there with border=black, never with reflect
    assert any(o[corner].max() < 24 for o in black)
    assert all(o[corner].max(axis=2).mean() > 100 for o in reflected)


def test_a_run_resolves_border_auto_from_its_training_images_and_says_so(full_frame, tiny_data, workdir, caplog):
    chosen = {}
    for name, root in (("full-frame", full_frame), ("black", tiny_data)):
        cfg = load_config("proposed", [f"data.root={root}", "data.k=3", "wandb=off"])
        assert cfg.aug.border == "auto" and cfg.aug.rotate > 0
        folds = resolve_folds(cfg)
        with caplog.at_level(logging.INFO, logger="alldetect"):
            caplog.clear()
            aug = resolve_border(cfg, folds, folds.table[folds.table["fold"] != 0])
        chosen[name] = (aug.border, caplog.text)
    assert chosen["full-frame"][0] == "reflect" and "a reflection of the image" in chosen["full-frame"][1]
    assert "full-frame images" in chosen["full-frame"][1]
    assert chosen["black"][0] == "black" and "segmented cells on black" in chosen["black"][1]
    cfg = load_config("proposed", [f"data.root={full_frame}", "data.k=3", "aug.border=black"])
    folds = resolve_folds(cfg)
    assert resolve_border(cfg, folds, folds.table).border == "black"  # said explicitly: kept


def test_index_says_what_background_it_found(full_frame, capsys):
    assert main(["index", str(full_frame)]) == 0
    out = capsys.readouterr().out
    assert "background: full-frame images" in out and "a reflection of the image" in out


def test_rotation_tta_reflects_full_frame_images_and_says_so(full_frame, tiny_data, caplog):
    from alldetect.engine.predict import _full_frame, load_held_out, tta_views

    caplog.set_level(logging.INFO, logger="alldetect")
    assert _full_frame(load_held_out(full_frame), 0, Path("runs/x/fold0"))
    assert "tta rotations fill the corners they uncover with a reflection of the image" in caplog.text
    assert not _full_frame(load_held_out(tiny_data), 0, Path("runs/x/fold0"))  # cells on black keep black corners
    dev = DeviceBatch(torch.device("cpu"), False, False)
    grey = dev.images(torch.full((1, 16, 16, 3), 150, dtype=torch.uint8))  # a smear's even background
    reflected, black = (tta_views("rot8", dev, reflect)(grey)[1] for reflect in (True, False))  # the 45 degree view
    assert torch.allclose(reflected, grey, atol=1e-5)  # nothing uncovered: the background goes on into the corners
    assert torch.allclose(black[..., 0, 0], -dev.mean[0, :, 0, 0] / dev.std[0, :, 0, 0], atol=1e-5)
