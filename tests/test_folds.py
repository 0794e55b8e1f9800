import json
import logging

import pandas as pd
import pytest

from alldetect.cli import main
from alldetect.data.folds import load_fold_file, make_fold_file
from alldetect.data.layouts import build_manifest
from alldetect.errors import UserError

from conftest import lock_held_elsewhere, write_image


def test_split_real_sample_no_subject_in_two_folds(sample_root, tmp_path):
    ff = make_fold_file(sample_root, tmp_path / "f.csv", k=3, seed=42)
    t = pd.read_csv(tmp_path / "f.csv", dtype={"subject": str})
    assert list(t.columns) == ["path", "label", "subject", "fold", "bytes"]
    assert len(t) == 60 and sorted(t["fold"].unique()) == [0, 1, 2]
    assert (t.groupby("subject")["fold"].nunique() == 1).all()
    for _, g in t.groupby("fold"):  # stratified: every fold holds both classes
        assert set(g["label"]) == {0, 1}
    meta = json.loads((tmp_path / "f.json").read_text())
    assert meta["data_root"] == str(sample_root.resolve()) and meta["k"] == 3 and meta["seed"] == 42
    assert meta["by"] == "subject" and len(meta["fingerprint"]) == 16 and ff.meta.model_dump() == meta


def test_split_is_byte_identical_for_same_seed(sample_root, tmp_path):
    make_fold_file(sample_root, tmp_path / "a.csv", k=3, seed=7)
    make_fold_file(sample_root, tmp_path / "b.csv", k=3, seed=7)
    make_fold_file(sample_root, tmp_path / "c.csv", k=3, seed=8)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()


def test_by_official_reproduces_cnmc_folds(sample_root, tmp_path):
    ff = make_fold_file(sample_root, tmp_path / "o.csv", k=5, seed=0, by="official")
    assert (ff.table["fold"] == ff.table["path"].str.extract(r"fold_(\d)")[0].astype(int)).all()


def test_by_image_is_leaky_and_says_so(tiny_demo, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="alldetect"):
        ff = make_fold_file(tiny_demo, tmp_path / "i.csv", k=3, seed=0, by="image")
    assert (ff.table.groupby("subject")["fold"].nunique() > 1).any()
    assert "leaky" in caplog.text
    assert load_fold_file(tmp_path / "i.csv").leaky
    with pytest.raises(UserError, match="leaky"):
        load_fold_file(tmp_path / "i.csv", allow_leaky=False)


def test_k_larger_than_subjects_in_a_class(tiny_demo, tmp_path):
    with pytest.raises(UserError, match=r"--k 5 is larger than the number of subjects in a class \(hem: 4\)"):
        make_fold_file(tiny_demo, tmp_path / "x.csv", k=5, seed=0)


def test_cli_split_prints_table_and_exit_codes(sample_root, tmp_path, capsys):
    assert main(["split", str(sample_root), "--k", "3", "--folds-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cnmc-sample_k3_s42.csv" in out and "share_all" in out and "no subject appears in more than one" in out
    assert (tmp_path / "cnmc-sample_k3_s42.csv").is_file()
    assert main(["split", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_loading_checks_files_on_disk(tiny_demo, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_demo, data)
    make_fold_file(data, tmp_path / "f.csv", k=3, seed=0)
    assert load_fold_file(tmp_path / "f.csv").k == 3
    victim = next((data / "C-NMC_training_data/fold_0/all").iterdir())
    victim.unlink()
    write_image(data / "C-NMC_training_data/fold_1/hem/UID_H99_1_1_hem.bmp")
    other = next((data / "C-NMC_training_data/fold_2/all").iterdir())
    other.write_bytes(other.read_bytes() + b"\0")
    with pytest.raises(UserError) as err:
        load_fold_file(tmp_path / "f.csv")
    msg = str(err.value)
    assert f"missing: C-NMC_training_data/fold_0/all/{victim.name}" in msg
    assert "not in it: C-NMC_training_data/fold_1/hem/UID_H99_1_1_hem.bmp" in msg
    assert f"changed on disk since the split: C-NMC_training_data/fold_2/all/{other.name}" in msg


def test_fold_file_paths_cannot_escape_data_root(tiny_demo, tmp_path):
    make_fold_file(tiny_demo, tmp_path / "f.csv", k=3, seed=0)
    t = pd.read_csv(tmp_path / "f.csv")
    t.loc[0, "path"] = "../../etc/passwd"
    t.to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(UserError, match="leave the data folder"):
        load_fold_file(tmp_path / "f.csv")


def test_fold_file_with_subject_in_two_folds_is_refused(tiny_demo, tmp_path):
    make_fold_file(tiny_demo, tmp_path / "f.csv", k=3, seed=0)
    t = pd.read_csv(tmp_path / "f.csv")
    t.loc[0, "fold"] = (t.loc[0, "fold"] + 1) % 3
    t.to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(UserError, match="appear in more than one fold"):
        load_fold_file(tmp_path / "f.csv")


def test_skip_bad_lists_skipped_images_in_sidecar(tiny_demo, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_demo, data)
    (data / "C-NMC_training_data/fold_0/all/UID_1_9_9_all.bmp").write_text("junk")
    with pytest.raises(UserError, match="UID_1_9_9_all.bmp: not a readable image"):
        make_fold_file(data, tmp_path / "f.csv", k=3, seed=0)
    ff = make_fold_file(data, tmp_path / "f.csv", k=3, seed=0, skip_bad=True)
    assert "UID_1_9_9_all.bmp" not in " ".join(ff.table["path"])
    assert ff.meta.skipped[0].startswith("C-NMC_training_data/fold_0/all/UID_1_9_9_all.bmp")
    assert load_fold_file(tmp_path / "f.csv").k == 3  # the skipped file is not an "extra" image


def test_cli_index(sample_root, capsys):
    assert main(["index", str(sample_root)]) == 0
    out = capsys.readouterr().out
    assert "layout:      cnmc_train" in out and "450x450" in out and "every image is readable" in out


def test_skip_bad_with_no_usable_image_is_a_clear_error(tmp_path):
    """Found by the messy-data property test (1,500 examples): every image unreadable used to crash in pandas."""
    for cls, subject in [("all", "1"), ("hem", "H2")]:
        folder = tmp_path / "data/fold_0" / cls
        folder.mkdir(parents=True)
        (folder / f"UID_{subject}_1_1_{cls}.bmp").write_bytes(b"")
    with pytest.raises(UserError, match="none of the 2 image"):
        make_fold_file(tmp_path / "data", tmp_path / "f.csv", k=2, seed=0, skip_bad=True)
    assert not (tmp_path / "f.csv").exists()


def test_damaged_sidecar_and_repeated_paths_are_clear_errors(tiny_demo, tmp_path):
    ff = make_fold_file(tiny_demo, tmp_path / "f.csv", k=3, seed=0)
    sidecar = tmp_path / "f.json"
    good = sidecar.read_text()
    sidecar.write_text(good[: len(good) // 2])
    with pytest.raises(UserError, match=r"f.json is not valid JSON.*alldetect split"):
        load_fold_file(tmp_path / "f.csv")
    sidecar.write_text(good)
    table = pd.concat([ff.table, ff.table.iloc[:1]])
    table.to_csv(tmp_path / "f.csv", index=False)
    with pytest.raises(UserError, match=r"lists 1 image\(s\) more than once"):
        load_fold_file(tmp_path / "f.csv")


def test_the_sidecar_is_typed_and_versioned(tiny_demo, tmp_path):
    """The sidecar round-trips through its model; one from before versions reads as version 1; a newer version, a
    key it does not know and a value of the wrong type are refused, naming the file and what to do."""
    from alldetect.data.folds import SIDECAR_VERSION, FoldSidecar

    ff = make_fold_file(tiny_demo, tmp_path / "f.csv", k=3, seed=0)
    sidecar = tmp_path / "f.json"
    written = json.loads(sidecar.read_text())
    assert written["version"] == SIDECAR_VERSION and FoldSidecar.model_validate(written) == ff.meta
    assert load_fold_file(tmp_path / "f.csv").meta == ff.meta and ff.meta.k == 3 and ff.meta.by == "subject"
    del written["version"]  # as alldetect wrote it before versions
    sidecar.write_text(json.dumps(written))
    assert load_fold_file(tmp_path / "f.csv").meta == ff.meta
    for change, refusal in (({"version": SIDECAR_VERSION + 1}, r"is a version 2 record, written by a newer"),
                            ({"k": "three"}, r"is not a fold file's sidecar `alldetect split` writes: k: Input should"),
                            ({"colour": "red"}, r"is not a fold file's sidecar .*: colour: Extra inputs")):
        sidecar.write_text(json.dumps({**written, **change}))
        with pytest.raises(UserError, match=rf"f.json {refusal}.*alldetect split DATA_ROOT"):
            load_fold_file(tmp_path / "f.csv")


def test_fold_folders_behind_symbolic_links_are_read(tiny_demo, tmp_path):
    """A common way to assemble C-NMC from several disks; os.walk skips linked folders unless told."""
    import shutil

    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    shutil.copytree(tiny_demo, data)
    train = data / "C-NMC_training_data"
    shutil.move(train / "fold_1", elsewhere)
    (train / "fold_1").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(train, target_is_directory=True)  # a link back up: no endless walk
    assert sorted(build_manifest(data)["path"]) == sorted(build_manifest(tiny_demo)["path"])


def test_split_says_when_a_fold_holds_a_single_person_of_a_class():
    from alldetect.data.folds import few_subjects_note

    table = pd.DataFrame({"subject": ["1", "2", "3", "4", "H1", "H2", "H3"], "label": [1, 1, 1, 1, 0, 0, 0],
                          "fold": [0, 1, 2, 2, 0, 1, 2], "path": list("abcdefg")})
    assert few_subjects_note(table) == (
        "note: 3 'hem' subjects in all, so fold0, fold1, fold2 hold(s) one 'hem' person: that fold's 'hem' scores "
        "are one person's, and its model trains on 2 'hem' people. Compare models on the mean over folds, and "
        "weigh the spread")
    table["fold"] = [0, 1, 0, 1, 0, 1, 0]
    table.loc[table["subject"] == "H3", "fold"] = 1
    table = pd.concat([table, table.assign(subject=table["subject"] + "b", path=table["path"] + "b")])
    assert few_subjects_note(table) is None


def test_a_fold_file_of_other_images_is_never_replaced(tiny_demo, tmp_path):
    """Two data sets of one folder name: splitting the second must not replace the first's fold file."""
    import shutil

    other = tmp_path / "elsewhere" / tiny_demo.name
    shutil.copytree(tiny_demo, other)
    out = tmp_path / "folds/demo_k3_s42.csv"
    make_fold_file(tiny_demo, out, k=3, seed=42)
    before = out.read_text()
    make_fold_file(other, out, k=3, seed=42)  # the same images, moved: may replace it (same content)
    assert out.read_text() == before
    next(other.rglob("*.bmp")).unlink()
    with pytest.raises(UserError, match=r"holds a split of other images .*runs trained on it need it as it is"):
        make_fold_file(other, out, k=3, seed=42)
    assert out.read_text() == before


def test_two_processes_never_make_one_fold_file_at_once(tiny_demo, tmp_path):
    out = tmp_path / "folds/demo_k3_s42.csv"
    with lock_held_elsewhere(out.with_name(f".{out.name}.lock")) as pid:
        with pytest.raises(UserError, match=rf"the fold file {out} is in use by another process \(pid {pid}\)"):
            make_fold_file(tiny_demo, out, k=3, seed=42)
    make_fold_file(tiny_demo, out, k=3, seed=42)  # a killed holder's lock is no obstacle
    assert out.is_file()


def test_a_hand_edited_fold_number_is_refused(tiny_demo, tmp_path):
    out = tmp_path / "f.csv"
    make_fold_file(tiny_demo, out, k=3, seed=42)
    table = pd.read_csv(out)
    table.loc[0, "fold"] = 7
    table.to_csv(out, index=False)
    with pytest.raises(UserError, match=r"should hold folds 0..2 \(k=3 in its sidecar\), each with images, but "
                                        r"holds .*fold7: 1 image\(s\).*edited by hand"):
        load_fold_file(out)
    table["fold"] = table["fold"].astype(object)
    table.loc[0, "fold"] = "x"
    table.to_csv(out, index=False)
    with pytest.raises(UserError, match=r"is not a whole number"):
        load_fold_file(out)


def test_a_hand_edited_subject_is_checked_against_the_names(tiny_demo, tmp_path):
    """Moving one image of a person to another fold and renaming its subject hid the person in two folds."""
    out = tmp_path / "f.csv"
    make_fold_file(tiny_demo, out, k=3, seed=42)
    table = pd.read_csv(out, dtype={"subject": str})
    moved = table.index[table["subject"] == table.loc[0, "subject"]][-1]
    person = table.loc[moved, "subject"]
    table.loc[moved, "fold"] = (table.loc[moved, "fold"] + 1) % 3
    table.loc[moved, "subject"] = f"{person}x"
    table.to_csv(out, index=False)
    with pytest.raises(UserError, match=rf"1 image\(s\) have another subject than the data say: "
                                        rf"{table.loc[moved, 'path']} \(subject {person}x in the fold file, "
                                        rf"{person} in the data\)"):
        load_fold_file(out)


def test_a_hand_edited_size_or_fingerprint_is_a_clear_error(tiny_demo, tmp_path):
    out = tmp_path / "f.csv"
    make_fold_file(tiny_demo, out, k=3, seed=42)
    good = out.read_text()
    table = pd.read_csv(out)
    table["bytes"] = table["bytes"].astype(object)
    table.loc[2, "bytes"] = "abc"
    table.to_csv(out, index=False)
    with pytest.raises(UserError, match=rf"fold file {out}: the bytes of {table.loc[2, 'path']} .*not a whole number"):
        load_fold_file(out)
    out.write_text(good)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    right, sidecar["fingerprint"] = sidecar["fingerprint"], "0123456789abcdef"
    out.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(UserError, match=rf"f.json records data fingerprint 0123456789abcdef, but the images .* "
                                        rf"have {right}.*alldetect split"):
        load_fold_file(out)


def test_index_lists_dangling_and_looping_links_as_unusable(tiny_demo, tmp_path, capsys):
    """index stopped on them with a bare OS error, where split lists them as unusable."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_demo, data)
    folder = data / "C-NMC_training_data/fold_0/all"
    (folder / "UID_9_9_9_all.bmp").symlink_to(folder / "nowhere.bmp")
    (folder / "UID_8_8_8_all.bmp").symlink_to(folder / "UID_8_8_8_all.bmp")
    assert main(["index", str(data)]) == 0
    out = capsys.readouterr().out
    assert "2 unusable image(s) (leave them out with --skip-bad):" in out
    assert "UID_9_9_9_all.bmp: not a readable image" in out and "UID_8_8_8_all.bmp: not a readable image" in out
