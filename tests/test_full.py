"""./train.sh ARCH full: one final model trained on every image for the fold runs' fixed schedule, predicted and
submitted like a fold run, with its folder's fold runs standing in for it wherever out-of-fold data are needed."""

import shutil

import pandas as pd
import pytest
import torch

from alldetect.cli import main
from alldetect.commands.train import train_command
from alldetect.engine.rundir.files import load_checkpoint
from alldetect.errors import UserError

from conftest import FAST, write_image


@pytest.mark.slow
def test_full_trains_on_every_image_and_keeps_the_final_average(tiny_data, workdir, capsys):
    [result] = train_command("proposed", "full", [*FAST, f"data.root={tiny_data}"])
    run = workdir / "runs/proposed/full"
    assert result.run_dir.resolve() == run and result.train_images == 36  # 9 people x 4 images: nothing held out
    assert {p.name for p in run.iterdir()} >= {"best.pt", "last.pt", "history.csv", "config.yaml"}
    assert not (run / "oof.csv").exists()
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 2 and "f1" not in history and list(history["selected"]) == [0, 1]
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert best.meta.run == "full" and best.meta.train_images == 36 and best.meta.progress.epoch == 1
    for key, value in best.model.items():  # select=ema: best.pt is the final moving average
        assert torch.equal(value, last.ema[key]), key
    out = capsys.readouterr().out
    assert "trained on all 36 images" in out and "no validation fold, so no scores" in out


def test_full_refuses_what_needs_a_validation_fold(tiny_data, workdir, capsys):
    assert main(["train", "proposed", "full", *FAST, f"data.root={tiny_data}", "select=outer"]) == 2
    assert "full trains on every image, so no images are left to choose an epoch on" in capsys.readouterr().err
    assert main(["tune", "proposed", "--trials", "1", "--folds", "full", *FAST, f"data.root={tiny_data}"]) == 2
    assert "--folds full: a trial is scored on its validation folds" in capsys.readouterr().err
    assert main(["train", "proposed", "fulll", *FAST, f"data.root={tiny_data}"]) == 2
    assert "or full (one model trained on every image)" in capsys.readouterr().err
    assert not (workdir / "runs").exists()


@pytest.mark.slow
def test_full_is_predicted_and_submitted_with_its_folds_out_of_fold_threshold(tiny_data, workdir, capsys):
    overrides = [*FAST, "epochs=1", f"data.root={tiny_data}"]
    train_command("proposed", "all", overrides)
    train_command("proposed", "full", overrides)
    held_out = workdir / "held_out"
    for i in range(1, 5):
        write_image(held_out / f"{i}.bmp")
    assert main(["predict", "runs/proposed/full", "--data", str(held_out), "--name", "test", "num_workers=0"]) == 0
    capsys.readouterr()
    assert main(["ensemble", "runs/proposed/full", "--name", "test", "threshold=oof"]) == 0
    out = capsys.readouterr().out
    assert "proposed: weights and threshold fitted on the out-of-fold predictions of fold0, fold1, fold2" in out
    submitted = pd.read_csv(workdir / "submissions/test.csv")
    predicted = pd.read_csv(workdir / "runs/proposed/full/pred_test.csv")
    assert list(submitted["prob_all"]) == list(predicted["prob_all"])  # one member of one run: its own output
    assert main(["ensemble", "runs/proposed/full", "--oof"]) == 2
    assert "trained on every image, so it has no out-of-fold predictions" in capsys.readouterr().err
    for fold in range(3):  # only the final model left: naming its architecture's folder points at it
        shutil.rmtree(workdir / f"runs/proposed/fold{fold}")
    assert main(["predict", "runs/proposed", "--data", str(held_out), "--name", "again"]) == 2
    assert "its final model is runs/proposed/full (trained on every image), name it" in capsys.readouterr().err


@pytest.mark.slow
def test_extra_labelled_folders_join_the_training_images_and_are_checked(tiny_data, workdir, capsys):
    extra = workdir / "prelim"
    for cls in ("all", "hem"):
        for i in range(3):
            write_image(extra / cls / f"{cls}{i}.bmp", size=48)
    common = [*FAST, f"data.root={tiny_data}", "data.cache=true"]
    [result] = train_command("proposed", "full", [*common, f"data.extra=[{extra}]"])
    assert result.train_images == 36 + 6
    assert load_checkpoint(result.run_dir / "best.pt").meta.config.data.extra == [str(extra)]
    [fold] = train_command("proposed", "fold0", [*common, f"data.extra=[{extra}]"])
    plain = pd.read_csv(workdir / "runs/proposed/fold0/oof.csv")
    assert fold.train_images == 36 - len(plain) + 6 and not plain["path"].str.contains("prelim").any()
    assert main(["train", "proposed", "full", *common, "data.extra=[nowhere]", "runs_dir=r1"]) == 2
    assert "data.extra=nowhere: no such folder" in capsys.readouterr().err
    unlabelled = workdir / "unlabelled"
    write_image(unlabelled / "1.bmp", size=48)
    assert main(["train", "proposed", "full", *common, f"data.extra=[{unlabelled}]", "runs_dir=r2"]) == 2
    assert "extra training images need labels" in capsys.readouterr().err
    again = workdir / "again"
    write_image(again / "all/new.bmp", size=48)
    (again / "hem").mkdir()
    shutil.copy(next(tiny_data.rglob("*hem.bmp")), again / "hem")  # an image of the fold file, under its own name
    assert main(["train", "proposed", "full", *common, f"data.extra=[{again}]", "runs_dir=r3"]) == 2
    assert "they would be trained on and validated on" in capsys.readouterr().err


def _extra_folder(root, copy_of=None):
    for cls in ("all", "hem"):
        for i in range(2):
            write_image(root / cls / f"{cls}{i}.bmp", size=48)
    if copy_of is not None:
        shutil.copy(copy_of, root / "hem" / "renamed.bmp")
    return root


def test_extra_copies_of_fold_images_under_other_names_are_refused(tiny_data, workdir):
    """data.extra trained on renamed byte-identical copies of validation images without a word."""
    from alldetect.data.extra import extra_rows
    from alldetect.data.layouts import build_manifest

    table = build_manifest(tiny_data)
    original = table["path"][table["path"].str.endswith("hem.bmp")].iloc[0]
    extra = _extra_folder(workdir / "copies", copy_of=tiny_data / original)
    with pytest.raises(UserError, match=rf"data.extra={extra}: 1 image\(s\) are byte-identical to images of the fold "
                                        rf"file under other names \(hem/renamed.bmp = .*{original}\).*Leave them out"):
        extra_rows([str(extra)], table, tiny_data)
    (extra / "hem/renamed.bmp").unlink()
    assert len(extra_rows([str(extra)], table, tiny_data)) == 4


def test_the_same_extra_folder_listed_twice_is_refused(tiny_data, workdir, monkeypatch):
    from alldetect.data.extra import extra_rows
    from alldetect.data.layouts import build_manifest

    table = build_manifest(tiny_data)
    _extra_folder(workdir / "prelim")
    monkeypatch.chdir(workdir / "prelim")
    with pytest.raises(UserError, match=r"data.extra=./: 4 of its image\(s\) were added already by "
                                        rf"data.extra={workdir / 'prelim'} .*list each folder once"):
        extra_rows([str(workdir / "prelim"), "./"], table, tiny_data)
    (workdir / "link").symlink_to(workdir / "prelim")
    with pytest.raises(UserError, match=r"data.extra=../link: 4 of its image\(s\) were added already by data.extra=./"):
        extra_rows(["./", "../link"], table, tiny_data)
