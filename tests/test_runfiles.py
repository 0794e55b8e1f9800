"""Run files: the checkpoint's versioned metadata and the run folder's readers."""

import math

import pandas as pd
import pytest
import torch

from alldetect.config import load_config
from alldetect.engine.rundir.files import SCHEMA_VERSION, Checkpoint, Progress, RunDir, RunMeta, load_checkpoint, save_checkpoint
from alldetect.engine.rundir.prepare import check_resume
from alldetect.errors import UserError

WEIGHTS = {"w": torch.arange(3.0)}


def _flat_v1(**config) -> dict:
    """A checkpoint as alldetect wrote it before the metadata had a schema: one flat dict."""
    cfg = {**load_config("proposed", ["input_size=32"]).to_dict(), **config}
    return {"model": WEIGHTS, "optimizer": None, "ema": None, "scaler": None, "epoch": 4, "best": 0.8,
            "best_epoch": 3, "stale": 1, "wandb_id": "abc", "metrics": {"f1": 0.8}, "config": cfg,
            "select": cfg.get("select"), "fold_file": "folds/x.csv", "fold_fingerprint": "f00d", "fold_k": 3,
            "fold_assignment": "d1", "leaky_split": False, "saved_at": 12.5, "world": 1, "updates_per_epoch": 7}


def test_a_checkpoint_round_trips_its_typed_metadata(tmp_path):
    meta = RunMeta(config=load_config("resnet18", ["input_size=64", "data.crop=300"]), run="fold2",
                   progress=Progress(epoch=5, best=0.91, best_epoch=4, stale=1, wandb_id="w1"),
                   metrics={"f1": 0.9, "roc_auc": float("nan"), "loss": float("inf"), "confusion": [[1, 2], [3, 4]]},
                   fold_file="folds/a.csv", fold_k=5)
    save_checkpoint(tmp_path / "best.pt", Checkpoint(meta, WEIGHTS))
    got = load_checkpoint(tmp_path / "best.pt")
    assert got.meta.model_dump(exclude={"metrics"}) == meta.model_dump(exclude={"metrics"})
    assert got.meta.version == SCHEMA_VERSION and got.meta.metrics["f1"] == 0.9 and got.meta.metrics["loss"] == float("inf")
    assert math.isnan(got.meta.metrics["roc_auc"])  # a one-class fold's ROC-AUC stays a number, not None
    assert (got.meta.input_size, got.meta.crop, got.meta.k) == (64, 300, 5)
    assert torch.equal(got.model["w"], WEIGHTS["w"]) and got.optimizer is None
    # what is on the disk: plain values under "meta", nothing a reader must re-derive
    raw = torch.load(tmp_path / "best.pt", weights_only=True)
    assert raw["meta"]["version"] == SCHEMA_VERSION and raw["meta"]["config"]["input_size"] == 64


def test_a_version_1_checkpoint_is_read_as_the_current_schema(tmp_path):
    torch.save(_flat_v1(), tmp_path / "best.pt")
    meta = load_checkpoint(tmp_path / "best.pt").meta
    assert meta.version == 1 and meta.progress == Progress(epoch=4, best=0.8, best_epoch=3, stale=1, wandb_id="abc")
    assert (meta.fold_file, meta.fold_k, meta.updates_per_epoch, meta.saved_at) == ("folds/x.csv", 3, 7, 12.5)
    assert meta.config.arch == "proposed" and meta.input_size == 32
    old = _flat_v1()
    del old["saved_at"]
    torch.save(old, tmp_path / "undated.pt")  # the same value at every reading: predictions are checked by it
    assert load_checkpoint(tmp_path / "undated.pt").meta.saved_at == load_checkpoint(tmp_path / "undated.pt").meta.saved_at


def test_a_version_0_checkpoint_counts_as_choosing_on_its_fold_and_cannot_be_resumed(tmp_path):
    old = _flat_v1()
    del old["config"]["select"]  # before select=, every run kept the epoch that scored best on its fold
    torch.save(old, tmp_path / "last.pt")
    state = load_checkpoint(tmp_path / "last.pt")
    assert state.meta.version == 0 and state.meta.config.select == "outer"
    with pytest.raises(UserError, match="made by an older alldetect .* Start over with overwrite=true"):
        check_resume(load_config("proposed", ["input_size=32"]), state, None, RunDir(tmp_path))


def test_a_checkpoint_of_a_newer_schema_or_with_bad_metadata_is_a_clear_error(tmp_path):
    torch.save({"meta": {"version": SCHEMA_VERSION + 1, "config": {}}, "model": WEIGHTS}, tmp_path / "new.pt")
    with pytest.raises(UserError, match=rf"new.pt was written by a newer alldetect \(checkpoint schema "
                                        rf"{SCHEMA_VERSION + 1}; this version reads up to {SCHEMA_VERSION}\)"):
        load_checkpoint(tmp_path / "new.pt")
    torch.save(_flat_v1(lr=-1), tmp_path / "odd.pt")
    with pytest.raises(UserError, match=r"invalid settings in the config saved in .*odd.pt:\n  lr=-1"):
        load_checkpoint(tmp_path / "odd.pt")


def test_a_run_folder_names_its_files_and_reads_them_checked(tmp_path):
    run = RunDir(tmp_path / "fold0")
    assert (run.best.name, run.last.name, run.oof.name, run.pred("prelim").name, run.feat("prelim").name) == (
        "best.pt", "last.pt", "oof.csv", "pred_prelim.csv", "feat_prelim.npz")
    with pytest.raises(UserError, match="fold0 has no oof.csv.*retrain it"):
        run.read_oof()
    run.path.mkdir()
    pd.DataFrame({"path": ["a.bmp"], "label": [1], "prob_all": [1.5], "fold": [0]}).to_csv(run.oof, index=False)
    with pytest.raises(UserError, match=r"oof.csv: prob_all must be a probability in \[0, 1\]; rows a.bmp"):
        run.read_oof()
    assert run.results() == ["oof.csv"] and not run.trained


def _zero_a_block_of_weights(path, size=4096):
    """A 4 KiB hole of zeros in the middle of the largest weight record (a bad block, a partly overwritten file)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "rb") as f:  # the record's data start after its local header (30 bytes, name, extra field)
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(size))
    return info.filename


@pytest.mark.parametrize("mmap", [False, True])
def test_a_checkpoint_with_a_zeroed_block_is_refused(tmp_path, mmap):
    weights = {"w": torch.randn(64, 1024), "b": torch.randn(8)}
    meta = RunMeta(config=load_config("proposed", ["input_size=32"]))
    save_checkpoint(tmp_path / "best.pt", Checkpoint(meta, weights))
    record = _zero_a_block_of_weights(tmp_path / "best.pt")
    raw = torch.load(tmp_path / "best.pt", weights_only=True)  # torch itself reads it without a word
    assert not torch.equal(raw["model"]["w"], weights["w"])
    with pytest.raises(UserError, match=rf"best.pt is damaged: the checksum of its record {record} does not match"):
        load_checkpoint(tmp_path / "best.pt", mmap=mmap)
    with pytest.raises(UserError, match="is damaged"):
        RunDir(tmp_path).meta()


def test_non_finite_weights_or_metadata_that_are_no_dictionary_are_refused(tmp_path):
    meta = RunMeta(config=load_config("proposed", ["input_size=32"]))
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.randn(100)
        w[17] = bad
        save_checkpoint(tmp_path / "best.pt", Checkpoint(meta, {"layer.weight": w, "n": torch.tensor(3)}))
        with pytest.raises(UserError, match=r"best.pt holds non-finite weights: 1 of the 100 values of layer.weight "
                                            r"are NaN or infinite"):
            load_checkpoint(tmp_path / "best.pt", mmap=True)
    large = torch.full((4,), 3e38)  # finite, though their sum is not
    half = torch.full((100_000,), 60_000.0, dtype=torch.float16)  # finite, though their float16 sum is not
    save_checkpoint(tmp_path / "best.pt", Checkpoint(meta, {"w": large, "h": half}, ema={"w": large}))
    assert torch.equal(load_checkpoint(tmp_path / "best.pt").model["w"], large)
    ema = torch.zeros(3)
    ema[0] = float("nan")
    save_checkpoint(tmp_path / "last.pt", Checkpoint(meta, {"w": torch.zeros(3)}, ema={"w": ema}))
    with pytest.raises(UserError, match="1 of the 3 values of w of the moving average are NaN"):
        load_checkpoint(tmp_path / "last.pt")
    for odd in ("a string", ["a", "list"], 3):
        torch.save({"meta": odd, "model": WEIGHTS}, tmp_path / "odd.pt")
        with pytest.raises(UserError, match=rf"odd.pt is not an alldetect checkpoint \(its metadata are a "
                                            rf"{type(odd).__name__}"):
            load_checkpoint(tmp_path / "odd.pt")


def test_overwrite_and_resume_remove_only_the_runs_own_files(tmp_path):
    run = RunDir(tmp_path / "fold0")
    run.path.mkdir()
    own = ["best.pt", "last.pt", "history.csv", "oof.csv", "config.yaml", "pred_a.csv", "pred_a.json",
           "feat_a.npz", ".best.pt.k2x_9q0z.tmp", ".pred_a.csv.abcdefgh.tmp"]
    users = ["notes.txt", "pred_notes.txt", ".mine.tmp", ".backup.of.best.pt.tmp", "features.npz"]
    for name in own + users:
        (run.path / name).write_text("x")
    assert sorted(p.name for p in run.stale_temporary_files()) == [".best.pt.k2x_9q0z.tmp", ".pred_a.csv.abcdefgh.tmp"]
    run.remove_results()
    left = sorted(p.name for p in run.path.iterdir())
    assert left == sorted(users + [".best.pt.k2x_9q0z.tmp", ".pred_a.csv.abcdefgh.tmp"])


@pytest.mark.parametrize("history", ["epoch,train_loss", [1, 2], [{"epoch": 0}, "a row"]])
def test_a_history_of_the_wrong_shape_in_last_pt_is_damaged_metadata(tmp_path, history):
    meta = RunMeta(config=load_config("proposed", ["input_size=32"]), history=[{"epoch": 0, "train_loss": 0.5}])
    save_checkpoint(tmp_path / "last.pt", Checkpoint(meta, WEIGHTS))
    assert load_checkpoint(tmp_path / "last.pt").meta.history == [{"epoch": 0, "train_loss": 0.5}]
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    state["meta"]["history"] = history
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(UserError, match=r"last.pt: damaged checkpoint metadata \(\d+ validation errors? for RunMeta"):
        load_checkpoint(tmp_path / "last.pt")
