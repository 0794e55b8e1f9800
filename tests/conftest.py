"""Shared fixtures: tiny generated data sets, the real C-NMC sample (skipped where absent), fast configs."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("ALLDETECT_SAMPLE", REPO.parent / "shared" / "data" / "cnmc-sample"))

# Fast, quiet, offline: no W&B account, no hub downloads, no data set from the environment.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["ALLDETECT_CONFIGS"] = str(REPO / "configs")
os.environ.pop("ALLDETECT_DATA", None)
if os.environ.get("PYTEST_XDIST_WORKER"):  # ./test.sh runs two workers on two cores: one thread each, not two
    os.environ["OMP_NUM_THREADS"] = "1"  # and the processes the tests start
    import torch

    torch.set_num_threads(1)

def pytest_configure(config):
    """`pytest tests/x.py::test_y` names a test: run it even when it is marked slow or acceptance. pyproject's
    addopts (-m 'not slow and not acceptance', so that a bare `pytest` stays quick) would otherwise deselect it
    without a word. The expression is read from addopts itself, so the two cannot drift apart."""
    addopts = config.getini("addopts")
    default = next((value for flag, value in zip(addopts, addopts[1:]) if flag == "-m"), None)
    if default is not None and config.option.markexpr == default and any("::" in arg for arg in config.args):
        config.option.markexpr = ""


# Settings that make a training run take seconds on the CPU.
FAST = ["input_size=32", "epochs=2", "batch_size=8", "data.num_workers=0", "wandb=off", "data.k=3"]
# timm's own test network (0.37 M weights, a 6 MB last.pt): for tests of the trainer and the files around it, where
# which network trains does not matter. The study's proposed network has 13.7 M weights at any input size, so each
# of its last.pt files is 220 MB and a two-epoch run spends more time saving than training.
TINY = "test_resnet"


@pytest.fixture
def sample_root() -> Path:
    if not (SAMPLE / "C-NMC_training_data").is_dir():
        pytest.skip(f"the real C-NMC sample is not at {SAMPLE} (it lives in ../shared beside the repository)")
    return SAMPLE


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """9 subjects x 4 images of synthetic cells in the C-NMC training layout."""
    from alldetect.data.demo import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo") / "demo", subjects=9, per_subject=4, seed=1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_demo) -> Path:
    """The tiny demo images as someone's own data: without the demo README, so no demo profile is applied."""
    root = tmp_path_factory.mktemp("data") / "cells"
    shutil.copytree(tiny_demo, root)
    (root / "README.md").unlink()
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in a temporary folder so runs/, folds/ and data/ land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@contextlib.contextmanager
def lock_held_elsewhere(lock: Path):
    """Another process holds `lock` (alldetect.locks.exclusive) until the block ends, then is killed: yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from alldetect.locks import exclusive; from pathlib import Path\n"
        f"with exclusive(Path({str(lock)!r}), 'x'):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def write_image(path: Path, img: np.ndarray | None = None, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if img is None:
        rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
        img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)
    return path
