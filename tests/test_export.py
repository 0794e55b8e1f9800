"""alldetect export: a model other software runs with onnxruntime (or TorchScript) alone, following the
preprocessing.json written beside it, gives the probabilities `alldetect predict` gives."""

import json
import shutil
import warnings

import cv2
import numpy as np
import onnxruntime
import pandas as pd
import pytest
import torch

from alldetect.cli import main
from alldetect.commands.predict import predict_command

from conftest import write_image
from fake_runs import make_run


def _lab_preprocessing(paths, spec):
    """What a lab writes from preprocessing.json alone, with OpenCV and numpy (no alldetect)."""
    out = []
    for path in paths:
        img = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        h, w = img.shape[:2]
        side = min(spec["crop"], h, w) if spec["crop"] else min(h, w)
        img = img[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        size = spec["input_size"]
        interp = getattr(cv2, spec["resize"]["shrink"] if side > size else spec["resize"]["enlarge"])
        out.append(cv2.resize(img, (size, size), interpolation=interp) if side != size else img)
    return np.stack(out)


def _export_and_compare(workdir, images, crop, overrides=()):
    make_run(workdir / "runs/proposed/fold0", weights=True, seed=3, crop=crop, overrides=overrides)
    predict_command(["runs/proposed/fold0"], str(images), "x", ["num_workers=0", "batch_size=4"])
    expected = pd.read_csv(workdir / "runs/proposed/fold0/pred_x.csv")
    assert main(["export", "runs/proposed", "--format", "onnx,torchscript"]) == 0
    folder = workdir / "exports/proposed_fold0"
    spec = json.loads((folder / "preprocessing.json").read_text())
    assert spec["input"]["dtype"] == "uint8" and spec["output"]["classes"] == ["hem", "all"]
    batch = _lab_preprocessing([images / p for p in expected["path"]], spec)
    assert batch.shape == (len(expected), *spec["input"]["shape"][1:])

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_probs = session.run(["probs"], {"images": batch})[0]
    np.testing.assert_allclose(onnx_probs[:, 1], expected["prob_all"], atol=2e-5)
    np.testing.assert_allclose(onnx_probs.sum(1), 1, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(folder / "model.torchscript.pt"))
    with torch.no_grad():
        scripted_probs = scripted(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(scripted_probs[:, 1], expected["prob_all"], atol=2e-5)
    assert len(set(np.round(onnx_probs[:, 1], 4))) > 1  # the images get different answers: a real comparison


@pytest.mark.slow
def test_exported_models_match_predict_on_any_batch_size(workdir):
    images = workdir / "held_out"
    for i in range(1, 6):  # 64 x 64, cropped to 48 and shrunk to the run's 32 x 32
        write_image(images / f"{i}.bmp", size=64)
    _export_and_compare(workdir, images, crop=48)


@pytest.mark.slow
def test_a_network_that_subtracts_each_images_mean_colour_exports_with_it(workdir):
    images = workdir / "held_out"
    for i in range(1, 6):
        write_image(images / f"{i}.bmp", size=40)
    _export_and_compare(workdir, images, crop=0, overrides=("subtract_mean=true",))


@pytest.mark.slow
def test_exported_models_match_predict_on_real_cnmc_images(sample_root, workdir):
    images = workdir / "real"
    images.mkdir()
    for i, path in enumerate(sorted(sample_root.rglob("*.bmp"))[:4], 1):  # 450 x 450, cropped to 400
        shutil.copy(path, images / f"{i}.bmp")
    _export_and_compare(workdir, images, crop=400)


def test_bad_export_requests_are_clear_errors(workdir, capsys):
    assert main(["export", "runs/nothing"]) == 2
    assert "run folder runs/nothing does not exist" in capsys.readouterr().err
    make_run(workdir / "runs/proposed/fold0", weights=True)
    assert main(["export", "runs/proposed", "--format", "tflite"]) == 2
    assert "--format 'tflite': choose from onnx, torchscript" in capsys.readouterr().err
    assert not (workdir / "exports").exists()
