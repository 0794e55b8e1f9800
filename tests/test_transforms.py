import numpy as np
import pytest

from alldetect.cli import main
from alldetect.config import AugConfig
from alldetect.data.transforms import Augment, create_transform

from conftest import TINY


def _symmetries(img):
    """The 8 symmetries of the square, enumerated independently of the implementation: 4 rotations of the image
    and of its transpose."""
    return {np.ascontiguousarray(np.rot90(v, k)).tobytes() for v in (img, img.transpose(1, 0, 2)) for k in range(4)}


@pytest.mark.parametrize("probs, expected", [
    ((1, 0, 0, 0), lambda im: np.rot90(im, 1)),  # rot90: a quarter turn counter-clockwise
    ((0, 1, 0, 0), lambda im: np.rot90(im, -1)),  # rot270: three quarter turns, i.e. one clockwise
    ((0, 0, 1, 0), lambda im: im[:, ::-1]),  # horizontal flip: left and right swap
    ((0, 0, 0, 1), lambda im: im[::-1]),  # vertical flip: top and bottom swap
    ((1, 1, 0, 0), lambda im: im),  # a quarter turn each way
    ((0, 0, 1, 1), lambda im: np.rot90(im, 2)),  # both flips: a half turn
])
def test_each_of_the_reports_steps_does_what_it_says(probs, expected):
    img = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)  # not square: a turn shows
    rot90, rot270, hflip, vflip = probs
    out = Augment(AugConfig(rot90=rot90, rot270=rot270, hflip=hflip, vflip=vflip))(img, 0)
    assert out.flags.c_contiguous and np.array_equal(out, expected(img))


def test_report_augmentations_reach_all_eight_symmetries_each_step_half_the_time():
    img = np.random.default_rng(0).integers(0, 255, (7, 7, 3), dtype=np.uint8)
    t, square = Augment(AugConfig()), _symmetries(img)
    outputs = [t(img, seed) for seed in range(400)]
    assert {o.tobytes() for o in outputs} == square  # only symmetries of the image, and all 8 of them
    unchanged = np.mean([np.array_equal(o, img) for o in outputs])
    assert 0.06 < unchanged < 0.2  # identity: no step (1/16) or a quarter turn each way alone (1/16), 1/8 in all


def test_augmentation_is_a_function_of_the_seed():
    img = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    t = Augment(AugConfig(rotate=1.0, color_jitter=1.0))
    assert np.array_equal(t(img, 3), t(img, 3))
    assert not np.array_equal(t(img, 3), t(img, 4))


@pytest.mark.parametrize("on", ["cpu", "gpu"])
def test_jitter_strength_sets_how_far_colours_move(on):
    """The demo profile widens the jitter to cover its subjects' stain spread; both pipelines follow it."""
    import torch

    from alldetect.engine.gpu_augment import BatchAugment

    img = np.random.default_rng(5).integers(40, 200, (16, 16, 3), dtype=np.uint8)
    only_jitter = dict(rot90=0, rot270=0, hflip=0, vflip=0, color_jitter=1.0)

    def mean_change(strength):
        aug = AugConfig(**only_jitter, jitter_strength=strength)
        if on == "cpu":
            outs = [Augment(aug)(img, seed).astype(float) for seed in range(40)]
        else:
            x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255).repeat(40, 1, 1, 1)
            outs = [o.permute(1, 2, 0).numpy() * 255 for o in BatchAugment(aug)(x, seed=0)]
        return np.mean([np.abs(o - img).mean() for o in outs])

    weak, strong = mean_change(0.1), mean_change(0.4)
    assert 0 < weak and strong > 2.5 * weak


def test_jitter_strength_out_of_range_is_refused():
    with pytest.raises(ValueError, match="jitter_strength"):
        AugConfig(jitter_strength=0)
    with pytest.raises(ValueError, match="jitter_strength"):
        AugConfig(jitter_strength=0.9)


def test_no_augmentation_when_all_probabilities_are_zero():
    assert create_transform(AugConfig(rot90=0, rot270=0, hflip=0, vflip=0)) is None


def test_read_only_cached_rows_are_not_modified():
    img = np.random.default_rng(2).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    before = img.copy()
    img.flags.writeable = False  # as the memory-mapped cache hands its rows out
    for seed in range(20):
        out = Augment(AugConfig())(img, seed)
        assert out.shape == img.shape and out.flags.c_contiguous
    assert np.array_equal(img, before)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pipeline", "models"])
def test_bench_commands_print_a_headline_ratio(kind, tiny_demo, workdir, capsys):
    args = ["--data", str(tiny_demo), "--images", "24", "--workers", "1"] if kind == "pipeline" else \
        [TINY, "--max-batch", "2"]
    assert main(["bench", kind, *args, "--out", str(workdir / "bench.txt")]) == 0
    out = capsys.readouterr().out
    assert "speedup:" in out and "naive" in out if kind == "pipeline" else "plain_train" in out and "train_x" in out
    assert "speedup:" in (workdir / "bench.txt").read_text()


def test_stain_augmentation_moves_the_stain_and_follows_the_seed(sample_root):
    import cv2

    path = sorted(sample_root.rglob("*.bmp"))[0]
    img = cv2.resize(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), (64, 64), interpolation=cv2.INTER_AREA)
    off = dict(rot90=0, rot270=0, hflip=0, vflip=0)
    assert create_transform(AugConfig(**off)) is None
    t = create_transform(AugConfig(**off, stain=1.0))
    assert np.array_equal(t(img, 1), t(img, 1))
    moved = [np.abs(t(img, s).astype(int) - img).mean() for s in range(5)]
    assert min(moved) > 0.5 and len({round(m, 3) for m in moved}) == 5  # every seed moves it, each differently


def test_with_augment_on_gpu_only_the_stain_augmentation_stays_in_the_loader_workers():
    from alldetect.data.transforms import worker_only

    aug = AugConfig(rotate=1.0, color_jitter=0.8, stain=0.5)
    assert create_transform(worker_only(aug)).probs.tolist() == [0, 0, 0, 0]
    assert [type(s).__name__ for s in create_transform(worker_only(aug)).resampling.transforms] == ["HEStain"]
    assert create_transform(worker_only(AugConfig(stain=0.0))) is None
