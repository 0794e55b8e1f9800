import numpy as np
import pytest

from alldetect.cli import main
from alldetect.config import AugConfig
from alldetect.data.transforms import Augment, create_transform


def _reference(img, seed, probs=(0.5, 0.5, 0.5, 0.5)):
    """The report's steps one by one, with numpy: rot90, rot270, horizontal flip, vertical flip."""
    rot90, rot270, hflip, vflip = np.random.default_rng(seed).random(4) < np.array(probs)
    if rot90:
        img = np.rot90(img, 1)
    if rot270:
        img = np.rot90(img, 3)
    if hflip:
        img = img[:, ::-1]
    if vflip:
        img = img[::-1]
    return img


def test_report_augmentations_are_exact_and_reach_all_eight_symmetries():
    img = np.random.default_rng(0).integers(0, 255, (7, 7, 3), dtype=np.uint8)
    t = Augment(AugConfig())
    outputs = set()
    for seed in range(200):
        out = t(img, seed)
        assert out.flags.c_contiguous and np.array_equal(out, _reference(img, seed))
        outputs.add(out.tobytes())
    assert len(outputs) == 8


def test_augmentation_is_a_function_of_the_seed():
    img = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    t = Augment(AugConfig(rotate=1.0, color_jitter=1.0))
    assert np.array_equal(t(img, 3), t(img, 3))
    assert not np.array_equal(t(img, 3), t(img, 4))


def test_no_augmentation_when_all_probabilities_are_zero():
    assert create_transform(AugConfig(rot90=0, rot270=0, hflip=0, vflip=0)) is None


def test_read_only_cached_rows_are_not_modified():
    img = np.random.default_rng(2).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    img.flags.writeable = False
    for seed in range(20):
        Augment(AugConfig())(img, seed)


@pytest.mark.parametrize("kind", ["pipeline", "models"])
def test_bench_commands_print_a_headline_ratio(kind, tiny_demo, workdir, capsys):
    args = ["--data", str(tiny_demo), "--images", "24", "--workers", "1"] if kind == "pipeline" else \
        ["resnet18", "--steps", "1", "--max-batch", "2"]
    assert main(["bench", kind, *args, "--out", str(workdir / "bench.txt")]) == 0
    out = capsys.readouterr().out
    assert "speedup:" in out and "naive" in out if kind == "pipeline" else "train_plain" in out
    assert "speedup:" in (workdir / "bench.txt").read_text()
