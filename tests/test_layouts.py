import logging

import numpy as np
import pytest
from PIL import Image

from alldetect.data.images import drop_bad_images, preprocess
from alldetect.data.layouts import build_manifest, subject_of
from alldetect.errors import UserError

from conftest import write_image


def test_subject_from_cnmc_names():
    assert subject_of("UID_11_10_1_all.bmp") == "11"
    assert subject_of("UID_H10_43_1_hem.bmp") == "H10"
    assert subject_of("cell_001.png") is None


def test_real_sample_is_cnmc_training(sample_root):
    m = build_manifest(sample_root)
    assert len(m) == 60 and set(m["source_layout"]) == {"cnmc_train"}
    assert m.groupby("label_name").size().to_dict() == {"all": 30, "hem": 30}
    # (the sample's NOTICE says 26 and 16; its file names hold 23 ALL and 14 healthy subjects)
    assert m.groupby("label_name")["subject"].nunique().to_dict() == {"all": 23, "hem": 14}
    row = m[m["path"].str.endswith("UID_H10_100_1_hem.bmp")].iloc[0]
    assert (row.subject, row.label, row.official_fold) == ("H10", 0, 1)
    assert (m[m["label_name"] == "all"]["label"] == 1).all()
    # the official folds are subject-disjoint
    assert (m.groupby("subject")["official_fold"].nunique() == 1).all()


def test_real_sample_images_pass_checks_and_crop(sample_root):
    m = build_manifest(sample_root)
    kept, bad = drop_bad_images(m, sample_root, skip_bad=False)
    assert bad.empty and (kept["width"] == 450).all() and (kept["height"] == 450).all()
    img = np.asarray(Image.open(sample_root / kept["path"].iloc[0]))
    assert preprocess(img, 400, 300).shape == (300, 300, 3)


def test_kaggle_copy_under_training_data(tmp_path):
    root = tmp_path / "C-NMC_Leukemia"
    write_image(root / "training_data/fold_0/all/UID_3_1_1_all.bmp")
    write_image(root / "training_data/fold_1/hem/UID_H2_1_1_hem.bmp")
    write_image(root / "validation_data/C-NMC_test_prelim_phase_data/1.bmp")  # not part of training
    m = build_manifest(root)
    assert list(m["subject"]) == ["3", "H2"] and list(m["official_fold"]) == [0, 1]


def _prelim(tmp_path, labels_name="C-NMC_test_prelim_phase_data_labels.csv", beside=True):
    root = tmp_path / "validation_data"
    images = root / "C-NMC_test_prelim_phase_data"
    for i in range(1, 12):
        write_image(images / f"{i}.bmp")
    rows = [f"UID_{50 + i % 3}_2_{i}_all.bmp,{i}.bmp,1" if i % 2 else f"UID_H{i % 4}_1_{i}_hem.bmp,{i}.bmp,0"
            for i in range(1, 12)]
    (root if beside else images).joinpath(labels_name).write_text("Patient_ID,new_names,labels\n" + "\n".join(rows))
    return root, images


@pytest.mark.parametrize("labels_name", ["C-NMC_test_prelim_phase_data_labels.csv", "phase2.csv"])
@pytest.mark.parametrize("beside", [True, False])
def test_prelim_test_with_labels(tmp_path, labels_name, beside):
    root, images = _prelim(tmp_path, labels_name, beside)
    m = build_manifest(images)
    assert set(m["source_layout"]) == {"cnmc_prelim"}
    assert list(m["path"])[:3] == ["1.bmp", "2.bmp", "3.bmp"] and list(m["path"])[-1] == "11.bmp"  # numeric order
    assert m.set_index("path").loc["1.bmp", "label"] == 1 and m.set_index("path").loc["2.bmp", "label"] == 0
    assert m.set_index("path").loc["1.bmp", "subject"] == "51"
    assert build_manifest(root)["source_layout"].iloc[0] == "cnmc_prelim"  # the parent folder works too


def test_prelim_labels_missing_columns(tmp_path):
    root, images = _prelim(tmp_path)
    (root / "C-NMC_test_prelim_phase_data_labels.csv").write_text("id,label\n1.bmp,1\n")
    with pytest.raises(UserError, match=r"lacks column\(s\) Patient_ID, labels, new_names"):
        build_manifest(images)


def test_prelim_labels_name_missing_images(tmp_path):
    root, images = _prelim(tmp_path)
    (images / "11.bmp").unlink()
    with pytest.raises(UserError, match=r"names 1 image\(s\) that are not in .*11\.bmp"):
        build_manifest(images)


def test_a_stray_image_beside_a_labels_file_says_the_labels_are_not_used(tmp_path, caplog):
    root, images = _prelim(tmp_path)
    write_image(images / "copy of 3.bmp")
    with caplog.at_level(logging.WARNING, logger="alldetect"):
        m = build_manifest(images)
    assert set(m["source_layout"]) == {"unlabelled"}
    assert "C-NMC_test_prelim_phase_data_labels.csv is not used: 1 image(s)" in caplog.text
    assert "copy of 3.bmp" in caplog.text


def test_final_test_is_unlabelled(tmp_path):
    for i in range(1, 6):
        write_image(tmp_path / "C-NMC_test_final_phase_data" / f"{i}.bmp")
    m = build_manifest(tmp_path / "C-NMC_test_final_phase_data")
    assert set(m["source_layout"]) == {"unlabelled"} and (m["label"] == -1).all()


def test_class_folders_without_subjects_warn(tmp_path, caplog):
    for cls in ("normal", "leukemia"):
        for i in range(3):
            write_image(tmp_path / cls / f"cell {i}é.png")
    with caplog.at_level(logging.WARNING, logger="alldetect"):
        m = build_manifest(tmp_path)
    assert set(m["source_layout"]) == {"class_folders"}
    assert m.groupby("label_name")["label"].first().to_dict() == {"leukemia": 1, "normal": 0}
    assert m["subject"].nunique() == 6 and "every image is its own group" in caplog.text


@pytest.mark.parametrize("names, blast", [(("ALL", "Normal"), "ALL"), (("Healthy", "zz_cells"), "zz_cells"),
                                          (("aa", "Blasts"), "Blasts"), (("all", "hem"), "all")])
def test_class_folders_name_the_blast_class_whatever_their_sorted_order(tmp_path, caplog, names, blast):
    """Label 1 is the blast (all) class: sorted order would make ALL/ 0 and Normal/ 1, silently reversing every
    precision, recall, prob_all and isbi_valid.predict line."""
    for cls in names:
        write_image(tmp_path / cls / "UID_1_1_1_x.bmp")
    with caplog.at_level(logging.WARNING, logger="alldetect"):
        m = build_manifest(tmp_path)
    assert m.groupby("label_name")["label"].first().to_dict() == {c: int(c == blast) for c in names}
    assert "cannot tell" not in caplog.text


def test_class_folders_with_names_that_say_nothing_warn_which_is_which(tmp_path, caplog):
    for cls in ("a", "b"):
        write_image(tmp_path / cls / "x.png")
    with caplog.at_level(logging.WARNING, logger="alldetect"):
        m = build_manifest(tmp_path)
    assert m.groupby("label_name")["label"].first().to_dict() == {"a": 0, "b": 1}
    assert "treating b as `all` (label 1) and a as `hem` (label 0)" in caplog.text


def test_more_than_two_class_folders_is_a_clear_error(tmp_path):
    for cls in ("all", "hem", "other"):
        write_image(tmp_path / cls / "x.png")
    with pytest.raises(UserError, match=r"3 class folders \(all, hem, other\).*keep two"):
        build_manifest(tmp_path)


def test_class_folders_all_hem_with_uid_names(tmp_path):
    write_image(tmp_path / "all" / "UID_7_1_1_all.bmp")
    write_image(tmp_path / "hem" / "UID_H3_1_1_hem.bmp")
    m = build_manifest(tmp_path)
    assert dict(zip(m["label_name"], m["label"])) == {"all": 1, "hem": 0}
    assert sorted(m["subject"]) == ["7", "H3"]


def test_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no images"):
        build_manifest(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_manifest(tmp_path / "nope")


def test_one_class(tmp_path):
    write_image(tmp_path / "all" / "a.png")
    write_image(tmp_path / "all" / "b.png")
    with pytest.raises(UserError, match=r"only one class folder \(all\)"):
        build_manifest(tmp_path)


def test_cnmc_name_in_wrong_class_folder(tmp_path):
    write_image(tmp_path / "fold_0/all/UID_H3_1_1_hem.bmp")
    with pytest.raises(UserError, match="other class's folder"):
        build_manifest(tmp_path)


def test_cnmc_folder_with_unparseable_names(tmp_path):
    write_image(tmp_path / "fold_0/all/cell1.bmp")
    with pytest.raises(UserError, match="not named like"):
        build_manifest(tmp_path)


def _bad_images(root):
    write_image(root / "fold_0/all/UID_1_1_1_all.bmp")
    write_image(root / "fold_0/hem/UID_H1_1_1_hem.bmp")
    (root / "fold_0/all/UID_1_1_2_all.bmp").write_text("this is not an image")
    data = (root / "fold_0/all/UID_1_1_1_all.bmp").read_bytes()
    (root / "fold_0/all/UID_1_1_3_all.bmp").write_bytes(data[: len(data) // 2])
    Image.new("L", (64, 64)).save(root / "fold_0/hem/UID_H1_1_2_hem.bmp")
    Image.new("RGBA", (64, 64)).save(root / "fold_0/hem/UID_H1_1_3_hem.png")
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(root / "fold_0/hem/UID_H1_1_4_hem.png")


def test_bad_images_are_named_or_skipped(tmp_path):
    _bad_images(tmp_path)
    m = build_manifest(tmp_path)
    with pytest.raises(UserError, match=r"5 image\(s\) .* cannot be used") as err:
        drop_bad_images(m, tmp_path, skip_bad=False)
    text = str(err.value)
    assert "UID_1_1_2_all.bmp: not a readable image" in text and "truncated" in text
    assert "greyscale" in text and "RGBA" in text and "--skip-bad" in text
    kept, bad = drop_bad_images(m, tmp_path, skip_bad=True)
    assert list(kept["path"]) == ["fold_0/all/UID_1_1_1_all.bmp", "fold_0/hem/UID_H1_1_1_hem.bmp"]
    assert len(bad) == 5


def test_sixteen_bit_png_named(tmp_path):
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(tmp_path / "x.png")
    from alldetect.data.images import check_image

    assert "16-bit" in check_image(tmp_path / "x.png")[3]


def test_sixteen_bit_rgb_and_32_bit_bmp_are_read_as_8_bit_rgb_and_said_so(tmp_path, caplog):
    """They decode to the same 8-bit RGB cv2 reads for training; index and split name them, nothing is silent."""
    import cv2

    from alldetect.commands.data import index_command

    root = tmp_path / "C-NMC_training_data"
    for subject in ["1", "2", "3"]:
        write_image(root / f"fold_0/all/UID_{subject}_1_1_all.bmp")
        write_image(root / f"fold_0/hem/UID_H{subject}_1_1_hem.bmp")
    wide = (np.random.default_rng(0).random((64, 64, 3)) * 65535).astype(np.uint16)
    cv2.imwrite(str(root / "fold_0/all/UID_1_2_1_all.png"), wide)
    Image.fromarray(np.zeros((64, 64, 4), np.uint8), "RGBA").save(root / "fold_0/hem/UID_H1_2_1_hem.bmp")
    text = index_command(str(tmp_path))
    assert "2 image(s) are not 24-bit RGB and are converted when read" in text
    assert "UID_1_2_1_all.png (16-bit RGB, read as 8-bit)" in text
    assert "UID_H1_2_1_hem.bmp (32-bit BMP, read without its 4th byte)" in text
    assert "every image is readable (24-bit RGB, or converted as listed)" in text
    with caplog.at_level("WARNING", logger="alldetect"):
        kept, bad = drop_bad_images(build_manifest(tmp_path), tmp_path, skip_bad=False)
    assert len(kept) == 8 and bad.empty and "converted when read" in caplog.text


def test_identical_images_under_two_classes_or_people_are_named(tmp_path, capsys):
    import shutil

    from alldetect.cli import main
    from alldetect.commands.data import index_command

    root = tmp_path / "C-NMC_training_data"
    for subject in ["1", "2", "3"]:
        for i in range(2):
            write_image(root / f"fold_0/all/UID_{subject}_{i}_1_all.bmp")
            write_image(root / f"fold_0/hem/UID_H{subject}_{i}_1_hem.bmp")
    clean = index_command(str(tmp_path))
    assert "byte for byte" not in clean
    shutil.copy(root / "fold_0/all/UID_1_0_1_all.bmp", root / "fold_0/hem/UID_H2_7_1_hem.bmp")
    shutil.copy(root / "fold_0/all/UID_2_0_1_all.bmp", root / "fold_0/all/UID_3_7_1_all.bmp")
    shutil.copy(root / "fold_0/hem/UID_H3_0_1_hem.bmp", root / "fold_0/hem/UID_H3_9_1_hem.bmp")  # one person: fine
    text = index_command(str(tmp_path))
    c = "C-NMC_training_data/fold_0"
    assert (f"1 image(s) appear, byte for byte, under both classes: {c}/all/UID_1_0_1_all.bmp = "
            f"{c}/hem/UID_H2_7_1_hem.bmp") in text
    assert (f"1 image(s) appear, byte for byte, under two or more people: {c}/all/UID_2_0_1_all.bmp = "
            f"{c}/all/UID_3_7_1_all.bmp") in text
    assert "UID_H3_9_1_hem" not in text
    assert main(["split", str(tmp_path), "--k", "2", "--out", str(tmp_path / "f.csv")]) == 0
    assert "under both classes" in capsys.readouterr().out


def test_two_disagreeing_labels_files_are_refused_naming_both(tmp_path):
    """A labels file in the folder and another beside it: one was picked silently."""
    root, images = _prelim(tmp_path)
    beside = root / "C-NMC_test_prelim_phase_data_labels.csv"
    inside = images / "phase2.csv"
    inside.write_text(beside.read_text())
    assert build_manifest(images)["label"].tolist()[:2] == [1, 0]  # the same labels twice: fine
    inside.write_text(beside.read_text().replace("UID_H2_1_2_hem.bmp,2.bmp,0", "UID_H2_1_2_hem.bmp,2.bmp,1"))
    with pytest.raises(UserError, match=rf"two labels files for one folder disagree: {inside} and {beside} \(on "
                                        r"2.bmp\).*remove or rename the other"):
        build_manifest(images)
