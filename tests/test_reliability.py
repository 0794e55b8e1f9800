"""Nothing lost, nothing silently wrong, nothing unsafe loaded: faults injected on purpose."""

import os
import re
import signal
import subprocess
import sys
import time
from collections import namedtuple

import numpy as np
import pandas as pd
import pytest
import torch

from alldetect.atomic import write_csv, write_text
from alldetect.config import load_config, read_yaml
from alldetect.data.prepare import resolve_folds
from alldetect.engine.fit import fit_fold
from alldetect.engine.rundir.files import Checkpoint, RunMeta, load_checkpoint, save_checkpoint
from alldetect.engine.stopping import StopRequested
from alldetect.errors import UserError

from conftest import FAST, TINY

HISTORY_STABLE = ["epoch", "train_loss", "val_loss", "f1", "accuracy", "precision", "recall", "roc_auc", "lr"]


def _cfg(root, *extra):
    return load_config(TINY, [*FAST, f"data.root={root}", *extra])


def _same_weights(a_dir, b_dir):
    a, b = load_checkpoint(a_dir / "last.pt").model, load_checkpoint(b_dir / "last.pt").model
    return all(torch.equal(a[k], b[k]) for k in a)


def _same_history(a_dir, b_dir):
    pd.testing.assert_frame_equal(pd.read_csv(a_dir / "history.csv")[HISTORY_STABLE],
                                  pd.read_csv(b_dir / "history.csv")[HISTORY_STABLE])


class SignalAt(torch.nn.CrossEntropyLoss):
    """A loss that sends this process SIGTERM at its n-th training call (the step still finishes)."""

    n = 0
    at = 5

    def forward(self, logits, target):
        if torch.is_grad_enabled():  # training steps only, not validation
            SignalAt.n += 1
            if SignalAt.n == SignalAt.at:
                os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(logits, target)


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_resumes_to_the_same_weights(tiny_demo, workdir, monkeypatch):
    extra = ["epochs=3", "batch_size=4", "scheduler=cosine", "optimizer=adamw", "aug.rotate=0.3"]
    folds = resolve_folds(_cfg(tiny_demo, *extra))
    fit_fold(_cfg(tiny_demo, "runs_dir=a", *extra), 0, folds)

    import alldetect.engine.fit as fit

    SignalAt.n, SignalAt.at = 0, 9  # epoch 2 (6 batches an epoch), its third batch
    monkeypatch.setattr(fit.nn, "CrossEntropyLoss", SignalAt)
    with pytest.raises(StopRequested, match=r"stopped by SIGTERM in epoch 2 after batch 3.*resume=true"):
        fit_fold(_cfg(tiny_demo, "runs_dir=b", *extra), 0, folds)
    state = load_checkpoint(workdir / "b" / TINY / "fold0/last.pt")
    assert state.meta.progress.epoch == 0 and state.meta.partial.epoch == 1 and state.meta.partial.steps == 3
    monkeypatch.setattr(fit.nn, "CrossEntropyLoss", torch.nn.CrossEntropyLoss)
    fit_fold(_cfg(tiny_demo, "runs_dir=b", "resume=true", *extra), 0, folds)
    assert _same_weights(workdir / "a" / TINY / "fold0", workdir / "b" / TINY / "fold0")
    _same_history(workdir / "a" / TINY / "fold0", workdir / "b" / TINY / "fold0")


class Killed(BaseException):
    """What a SIGKILL leaves: nothing after the point where it lands runs."""


@pytest.mark.slow
def test_a_kill_between_last_pt_and_history_csv_loses_no_history_row(tiny_demo, workdir, monkeypatch):
    """last.pt is written before history.csv; a kill between the two left history.csv an epoch behind last.pt,
    and the resumed run's history went on without that epoch's row. last.pt now holds the history."""
    extra = ["epochs=3", "batch_size=4"]
    folds = resolve_folds(_cfg(tiny_demo, *extra))
    fit_fold(_cfg(tiny_demo, "runs_dir=a", *extra), 0, folds)

    import alldetect.engine.trainer as trainer

    writes = []

    def killed_at_second_history(path, table):
        writes.append(path)
        if len(writes) == 2:  # epoch 2's history.csv: its last.pt is on the disk already
            raise Killed
        write_csv(path, table)

    monkeypatch.setattr(trainer, "write_csv", killed_at_second_history)
    with pytest.raises(Killed):
        fit_fold(_cfg(tiny_demo, "runs_dir=b", *extra), 0, folds)
    run = workdir / "b" / TINY / "fold0"
    assert load_checkpoint(run / "last.pt").meta.progress.epoch == 1 and len(pd.read_csv(run / "history.csv")) == 1
    monkeypatch.setattr(trainer, "write_csv", write_csv)
    fit_fold(_cfg(tiny_demo, "runs_dir=b", "resume=true", *extra), 0, folds)
    _same_history(workdir / "a" / TINY / "fold0", run)
    assert _same_weights(workdir / "a" / TINY / "fold0", run)


def _train_cmd(root, runs, *extra):
    return [sys.executable, "-m", "alldetect", "train", TINY, "fold0", *FAST, f"data.root={root}",
            f"runs_dir={runs}", "epochs=12", "batch_size=4", "scheduler=cosine", *extra]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_reaches_the_same_result(tiny_demo, workdir):
    from alldetect.cli import main

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed processes train (OMP_NUM_THREADS=1): the same arithmetic, bit for bit
    try:  # the uninterrupted run, here: a process of its own would only add seconds of imports
        assert main(_train_cmd(tiny_demo, "ref")[3:]) == 0
    finally:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(7)
    kills = 0
    while True:
        proc = subprocess.Popen(_train_cmd(tiny_demo, "killed", "resume=true"), cwd=workdir, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if kills < 2:
            # After the first epoch this launch finishes, at a random point of what follows (an epoch of this
            # tiny run takes about 0.1 s: two launches use at most about 8 of the 12 epochs, so the run cannot
            # finish before its second kill). Each launch costs seconds of imports: two kills, not more.
            for line in proc.stdout:
                if f"{TINY} fold0 epoch" in line:
                    time.sleep(rng.uniform(0.0, 0.25))
                    break
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                kills += 1
                continue
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:]
        break
    assert kills == 2
    assert _same_weights(workdir / "ref" / TINY / "fold0", workdir / "killed" / TINY / "fold0")
    _same_history(workdir / "ref" / TINY / "fold0", workdir / "killed" / TINY / "fold0")
    assert not list((workdir / "killed" / TINY / "fold0").glob(".*.tmp"))  # no temporary file left behind


@pytest.mark.slow
def test_sigterm_to_a_real_process_with_loader_workers(tiny_demo, workdir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ["data.num_workers=2", "epochs=40"]
    run = workdir / "t" / TINY / "fold0"
    with open(workdir / "err.txt", "w") as err_file:
        proc = subprocess.Popen(_train_cmd(tiny_demo, "t", *extra), cwd=workdir, env=env,
                                stdout=subprocess.DEVNULL, stderr=err_file, text=True)
        deadline = time.monotonic() + 120
        while not (run / "history.csv").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the first epoch is on the disk: ask it to stop
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    err = (workdir / "err.txt").read_text()
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "resume=true" in err and "Traceback" not in err
    state, history = load_checkpoint(run / "last.pt"), pd.read_csv(run / "history.csv")
    done = history["epoch"].max()  # last.pt holds the last epoch history.csv lists, and the next one's half
    assert done < 39 and (state.meta.progress.epoch == done)
    inside = re.search(r"stopped by SIGTERM in epoch (\d+) after batch (\d+)", err)
    if inside:  # the half-done epoch is kept, to be finished on resume
        assert state.meta.partial is not None
        assert (state.meta.partial.epoch + 1, state.meta.partial.steps) == tuple(map(int, inside.groups()))
        assert state.meta.partial.epoch == done + 1
    else:
        assert re.search(rf"stopped by SIGTERM after epoch {done + 1}\b", err) and state.meta.partial is None


def _tiny_checkpoint(w: torch.Tensor) -> Checkpoint:
    return Checkpoint(RunMeta(config=load_config("proposed", [])), {"w": w})


def test_atomic_checkpoint_write_never_leaves_a_truncated_file(workdir, monkeypatch):
    save_checkpoint(workdir / "last.pt", _tiny_checkpoint(torch.ones(3)))

    def crash(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(UserError, match=r"could not write .*last.pt \(No space left on device\): the previous "
                                        r"last.pt is kept as it was"):
        save_checkpoint(workdir / "last.pt", _tiny_checkpoint(torch.zeros(3)))
    assert torch.equal(load_checkpoint(workdir / "last.pt").model["w"], torch.ones(3))
    assert sorted(p.name for p in workdir.iterdir()) == ["last.pt"]


def test_atomic_csv_write_keeps_the_old_file_on_failure(workdir):
    write_csv(workdir / "f.csv", pd.DataFrame({"a": [1, 2]}))

    class Broken(pd.DataFrame):
        def to_csv(self, path, **kw):
            open(path, "w").write("a\n1")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_csv(workdir / "f.csv", Broken({"a": [3]}))
    assert (workdir / "f.csv").read_text() == "a\n1\n2\n" and len(list(workdir.iterdir())) == 1


def test_atomic_write_reaches_the_disk_before_the_rename(workdir, monkeypatch):
    """Power loss after the rename must not leave an empty file: the data are synced first, the folder after."""
    import alldetect.atomic as atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    write_text(workdir / "f.txt", "new")
    assert events == ["fsync file", "rename", "fsync dir"] and (workdir / "f.txt").read_text() == "new"


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused_and_runs_nothing(workdir):
    marker = workdir / "pwned"
    torch.save({"model": {}, "config": {}, "payload": Exploit(marker)}, workdir / "evil.pt")
    with pytest.raises(UserError, match=r"refused to load .*evil.pt.*could run code"):
        load_checkpoint(workdir / "evil.pt")
    assert not marker.exists()


def test_damaged_checkpoint_is_a_clear_error(workdir):
    (workdir / "bad.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="damaged or not a checkpoint"):
        load_checkpoint(workdir / "bad.pt")


def test_yaml_with_python_objects_is_not_executed(workdir):
    marker = workdir / "pwned"
    evil = workdir / "evil.yaml"
    evil.write_text(f"lr: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        read_yaml(evil)
    assert not marker.exists()


def test_labels_file_cannot_point_outside_the_folder(tmp_path):
    from alldetect.data.layouts import build_manifest

    from conftest import write_image

    images = tmp_path / "test"
    write_image(images / "1.bmp")
    write_image(tmp_path / "secret.bmp")
    (images / "phase2.csv").write_text("Patient_ID,new_names,labels\nUID_1_1_1_all.bmp,../secret.bmp,1\n")
    with pytest.raises(UserError, match=r"not in .*\.\./secret\.bmp"):
        build_manifest(images)


def test_out_of_memory_names_a_batch_size_to_try(tiny_demo, workdir, monkeypatch):
    import alldetect.engine.trainer as trainer

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "train_one_epoch", oom)
    with pytest.raises(UserError, match=r"ran out of memory .* batch_size=8.*Try batch_size=4"):
        fit_fold(_cfg(tiny_demo), 0, resolve_folds(_cfg(tiny_demo)))


def test_full_disk_fails_before_training(tiny_demo, workdir, monkeypatch):
    import alldetect.engine.rundir.prepare as rundir
    import alldetect.engine.trainer as trainer

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    called = []
    monkeypatch.setattr(trainer, "train_one_epoch", lambda *a, **k: called.append(1))
    with pytest.raises(UserError, match=r"only 1 MiB free .* checkpoints need about \d+ MiB"):
        fit_fold(_cfg(tiny_demo), 0, resolve_folds(_cfg(tiny_demo)))
    assert not called


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_get_the_users_umask_not_the_temporary_files_0600(workdir, umask, mode):
    """Teammates on a shared machine read each other's runs and fold files as their umask allows."""
    old = os.umask(umask)
    try:
        write_text(workdir / "a.txt", "x")
        save_checkpoint(workdir / "b.pt", _tiny_checkpoint(torch.zeros(1)))
    finally:
        os.umask(old)
    assert (workdir / "a.txt").stat().st_mode & 0o777 == mode
    assert (workdir / "b.pt").stat().st_mode & 0o777 == mode


@pytest.mark.slow
def test_an_image_that_goes_bad_after_the_split_is_a_clean_error_with_loader_workers(tiny_demo, workdir, capsys):
    """Same size, garbage bytes (so the fold file's check passes): the worker's error arrives as its message."""
    import shutil

    from alldetect.cli import main

    data = workdir / "data"
    shutil.copytree(tiny_demo, data)
    assert main(["train", "proposed", "fold0", *FAST, f"data.root={data}", "epochs=1"]) == 0
    victim = sorted(data.rglob("*.bmp"))[0]
    victim.write_bytes(b"\0" * victim.stat().st_size)
    capsys.readouterr()
    code = main(["train", "proposed", "fold0", *FAST, f"data.root={data}", "epochs=1", "overwrite=true",
                 "data.num_workers=2"])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot read image {victim}" in err
    assert "Traceback" not in err and "DataLoader worker" not in err


@pytest.mark.slow
def test_a_checkpoint_write_that_fails_mid_run_stops_with_a_message_and_resumes(tiny_demo, workdir, monkeypatch):
    """A full disk or a file-size limit (ulimit -f) at epoch 2: a clear error, last.pt and history.csv of epoch 1,
    and resume=true finishes the run."""
    import alldetect.engine.rundir.files as checkpoint

    real_save, calls = torch.save, {"n": 0}

    def limited(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 1 writes best.pt and last.pt; epoch 2's first write fails
            with open(f, "wb") as fh:
                fh.write(b"part")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", limited)
    with pytest.raises(UserError, match=r"training stopped in epoch 2: could not write .*(best|last).pt "
                                        r"\(.*failed writing file\).*resume=true"):
        fit_fold(_cfg(tiny_demo, "epochs=3", "select=outer"), 0, resolve_folds(_cfg(tiny_demo)))
    run = workdir / "runs" / TINY / "fold0"
    assert load_checkpoint(run / "last.pt").meta.progress.epoch == 0
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [0]
    assert not list(run.glob(".*.tmp"))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    fit_fold(_cfg(tiny_demo, "epochs=3", "select=outer", "resume=true"), 0, resolve_folds(_cfg(tiny_demo)))
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [0, 1, 2]


def test_impossible_output_places_are_clear_errors_before_any_work(tiny_demo, workdir, capsys):
    """Each output folder lies under a file (impossible even for root): a message naming it, exit 2, no traceback."""
    from alldetect.cli import main

    from fake_runs import make_run, oof_frame

    (workdir / "afile").write_text("")
    bad = str(workdir / "afile" / "sub")
    make_run(workdir / "runs/proposed/fold0", weights=True, input_size=32,
             oof=oof_frame(["x/UID_1_1_1_all.bmp", "x/UID_H1_1_1_hem.bmp"], [1, 0], [0.7, 0.2], 0))
    image = str(next(tiny_demo.rglob("*.bmp")))
    cases = [
        (["split", str(tiny_demo), "--k", "3", "--out", f"{bad}/f.csv"], "the fold file's folder"),
        (["train", "proposed", "fold0", *FAST, f"data.root={tiny_demo}", f"folds_dir={bad}"], "the fold file's folder"),
        (["train", "proposed", "fold0", *FAST, f"data.root={tiny_demo}", "data.cache=true",
          f"data.cache_dir={bad}", "runs_dir=elsewhere"], "the image cache folder"),
        (["train", "proposed", "fold0", *FAST, f"data.root={tiny_demo}", f"runs_dir={bad}"], "the run folder"),
        (["ensemble", "runs/proposed", "--oof", "--out", bad], "the output folder (--out)"),
        (["visualize", "runs/proposed/fold0", image, "--out", bad], "the output folder (--out)"),
        (["demo-data", bad], "the demo data folder"),
        (["report", "--out", bad, "--no-speed"], "the reports folder"),
        (["export", "runs/proposed", "--out", bad], "the export folder (--out)"),
        (["tune", "proposed", "--trials", "0", "--out", f"{bad}/t.yaml", f"data.root={tiny_demo}"], "the folder of --out"),
    ]
    for argv, what in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"cannot write to {what}" in err and "afile" in err and "Traceback" not in err, (argv, err)


@pytest.mark.slow
def test_one_image_a_batch_on_a_1x1_feature_map_says_what_to_change(tiny_demo, workdir):
    """BatchNorm in training on a 1 x 1 map of one image was a raw ValueError traceback."""
    cfg = _cfg(tiny_demo, "batch_size=1", "epochs=1", "max_batches=1")
    with pytest.raises(UserError, match=rf"{TINY} at input_size=32 .*1 x 1 feature map.*batch_size=2 or more.*"
                                        r"input_size=64"):
        fit_fold(cfg, 0, resolve_folds(cfg))
