import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from alldetect.cli import main
from alldetect.commands.predict import predict_command
from alldetect.data.images import preprocess, read_rgb
from alldetect.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from alldetect.engine.loop import DeviceBatch, predict_probs
from alldetect.engine.predict import tta_views
from alldetect.engine.rundir.files import load_checkpoint
from alldetect.errors import UserError

from conftest import write_image
from fake_runs import edit_checkpoint, make_run

FAST = ["num_workers=0", "batch_size=4"]


def _prelim(root, n=11):
    """A C-NMC preliminary-test-like folder: 1.bmp..n.bmp (64 x 64) and its labels file."""
    images = root / "C-NMC_test_prelim_phase_data"
    rows = []
    for i in range(1, n + 1):
        write_image(images / f"{i}.bmp")
        cls = "all" if i % 3 else "hem"
        subject = f"{50 + i % 2}" if cls == "all" else f"H{60 + i % 2}"
        rows.append(f"UID_{subject}_{i}_1_{cls}.bmp,{i}.bmp,{int(cls == 'all')}")
    (root / "C-NMC_test_prelim_phase_data_labels.csv").write_text("Patient_ID,new_names,labels\n" + "\n".join(rows))
    return images


@pytest.fixture
def runs(workdir):
    """runs/proposed/fold0 and fold1: randomly initialised proposed networks at 32 x 32, crop 48 of 64."""
    for k in range(2):
        make_run(workdir / f"runs/proposed/fold{k}", weights=True, seed=k, crop=48)
    return workdir / "runs/proposed"


@pytest.mark.slow
def test_predictions_rebuild_the_model_from_its_checkpoint_and_are_deterministic(runs, workdir, capsys):
    data = _prelim(workdir / "prelim")
    predict_command(["runs/proposed"], str(data), "prelim", FAST)
    out = capsys.readouterr().out
    first = (runs / "fold0/pred_prelim.csv").read_bytes()
    pred = pd.read_csv(runs / "fold0/pred_prelim.csv", dtype={"subject": str})
    assert list(pred.columns) == ["path", "prob_all", "label", "subject"]
    assert list(pred["path"]) == [f"{i}.bmp" for i in range(1, 12)]
    assert list(pred["label"]) == [int(i % 3 != 0) for i in range(1, 12)] and pred["subject"][0] == "51"
    meta = json.loads((runs / "fold0/pred_prelim.json").read_text())
    assert meta["tta"] == "none" and meta["layout"] == "cnmc_prelim" and meta["images"] == 11
    assert meta["data_root"] == str(data.resolve()) and len(meta["data_fingerprint"]) == 16
    assert "runs/proposed/fold1" in out and "f1" in out

    # the same probabilities as the checkpoint's model on the run's own preprocessing (crop 48, resize 32)
    state = load_checkpoint(runs / "fold0/best.pt")
    model, size, crop = state.network(), state.meta.input_size, state.meta.crop
    assert (size, crop) == (32, 48)
    img = preprocess(read_rgb(data / "5.bmp"), crop, size).astype(np.float32)
    x = torch.from_numpy(((img - np.array(IMAGENET_MEAN) * 255) / (np.array(IMAGENET_STD) * 255))
                         .transpose(2, 0, 1)[None].astype(np.float32))
    with torch.no_grad():
        expected = torch.softmax(model.eval()(x), 1)[0, 1].item()
    assert pred.loc[4, "prob_all"] == pytest.approx(expected, abs=2e-6)
    assert not np.allclose(pred["prob_all"], pd.read_csv(runs / "fold1/pred_prelim.csv")["prob_all"])

    # the same command again: the same bytes
    predict_command(["runs/proposed"], str(data), "prelim", FAST)
    assert (runs / "fold0/pred_prelim.csv").read_bytes() == first
    # another batch size picks other CPU kernels: the same numbers up to float rounding, never other rows
    predict_command(["runs/proposed"], str(data), "prelim", [*FAST, "batch_size=3"])
    rebatched = pd.read_csv(runs / "fold0/pred_prelim.csv", dtype={"subject": str})
    assert list(rebatched["path"]) == list(pred["path"]) and list(rebatched["label"]) == list(pred["label"])
    np.testing.assert_allclose(rebatched["prob_all"], pred["prob_all"], atol=1e-5)


class Orientation(nn.Module):
    """Logits from a fixed random weight map: rotating or mirroring the input changes the output."""

    def __init__(self, size):
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)) / size)

    def forward(self, x):
        s = (x * self.w).sum((1, 2, 3))
        return torch.stack([-s, s], 1)


def _d8_by_closure(img):
    """The images reachable from img by rotating by 90 degrees and mirroring, without repeats (8 for a generic
    image), built independently of the code under test."""
    seen, todo = {}, [img]
    while todo:
        a = todo.pop()
        if a.tobytes() not in seen:
            seen[a.tobytes()] = a
            todo += [np.rot90(a, axes=(1, 2)).copy(), a[:, :, ::-1].copy()]
    return list(seen.values())


def test_d8_tta_averages_the_eight_views():
    size = 8
    batch = torch.randint(0, 256, (5, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    nhwc = batch.permute(0, 2, 3, 1).contiguous()  # what the loader hands over
    loader = [(nhwc[:3], torch.zeros(3), None), (nhwc[3:], torch.zeros(2), None)]
    model, dev = Orientation(size), DeviceBatch(torch.device("cpu"), False, False)
    got = {mode: predict_probs(model, loader, dev, views=tta_views(mode, dev))[0][:, 1] for mode in ("none", "flip", "d8")}

    normed = ((batch.float() / 255 - dev.mean) / dev.std).numpy()
    w = model.w.detach().numpy()[0]

    def prob(a):
        return 1 / (1 + np.exp(-2 * (a * w).sum()))  # softmax of (-s, s)

    expected_d8 = [np.mean([prob(v) for v in _d8_by_closure(img)]) for img in normed]
    assert all(len(_d8_by_closure(img)) == 8 for img in normed)
    np.testing.assert_allclose(got["d8"], expected_d8, atol=1e-6)
    np.testing.assert_allclose(got["flip"], [(prob(a) + prob(a[:, :, ::-1])) / 2 for a in normed], atol=1e-6)
    np.testing.assert_allclose(got["none"], [prob(a) for a in normed], atol=1e-6)
    assert np.abs(got["d8"] - got["none"]).min() > 1e-4  # the model does see orientation


@pytest.mark.parametrize("n", [8, 16])
def test_rotation_tta_averages_rotations_with_black_corners(n):
    """rot8 / rot16 against scipy's bilinear rotation of the [0, 1] image about its centre, with black outside."""
    from scipy.ndimage import affine_transform

    size = 9
    batch = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    loader = [(batch.permute(0, 2, 3, 1).contiguous(), torch.zeros(3), None)]
    model, dev = Orientation(size), DeviceBatch(torch.device("cpu"), False, False)
    got = predict_probs(model, loader, dev, views=tta_views(f"rot{n}", dev))[0][:, 1]

    w = model.w.detach().numpy()[0]
    mean, std = dev.mean.numpy()[0], dev.std.numpy()[0]
    centre = np.array([(size - 1) / 2] * 2)

    def rotated(img01, angle):  # each channel sampled at R(o - c) + c, zero beyond the edge, bilinear
        r = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        return np.stack([affine_transform(c, r, offset=centre - r @ centre, order=1, mode="grid-constant", cval=0.0)
                         for c in img01])

    def prob(img01):
        a = (img01 - mean) / std
        return 1 / (1 + np.exp(-2 * (a * w).sum()))

    imgs = batch.double().numpy() / 255
    expected = [np.mean([prob(rotated(img, 2 * np.pi * k / n)) for k in range(n)]) for img in imgs]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(got - [prob(img) for img in imgs]).min() > 1e-4  # the views differ from the image alone


def test_tta_option_is_used_and_recorded(runs, workdir):
    data = _prelim(workdir / "prelim", n=4)
    predict_command(["runs/proposed/fold0"], str(data), "a", [*FAST, "tta=d8"])
    predict_command(["runs/proposed/fold0"], str(data), "b", FAST)
    assert json.loads((runs / "fold0/pred_a.json").read_text())["tta"] == "d8"
    a, b = (pd.read_csv(runs / f"fold0/pred_{n}.csv")["prob_all"] for n in "ab")
    assert not np.allclose(a, b) and not (runs / "fold1/pred_a.csv").exists()


def test_unlabelled_folder_has_no_label_column(runs, workdir, capsys):
    for i in range(1, 4):
        write_image(workdir / "final" / f"{i}.bmp")
    predict_command(["runs/proposed/fold1"], str(workdir / "final"), "final", FAST)
    assert list(pd.read_csv(runs / "fold1/pred_final.csv").columns) == ["path", "prob_all"]
    assert "unlabelled: no scores" in capsys.readouterr().out


def test_bad_images_empty_folders_and_runs_without_checkpoint(runs, workdir):
    data = _prelim(workdir / "prelim", n=4)
    (data / "3.bmp").write_bytes(b"")
    with pytest.raises(UserError, match=r"3\.bmp: empty file.*move them out of the folder") as error:
        predict_command(["runs/proposed"], str(data), "x", FAST)
    assert "skip_bad=true" not in str(error.value)  # an option predict does not take
    (workdir / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        predict_command(["runs/proposed"], str(workdir / "empty"), "x", FAST)
    (workdir / "runs/vgg16/fold0").mkdir(parents=True)
    (workdir / "runs/vgg16/fold0/config.yaml").write_text("arch: vgg16\n")
    with pytest.raises(UserError, match=r"runs/vgg16/fold0 have no checkpoint \(best\.pt\)"):
        predict_command(["runs/vgg16"], str(data), "x", FAST)
    with pytest.raises(UserError, match=r"runs/vgg16/fold0 holds no checkpoint"):
        predict_command(["runs/vgg16/fold0"], str(data), "x", FAST)
    with pytest.raises(UserError, match="runs/nothing does not exist"):
        predict_command(["runs/nothing"], str(data), "x", FAST)


def test_a_damaged_checkpoint_in_a_later_fold_stops_predict_before_it_writes(runs, workdir):
    from test_runfiles import _zero_a_block_of_weights

    data = _prelim(workdir / "prelim", n=4)
    _zero_a_block_of_weights(runs / "fold1/best.pt")  # a bad block: torch.load would read it as weights
    with pytest.raises(UserError, match=r"fold1/best.pt is damaged: the checksum of its record"):
        predict_command(["runs/proposed"], str(data), "x", FAST)
    (runs / "fold1/best.pt").write_bytes(b"truncated")
    with pytest.raises(UserError, match=r"fold1/best.pt: damaged or not a checkpoint"):
        predict_command(["runs/proposed"], str(data), "x", FAST)
    assert not list(runs.glob("fold*/pred_x.*"))


def test_cli_options_and_errors(runs, workdir, capsys):
    data = _prelim(workdir / "prelim", n=3)
    assert main(["predict", "runs/proposed/fold0", "--data", str(data), "--name", "p", "tta=flip", *FAST]) == 0
    assert main(["predict", "runs/proposed/fold0", "tta=flip", "--data", str(data), "--name", "q", *FAST]) == 0
    assert (runs / "fold0/pred_q.csv").read_bytes() == (runs / "fold0/pred_p.csv").read_bytes()
    capsys.readouterr()
    assert main(["predict", "runs/proposed", "--data", str(data), "--name", "p", "tta=d4"]) == 2
    assert "tta=d4: choose one of none, flip, d8, rot8, rot16" in capsys.readouterr().err
    assert main(["predict", "runs/proposed", "--data", str(data), "--name", "p", "tt=d8"]) == 2
    assert "unknown option tt= for `alldetect predict`. Valid options: tta=, batch_size=" in capsys.readouterr().err
    assert main(["predict", "runs/proposed", "--data", str(data), "--name", "a/b"]) == 2
    assert "--name 'a/b'" in capsys.readouterr().err


def test_real_sample_predictions_know_labels_and_subjects(sample_root, workdir):
    make_run(workdir / "runs/proposed/fold0", weights=True)
    predict_command(["runs/proposed"], str(sample_root), "sample", FAST)
    pred = pd.read_csv(workdir / "runs/proposed/fold0/pred_sample.csv", dtype={"subject": str})
    assert len(pred) == 60 and set(pred["label"]) == {0, 1} and pred["subject"].notna().all()
    assert pred["path"].str.startswith("C-NMC_training_data/fold_").all()


def test_predictions_of_a_replaced_checkpoint_are_refused_or_removed(runs, workdir):
    """Retrained or resumed since `predict`: the old probabilities must not slip into a submission."""
    from alldetect.commands.ensemble import ensemble_command

    data = _prelim(workdir / "prelim")
    predict_command(["runs/proposed"], str(data), "prelim", FAST)
    ensemble_command(["runs/proposed"], oof=False, name="prelim")  # fine while best.pt is the one that predicted
    saved = load_checkpoint(runs / "fold1/best.pt", mmap=True).meta.saved_at
    edit_checkpoint(runs / "fold1/best.pt", saved_at=saved + 60)  # a better epoch since
    with pytest.raises(UserError, match=r"predictions 'prelim' of .*fold1.* older best.pt .*alldetect predict"):
        ensemble_command(["runs/proposed"], oof=False, name="prelim")


@pytest.mark.slow
def test_renamed_copies_of_training_images_are_named_as_not_held_out(runs, workdir, tiny_data, caplog):
    """Only names were compared: a renamed copy of a training image was predicted as if held out."""
    import shutil

    from alldetect.data.folds import make_fold_file

    folds = make_fold_file(tiny_data, workdir / "folds/data_k3_s42.csv", k=3, seed=42)  # the runs' fold file
    data = workdir / "test"
    trained = folds.table["path"][:2].tolist()
    data.mkdir()
    for i, path in enumerate(trained, start=1):
        shutil.copy(tiny_data / path, data / f"{i}.bmp")
    write_image(data / "3.bmp")
    with caplog.at_level("WARNING", logger="alldetect"):
        predict_command(["runs/proposed/fold0"], str(data), "t", FAST)
    assert (f"2 image(s) of {data} are byte-identical to images runs/proposed/fold0 was trained or validated on "
            f"(1.bmp = {tiny_data / trained[0]}, 2.bmp = {tiny_data / trained[1]}): their scores are not held-out "
            "scores") in caplog.text
    caplog.clear()
    for copy in ("1.bmp", "2.bmp"):
        (data / copy).unlink()
    with caplog.at_level("WARNING", logger="alldetect"):
        predict_command(["runs/proposed/fold0"], str(data), "t2", FAST)
    assert "held-out" not in caplog.text
    extra = workdir / "extra"  # images a run trained on beside its fold file's (data.extra)
    write_image(extra / "all/a.bmp"), write_image(extra / "hem/h.bmp")
    shutil.copy(extra / "hem/h.bmp", data / "4.bmp")
    old = load_checkpoint(runs / "fold0/best.pt").meta.config.data
    edit_checkpoint(runs / "fold0/best.pt", config={"data": old.model_copy(update={"extra": [str(extra)]})})
    with caplog.at_level("WARNING", logger="alldetect"):
        predict_command(["runs/proposed/fold0"], str(data), "t3", FAST)
    assert (f"1 image(s) of {data} are byte-identical to images runs/proposed/fold0 was trained or validated on "
            f"(4.bmp = {extra / 'hem/h.bmp'})") in caplog.text
def test_an_ensemble_of_predictions_of_other_images_of_the_same_names_and_sizes_is_refused(runs, workdir, capsys):
    """Two folders of 1.bmp..4.bmp of one size (as every C-NMC test folder is): the content tells them apart; a copy
    of the same images elsewhere is the same data."""
    from alldetect.commands.ensemble import ensemble_command

    first = _prelim(workdir / "prelim", n=4)
    other = _prelim(workdir / "prelimB", n=4)
    rng = np.random.default_rng(7)
    for i in range(1, 5):
        write_image(other / f"{i}.bmp", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert all((first / f"{i}.bmp").stat().st_size == (other / f"{i}.bmp").stat().st_size for i in range(1, 5))
    predict_command(["runs/proposed/fold0"], str(first), "mix", FAST)
    predict_command(["runs/proposed/fold1"], str(other), "mix", FAST)
    a, b = (json.loads((runs / f"fold{k}/pred_mix.json").read_text()) for k in range(2))
    assert a["data_fingerprint"] == b["data_fingerprint"] and a["data_content"] != b["data_content"]
    with pytest.raises(UserError, match=r"predictions 'mix' were made of different images: .*fold0: .*prelim/"
                                        r"C-NMC_test_prelim_phase_data \(content .*fold1: .*prelimB/"):
        ensemble_command(["runs/proposed"], oof=False, name="mix")
    copy = workdir / "copy/C-NMC_test_prelim_phase_data"
    copy.parent.mkdir()
    shutil.copytree(first, copy)
    shutil.copy(first.parent / "C-NMC_test_prelim_phase_data_labels.csv", copy.parent)
    predict_command(["runs/proposed/fold1"], str(copy), "mix", FAST)
    record = ensemble_command(["runs/proposed"], oof=False, name="mix")
    assert record["data_content"] == a["data_content"] and len(record["data_roots"]) == 2


def test_a_name_too_long_for_a_file_fails_before_the_model_runs(runs, workdir, monkeypatch):
    import alldetect.commands.predict as command

    data = _prelim(workdir / "prelim", n=2)
    monkeypatch.setattr(command, "predict_run", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(UserError, match=r"--name xxxxxxxxxxxxxxxxxxxx... is 300 characters long: use at most 200"):
        predict_command(["runs/proposed"], str(data), "x" * 300, FAST)


def test_non_finite_weights_are_refused_before_anything_is_written(runs, workdir, capsys):
    data = _prelim(workdir / "prelim", n=2)
    state = load_checkpoint(runs / "fold1/best.pt")
    weights = dict(state.model)
    key = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 10)
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = float("nan")
    from alldetect.engine.rundir.files import Checkpoint, save_checkpoint

    save_checkpoint(runs / "fold1/best.pt", Checkpoint(state.meta, weights))
    assert main(["predict", "runs/proposed", "--data", str(data), "--name", "n", *FAST]) == 2
    err = capsys.readouterr().err
    assert "fold1/best.pt holds non-finite weights: 1 of the" in err and key in err and "Traceback" not in err
    assert not list(runs.glob("fold*/pred_n.*"))
    assert main(["visualize", "runs/proposed/fold1", str(data / "1.bmp")]) == 2
    assert "holds non-finite weights" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["predict", "ensemble"])
def test_the_help_lists_every_declared_option_with_its_default(command, capsys):
    """Options are declared once (alldetect.options): what --help lists comes from the same declaration that
    parses and validates them, so a new option cannot be missing from it."""
    from alldetect.options import ENSEMBLE_OPTIONS, PREDICT_OPTIONS, parse_options

    spec = PREDICT_OPTIONS if command == "predict" else ENSEMBLE_OPTIONS
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the epilog
    for key, option in spec.items():
        default = str(option.default).lower() if isinstance(option.default, bool) else option.default
        assert f"{key}={option.values} (default {default}" in text
    assert parse_options({}, spec, command) == {k: o.default for k, o in spec.items()}
