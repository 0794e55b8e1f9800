import glob
import shutil

import pandas as pd
import pytest
import torch

from alldetect.cli import main
from alldetect.commands.train import train_command
from alldetect.config import load_config
from alldetect.data.folds import load_fold_file
from alldetect.data.prepare import resolve_folds
from alldetect.engine.fit import fit_fold
from alldetect.engine.rundir.files import RunDir, load_checkpoint
from alldetect.errors import UserError
from alldetect.models import create_model

from conftest import FAST, TINY, lock_held_elsewhere


def _cfg(root, *extra):
    return load_config(TINY, [*FAST, f"data.root={root}", *extra])


def test_train_one_fold_writes_the_run_folder(tiny_demo, workdir, capsys):
    [result] = train_command("proposed", "fold1", [*FAST, f"data.root={tiny_demo}"])
    run = workdir / "runs/proposed/fold1"
    assert result.run_dir == run.relative_to(workdir)
    for name in ("config.yaml", "history.csv", "best.pt", "last.pt", "oof.csv"):
        assert (run / name).is_file(), name
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [0, 1] and {"f1", "accuracy", "roc_auc", "val_loss", "lr"} <= set(history)
    folds = pd.read_csv(workdir / "folds/demo_k3_s42.csv", dtype={"subject": str})
    oof = pd.read_csv(run / "oof.csv", dtype={"subject": str})
    assert list(oof.columns) == ["path", "subject", "label", "prob_all", "pred", "fold"]
    assert sorted(oof["path"]) == sorted(folds[folds["fold"] == 1]["path"])
    held = folds[folds["fold"] == 1]
    assert dict(zip(oof["path"], oof["label"])) == dict(zip(held["path"], held["label"]))  # the fold file's labels
    assert (oof["pred"] == (oof["prob_all"] >= 0.5)).all()
    out = capsys.readouterr().out
    assert "runs/proposed/fold1" in out and "kept_epoch" in out and "select=ema" in out
    assert f"data: {tiny_demo.resolve()} (data.root); folds: folds/demo_k3_s42.csv (3 folds, 36 images)" in out


def test_checkpoint_alone_rebuilds_the_model(tiny_demo, workdir):
    train_command("proposed", "fold0", [*FAST, f"data.root={tiny_demo}"])
    state = load_checkpoint(workdir / "runs/proposed/fold0/best.pt")
    cfg = state.meta.config
    model = create_model(cfg.arch, dropout=cfg.dropout, input_size=cfg.input_size)
    model.load_state_dict(state.model)  # strict: every weight, nothing else
    history = pd.read_csv(workdir / "runs/proposed/fold0/history.csv")
    assert state.meta.fold_fingerprint == load_fold_file(state.meta.fold_file).meta.fingerprint
    assert state.meta.metrics["f1"] == pytest.approx(history.loc[state.meta.progress.epoch, "f1"], abs=1e-6)
    assert state.optimizer is None and state.ema is None  # best.pt keeps the weights it chose, no training state


class Interrupt(Exception):
    pass


def _stop_after(epoch_index):
    def on_epoch(epoch, metrics):
        if epoch == epoch_index:
            raise Interrupt

    return on_epoch


@pytest.mark.slow
def test_loader_workers_stop_when_a_fold_ends_even_on_an_exception(tiny_demo, workdir):
    """Workers ignore SIGTERM (the main process decides when to stop), so workers outliving their run would
    hang Python's exit; `alldetect tune` did, after trials that ended in a pruning exception."""
    import multiprocessing

    cfg = _cfg(tiny_demo, "data.num_workers=2", "epochs=2")
    folds = resolve_folds(cfg)
    fit_fold(cfg, 0, folds)
    assert multiprocessing.active_children() == []
    with pytest.raises(Interrupt) as kept:  # keeps the traceback, and with it fit_fold's frames, alive
        fit_fold(_cfg(tiny_demo, "data.num_workers=2", "epochs=2", "runs_dir=b"), 0, folds, on_epoch=_stop_after(0))
    assert kept.value is not None and multiprocessing.active_children() == []


@pytest.mark.slow
def test_resume_with_more_epochs_follows_the_longer_schedule(tiny_demo, workdir, caplog):
    """The schedule is a function of the update and the run's length: epochs 3-4 of a 2-epoch run resumed with
    epochs=4 get the learning rates of a run planned with 4 epochs from the start (not a restart at the top)."""
    extra = ["scheduler=cosine", "optimizer=adamw", "lr=0.01"]
    folds = resolve_folds(_cfg(tiny_demo, *extra))
    fit_fold(_cfg(tiny_demo, "runs_dir=long", "epochs=4", *extra), 0, folds)
    fit_fold(_cfg(tiny_demo, *extra), 0, folds)  # epochs=2: the lr reached the end of its cosine
    with caplog.at_level("WARNING", logger="alldetect"):
        fit_fold(_cfg(tiny_demo, "epochs=4", "resume=true", *extra), 0, folds)
    assert "epochs 2 -> 4: the cosine schedule now spans 4 epochs" in caplog.text
    resumed = pd.read_csv(workdir / "runs" / TINY / "fold0/history.csv")
    planned = pd.read_csv(workdir / "long" / TINY / "fold0/history.csv")
    assert list(resumed["epoch"]) == [0, 1, 2, 3]
    assert resumed["lr"].iloc[1] < 0.001  # the 2-epoch cosine ended near zero
    assert resumed["lr"].iloc[2:].tolist() == pytest.approx(planned["lr"].iloc[2:].tolist())
    assert resumed["lr"].iloc[3] < resumed["lr"].iloc[2] and 0.001 < resumed["lr"].iloc[2] < 0.01


@pytest.mark.slow
def test_resume_on_another_split_is_refused(tiny_demo, workdir):
    from alldetect.data.folds import make_fold_file

    cfg = _cfg(tiny_demo, "epochs=1")
    folds = resolve_folds(cfg)
    fit_fold(cfg, 0, folds)
    kept = workdir / "kept.csv"  # a copy of the split the run was trained on
    shutil.copy(folds.path, kept)
    shutil.copy(folds.path.with_suffix(".json"), kept.with_suffix(".json"))
    make_fold_file(tiny_demo, folds.path, k=3, seed=7)  # the fold file made again, differently, at the same path
    again = _cfg(tiny_demo, "epochs=2", "resume=true")
    with pytest.raises(UserError, match=r"fold file folds/demo_k3_s42.csv was made again .* splits the images "
                                        r"differently.*data.fold_file=FILE.*overwrite=true"):
        fit_fold(again, 0, resolve_folds(again))
    advised = _cfg(tiny_demo, "epochs=2", "resume=true", f"data.fold_file={kept}")  # what the error says to do
    fit_fold(advised, 0, resolve_folds(advised))
    assert len(pd.read_csv(workdir / "runs" / TINY / "fold0/history.csv")) == 2


def test_runs_know_their_fold_files_fold_count(tiny_demo, workdir):
    """--by official gives 3 folds whatever data.k says; ensemble and report count folds from the fold file."""
    cfg = _cfg(tiny_demo, "data.split_by=official", "data.k=5", "epochs=1")
    folds = resolve_folds(cfg)
    assert folds.k == 3
    fit_fold(cfg, 2, folds)
    assert RunDir(workdir / "runs" / TINY / "fold2").meta().k == 3


@pytest.mark.slow
def test_overwrite_removes_the_old_models_predictions(tiny_demo, workdir):
    cfg = _cfg(tiny_demo, "epochs=1")
    fit_fold(cfg, 0, resolve_folds(cfg))
    (workdir / "runs" / TINY / "fold0/pred_test.csv").write_text("path,prob_all\n")
    fit_fold(_cfg(tiny_demo, "epochs=1", "overwrite=true"), 0, resolve_folds(cfg))
    assert not (workdir / "runs" / TINY / "fold0/pred_test.csv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("balance", ["loss", "sampler"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_demo, workdir, balance):
    extra = ["epochs=3", f"class_balance={balance}", "aug.rotate=0.5", "aug.stain=0.5", "subtract_mean=true",
             "scheduler=cosine", "optimizer=adamw"]
    full = _cfg(tiny_demo, "runs_dir=a", *extra)
    folds = resolve_folds(full)
    fit_fold(full, 0, folds)
    cut = _cfg(tiny_demo, "runs_dir=b", *extra)
    with pytest.raises(Interrupt):
        fit_fold(cut, 0, folds, on_epoch=_stop_after(1))
    assert load_checkpoint(workdir / "b" / TINY / "fold0/last.pt").meta.progress.epoch == 1
    with pytest.raises(UserError, match="resume=true"):
        fit_fold(cut, 0, folds)
    fit_fold(_cfg(tiny_demo, "runs_dir=b", "resume=true", *extra), 0, folds)
    a = load_checkpoint(workdir / "a" / TINY / "fold0/last.pt").model
    b = load_checkpoint(workdir / "b" / TINY / "fold0/last.pt").model
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha = pd.read_csv(workdir / "a" / TINY / "fold0/history.csv")
    hb = pd.read_csv(workdir / "b" / TINY / "fold0/history.csv")
    pd.testing.assert_frame_equal(ha.drop(columns=["seconds", "images_per_s", "data_wait"]),
                                  hb.drop(columns=["seconds", "images_per_s", "data_wait"]))


def test_resume_with_other_settings_is_refused(tiny_demo, workdir):
    folds = resolve_folds(_cfg(tiny_demo))
    fit_fold(_cfg(tiny_demo, "epochs=1"), 0, folds)
    with pytest.raises(UserError, match=rf"lr: {_cfg(tiny_demo).lr} -> 0.1"):
        fit_fold(_cfg(tiny_demo, "epochs=2", "resume=true", "lr=0.1"), 0, folds)


@pytest.mark.slow
def test_overwrite_starts_over(tiny_demo, workdir):
    folds = resolve_folds(_cfg(tiny_demo))
    fit_fold(_cfg(tiny_demo, "epochs=2"), 0, folds)
    fit_fold(_cfg(tiny_demo, "epochs=1", "overwrite=true"), 0, folds)
    assert len(pd.read_csv(workdir / "runs" / TINY / "fold0/history.csv")) == 1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_demo, workdir, monkeypatch):
    import alldetect.engine.fit as fit

    calls = {"n": 0}

    class PoisonedLoss(torch.nn.CrossEntropyLoss):
        def forward(self, logits, target):
            calls["n"] += 1 if torch.is_grad_enabled() else 0  # training steps only
            loss = super().forward(logits, target)
            return loss * float("nan") if calls["n"] > 5 else loss  # epoch 1 has 3 batches

    monkeypatch.setattr(fit.nn, "CrossEntropyLoss", PoisonedLoss)
    with pytest.raises(UserError, match=r"loss became nan at epoch 2.*last.pt keeps the last good epoch \(1\)"):
        fit_fold(_cfg(tiny_demo, "epochs=3"), 0, resolve_folds(_cfg(tiny_demo)))
    assert load_checkpoint(workdir / "runs" / TINY / "fold0/last.pt").meta.progress.epoch == 0
    calls["n"] = 5  # from the first step: no epoch finishes, and the message must not claim a checkpoint
    with pytest.raises(UserError, match=r"loss became nan at epoch 1.*no epoch finished, so no checkpoint was "
                                        r"written") as error:
        fit_fold(_cfg(tiny_demo, "epochs=3", "runs_dir=b"), 0, resolve_folds(_cfg(tiny_demo)))
    assert "last.pt" not in str(error.value) and not (workdir / "b" / TINY / "fold0/last.pt").exists()


@pytest.mark.slow
def test_wandb_offline_writes_a_run(tiny_demo, workdir):
    [result] = train_command(TINY, "fold0", [*FAST, f"data.root={tiny_demo}", "wandb=offline", "epochs=1"])
    runs = glob.glob(str(workdir / "runs" / TINY / "fold0/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    assert load_checkpoint(workdir / "runs" / TINY / "fold0/last.pt").meta.progress.wandb_id in runs[0]


def test_bad_fold_and_override_are_clear_errors(tiny_demo, workdir, capsys):
    assert main(["train", TINY, "fold7", *FAST, f"data.root={tiny_demo}"]) == 2
    assert "'fold7' is not a fold: use fold0 .. fold2, all (every fold), or full" in capsys.readouterr().err
    assert main(["train", TINY, "fold0", "lr=fast", f"data.root={tiny_demo}"]) == 2
    assert "lr='fast'" in capsys.readouterr().err


def test_mistyped_names_fail_before_any_demo_data_are_built(workdir, capsys):
    assert main(["train", "resnet5", "fold0"]) == 2
    assert "unknown architecture 'resnet5'" in capsys.readouterr().err
    assert main(["train", "proposed", "fld0"]) == 2
    assert "'fld0' is not a fold" in capsys.readouterr().err
    assert not (workdir / "data").exists() and not (workdir / "folds").exists()


def test_unwritable_run_folder_fails_at_start(tiny_demo, workdir):
    (workdir / "a_file").write_text("not a folder")
    with pytest.raises(UserError, match="cannot write to the run folder"):
        train_command(TINY, "fold0", [*FAST, f"data.root={tiny_demo}", f"runs_dir={workdir / 'a_file'}"])


@pytest.mark.slow
def test_no_data_configured_uses_the_demo_data(workdir, capsys):
    [result] = train_command(TINY, "fold0", [*FAST, "epochs=1", "max_batches=2"])
    out = capsys.readouterr().out
    assert "SYNTHETIC demo data" in out
    assert (workdir / "data/demo/README.md").read_text().startswith("# Synthetic demo data")
    assert (workdir / "folds/demo_k3_s42.csv").is_file()
    assert len(pd.read_csv(workdir / "folds/demo_k3_s42.csv")) == 600


def test_a_fold_file_alone_names_its_data(tiny_demo, workdir):
    """data.fold_file= without data.root=: the fold file's sidecar says where the images are."""
    from alldetect.data.folds import make_fold_file

    make_fold_file(tiny_demo, workdir / "mine.csv", k=3, seed=1)
    [result] = train_command(TINY, "fold2", [*FAST, "epochs=1", f"data.fold_file={workdir / 'mine.csv'}"])
    oof = pd.read_csv(workdir / "runs" / TINY / "fold2/oof.csv")
    assert len(oof) and load_checkpoint(workdir / "runs" / TINY / "fold2/best.pt").meta.config.data.root == str(
        tiny_demo.resolve())


def test_any_result_of_a_run_guards_its_folder(tiny_demo, workdir):
    """Deleting last.pt (to save disk) must not let a plain rerun replace best.pt, oof.csv and history.csv."""
    folds = resolve_folds(_cfg(tiny_demo))
    fit_fold(_cfg(tiny_demo, "epochs=1"), 0, folds)
    run = workdir / "runs" / TINY / "fold0"
    (run / "last.pt").unlink()
    (run / "pred_test.csv").write_text("path,prob_all\n")
    before = (run / "oof.csv").read_text()
    with pytest.raises(UserError, match=r"already holds a run \(best.pt, history.csv, oof.csv, pred_test.csv\)"):
        fit_fold(_cfg(tiny_demo, "epochs=1"), 0, folds)
    with pytest.raises(UserError, match=r"cannot resume .*its last.pt is gone.*overwrite=true"):
        fit_fold(_cfg(tiny_demo, "epochs=1", "resume=true"), 0, folds)
    assert (run / "oof.csv").read_text() == before and (run / "pred_test.csv").is_file()
    fit_fold(_cfg(tiny_demo, "epochs=1", "overwrite=true"), 0, folds)
    assert (run / "last.pt").is_file() and not (run / "pred_test.csv").exists()


def test_a_run_folder_takes_one_training_at_a_time(tiny_demo, workdir):
    run = workdir / "runs" / TINY / "fold0"
    with lock_held_elsewhere(run / ".lock") as pid:
        with pytest.raises(UserError, match=rf"the run folder runs/{TINY}/fold0 is in use by another process "
                                            rf"\(pid {pid}\)"):
            fit_fold(_cfg(tiny_demo, "epochs=1"), 0, resolve_folds(_cfg(tiny_demo)))
        assert not (run / "config.yaml").exists()  # refused before it touched anything
    fit_fold(_cfg(tiny_demo, "epochs=1"), 0, resolve_folds(_cfg(tiny_demo)))  # a killed holder's lock is stale
    assert (run / "best.pt").is_file() and not (run / ".lock.pid").exists()


def test_a_data_root_that_is_a_file_says_so_before_naming_a_fold_file(workdir, monkeypatch, capsys):
    (workdir / "images.zip").write_bytes(b"PK")
    monkeypatch.setenv("ALLDETECT_DATA", str(workdir / "images.zip"))
    assert main(["train", TINY, "fold0", *FAST]) == 2
    captured = capsys.readouterr()
    assert "images.zip is a file, not a folder" in captured.err and "fold file" not in captured.err + captured.out
    assert not (workdir / "folds").exists()


def test_the_demo_data_named_by_a_fold_file_get_the_demo_profile(tiny_demo, workdir):
    from alldetect.data.folds import make_fold_file
    from alldetect.engine.train import resolve_config

    make_fold_file(tiny_demo, workdir / "demo.csv", k=3, seed=1)
    cfg, demo = resolve_config("proposed", [f"data.fold_file={workdir / 'demo.csv'}"], [])
    assert demo and cfg.input_size == 64 and cfg.epochs == 20  # configs/demo.yaml, not 300 x 300 for 30 epochs
    cfg, demo = resolve_config("proposed", [f"data.root={tiny_demo}"], [])
    assert demo and cfg.input_size == 64


def test_a_validation_fold_of_one_class_is_warned_about(tiny_data, tmp_path, caplog):
    """A fold file whose fold 0 holds one class was trained on without a word (ROC-AUC NaN, F1 of one class)."""
    from alldetect.data.folds import make_fold_file
    from alldetect.engine.distributed import Dist
    from alldetect.engine.folddata import fold_data

    out = tmp_path / "f.csv"
    table = make_fold_file(tiny_data, out, k=3, seed=42).table
    table.loc[(table["fold"] == 0) & (table["label"] == 0), "fold"] = 1  # whole people move: none crosses folds
    table.to_csv(out, index=False)
    cfg = load_config("proposed", [*FAST, f"data.root={tiny_data}", f"data.fold_file={out}"])
    with caplog.at_level("WARNING", logger="alldetect"):
        fold_data(cfg, load_fold_file(out), 0, 32, torch.device("cpu"), Dist()).close()
    assert f"fold0 of {out} holds 'all' images only: its ROC-AUC is undefined (NaN)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="alldetect"):
        fold_data(cfg, load_fold_file(out), 1, 32, torch.device("cpu"), Dist()).close()
    assert "images only" not in caplog.text
