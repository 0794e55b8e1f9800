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


def _export_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.slow
def test_an_export_folder_is_written_whole_and_another_runs_is_replaced_only_with_overwrite(workdir, capsys,
                                                                                             monkeypatch):
    import alldetect.export as export

    make_run(workdir / "runs/proposed/fold0", weights=True, input_size=32)
    make_run(workdir / "other/proposed/fold0", weights=True, input_size=48, seed=1)
    folder = workdir / "exports/proposed_fold0"
    assert main(["export", "runs/proposed/fold0", "--format", "onnx,torchscript"]) == 0
    first = _export_files(folder)
    assert main(["export", "runs/proposed/fold0", "--format", "torchscript"]) == 0  # its own export: replaced
    assert sorted(_export_files(folder)) == ["model.torchscript.pt", "preprocessing.json"]  # no stale model.onnx
    assert main(["export", "runs/proposed/fold0", "--format", "onnx,torchscript"]) == 0
    first = _export_files(folder)
    capsys.readouterr()

    assert main(["export", "other/proposed/fold0", "--format", "torchscript"]) == 2  # another run's export
    err = capsys.readouterr().err
    assert f"{folder.relative_to(workdir)} holds the export of {workdir}/runs/proposed/fold0, not of " \
           "other/proposed/fold0: pass --overwrite" in err
    assert _export_files(folder) == first

    def killed(*args):  # stopped after the new model.onnx was written, before preprocessing.json
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(export, "_run_torchscript", killed)
        assert main(["export", "other/proposed/fold0", "--format", "onnx,torchscript", "--overwrite"]) == 130
    assert _export_files(folder) == first  # the old export whole: no input-48 model beside input-32 preprocessing
    assert sorted(p.name for p in folder.parent.iterdir()) == ["proposed_fold0"]  # no temporary folder left

    assert main(["export", "other/proposed/fold0", "--format", "torchscript", "--overwrite"]) == 0
    assert sorted(_export_files(folder)) == ["model.torchscript.pt", "preprocessing.json"]
    assert json.loads((folder / "preprocessing.json").read_text())["input_size"] == 48
    assert folder.stat().st_mode & 0o777 == 0o777 & ~_umask()

    (folder / "README.txt").write_text("how we use it")  # a user's file: never removed, --overwrite or not
    assert main(["export", "runs/proposed/fold0", "--format", "torchscript", "--overwrite"]) == 2
    assert "holds files `alldetect export` does not write (README.txt)" in capsys.readouterr().err
    assert (folder / "README.txt").read_text() == "how we use it"


def _umask():
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_export_out_that_is_no_folder_names_out(workdir, capsys):
    make_run(workdir / "runs/proposed/fold0", weights=True)
    (workdir / "afile").write_text("")
    for out in ("afile", "/proc/x", "afile/sub"):
        assert main(["export", "runs/proposed", "--out", out]) == 2, out
        err = capsys.readouterr().err
        assert "--out" in err and out in err and "Traceback" not in err, (out, err)


def test_damaged_checkpoints_are_refused_by_export_with_the_checkpoint_blamed(workdir, capsys):
    from alldetect.engine.rundir.files import Checkpoint, load_checkpoint, save_checkpoint

    run = make_run(workdir / "runs/proposed/fold0", weights=True)
    state = load_checkpoint(run / "best.pt")
    weights = {k: (v.clone().fill_(float("inf")) if k.endswith("weight") and v.is_floating_point() else v)
               for k, v in state.model.items()}
    save_checkpoint(run / "best.pt", Checkpoint(state.meta, weights))
    assert main(["export", "runs/proposed"]) == 2
    err = capsys.readouterr().err
    assert "runs/proposed/fold0/best.pt holds non-finite weights" in err and "please report" not in err
    make_run(run, weights=True)
    from test_runfiles import _zero_a_block_of_weights

    _zero_a_block_of_weights(run / "best.pt")
    assert main(["export", "runs/proposed"]) == 2
    assert "fold0/best.pt is damaged: the checksum of its record" in capsys.readouterr().err
    torch.save({"meta": "a string", "model": {}}, run / "best.pt")
    assert main(["export", "runs/proposed"]) == 2
    err = capsys.readouterr().err
    assert "is not an alldetect checkpoint (its metadata are a str" in err and "Traceback" not in err
    assert not (workdir / "exports").exists()
