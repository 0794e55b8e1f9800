import json
import re
import zipfile

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_score, recall_score, roc_auc_score

from alldetect.cli import main
from alldetect.commands.ensemble import ensemble_command
from alldetect.commands.evaluate import evaluate_command
from alldetect.engine.rundir.find import find_fold_runs, group_members
from alldetect.ensemble.combine import fit_weights
from alldetect.ensemble.isbi import isbi_lines
from alldetect.errors import UserError
from alldetect.metrics import best_threshold, score, weighted_f1_by_threshold
from alldetect.plots import probability_text

from conftest import FAST, TINY
from fake_runs import make_run, oof_frame, write_predictions

SUBJECTS = ["1", "2", "3", "H1", "H2", "H3"]  # two subjects of each class per fold, 4 images each


def _images(fold: int):
    paths, labels = [], []
    for s in (SUBJECTS[fold], SUBJECTS[3 + fold]):
        for i in range(4):
            cls = "hem" if s.startswith("H") else "all"
            paths.append(f"fold_{fold}/{cls}/UID_{s}_{i}_1_{cls}.bmp")
            labels.append(int(cls == "all"))
    return paths, labels


def _member(root, arch, quality, seed, fingerprint="abc123", fold_file="folds/data_k3_s42.csv", folds=range(3),
            select="last"):
    """runs/<arch>/fold0..2 with OOF probabilities that separate the classes better as `quality` grows."""
    rng = np.random.default_rng(seed)
    for fold in folds:
        paths, labels = _images(fold)
        probs = np.clip(0.5 + quality * (np.array(labels) - 0.5) + rng.normal(0, 0.25, len(labels)), 0.01, 0.99)
        make_run(root / arch / f"fold{fold}", arch, fingerprint=fingerprint, fold_file=fold_file,
                 oof=oof_frame(paths, labels, probs.round(6), fold), select=select)
    return root / arch


@pytest.fixture
def two_members(workdir):
    return _member(workdir / "runs", "proposed", 0.3, 1), _member(workdir / "runs", "resnet50", 0.5, 2)


def test_metrics_match_scikit_learn_on_a_known_confusion_matrix():
    # 6 hem, 10 all; predicted: hem -> 4 hem + 2 all, all -> 3 hem + 7 all
    labels = [0] * 6 + [1] * 10
    prob = [0.1, 0.2, 0.3, 0.4, 0.6, 0.7] + [0.2, 0.3, 0.45] + [0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 0.95]
    subjects = ["H1"] * 3 + ["H2"] * 3 + ["1"] * 5 + ["2"] * 5
    s = score(labels, prob, 0.5, subjects=subjects)
    pred = (np.array(prob) >= 0.5).astype(int)
    assert s["confusion"] == [[4, 2], [3, 7]]
    by_hand = (10 * (2 * 7 / (2 * 7 + 2 + 3)) + 6 * (2 * 4 / (2 * 4 + 3 + 2))) / 16
    assert s["f1"] == pytest.approx(by_hand) == pytest.approx(f1_score(labels, pred, average="weighted"))
    assert s["accuracy"] == pytest.approx(11 / 16) == pytest.approx(accuracy_score(labels, pred))
    assert s["precision"] == pytest.approx(7 / 9) == pytest.approx(precision_score(labels, pred))
    assert s["recall"] == pytest.approx(7 / 10) == pytest.approx(recall_score(labels, pred))
    assert s["roc_auc"] == pytest.approx(roc_auc_score(labels, prob))
    assert s["per_subject_accuracy"] == pytest.approx({"H1": 1.0, "H2": 1 / 3, "1": 2 / 5, "2": 1.0})
    assert s["subject_accuracy"] == pytest.approx((1 + 1 / 3 + 2 / 5 + 1) / 4)


def test_threshold_curve_matches_scikit_learn_and_best_threshold_is_its_maximum():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 2, 30)
        prob = rng.random(30).round(1)  # ties on purpose
        thresholds, f1 = weighted_f1_by_threshold(labels, prob)
        for t, value in zip(thresholds, f1):
            assert value == pytest.approx(f1_score(labels, (prob >= t).astype(int), average="weighted", zero_division=0))
        assert score(labels, prob, best_threshold(labels, prob))["f1"] == pytest.approx(f1.max())


@pytest.mark.slow
def test_fitted_weights_never_score_worse_on_oof_than_equal_weights():
    rng = np.random.default_rng(0)
    moved = 0
    for _ in range(24):
        n = int(rng.integers(20, 200))
        labels = rng.integers(0, 2, n)
        quality = rng.uniform(-0.3, 0.6, 3)  # members from anti-informative to good
        probs = np.clip(0.5 + quality * (labels[:, None] - 0.5) + rng.normal(0, 0.3, (n, 3)), 0.001, 0.999)
        equal = np.full(3, 1 / 3)
        for threshold in (0.5, "oof"):
            w, _ = fit_weights(probs, labels, threshold)
            assert (w >= 0).all() and w.sum() == pytest.approx(1)

            def f1(weights, probs=probs, labels=labels, threshold=threshold):
                p = probs @ weights
                return score(labels, p, best_threshold(labels, p) if threshold == "oof" else threshold)["f1"]

            assert f1(w) >= f1(equal)
            assert log_loss(labels, probs @ w) <= log_loss(labels, probs @ equal) + 1e-9
            moved += not np.allclose(w, equal)
    assert moved > 12  # the fit does move the weights when it helps


def test_equal_weight_oof_ensemble_is_the_mean_of_members(two_members, workdir, capsys):
    ensemble_command([str(m) for m in two_members], oof=True, name=None)
    out = capsys.readouterr().out
    folder = workdir / "submissions/oof_proposed+resnet50"
    table = pd.read_csv(folder / "oof.csv")
    assert len(table) == 24
    np.testing.assert_allclose(table["prob_all"], (table["prob_proposed"] + table["prob_resnet50"]) / 2, atol=1e-6)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert list(metrics["scores"]) == ["proposed", "resnet50", "ensemble"]
    for name in ("proposed", "ensemble"):
        column = "prob_all" if name == "ensemble" else f"prob_{name}"
        expected = score(table["label"], table[column], 0.5, subjects=table["subject"].astype(str))
        assert metrics["scores"][name]["f1"] == pytest.approx(expected["f1"])
        assert metrics["scores"][name]["confusion"] == expected["confusion"]
        assert f"{expected['f1']:.4f}" in out
    assert metrics["weights"] == {"proposed": 0.5, "resnet50": 0.5} and metrics["threshold"] == 0.5
    assert "per-subject accuracy" in out and set(metrics["scores"]["ensemble"]["per_subject_accuracy"]) == set(SUBJECTS)


def test_ensemble_records_are_typed_and_versioned(two_members, workdir):
    """metrics.json round-trips through its model; one from before versions reads as version 1; a newer version, a
    key the model does not know and a value of the wrong type are refused, naming the file and what to do."""
    from alldetect.ensemble.record import ENSEMBLE_VERSION, EnsembleRecord, read_ensemble_record

    ensemble_command([str(m) for m in two_members], oof=True, name="cv", overrides=["weights=oof"])
    path = workdir / "submissions/oof_cv/metrics.json"
    written = json.loads(path.read_text())
    record = read_ensemble_record(path, "remake it")
    assert isinstance(record, EnsembleRecord) and record.version == ENSEMBLE_VERSION == written["version"]
    assert record.members == ["proposed", "resnet50"] and record.scores["ensemble"] == written["scores"]["ensemble"]
    assert record.per_fold is not None and set(record.per_fold) == {0, 1, 2}  # JSON's "0" keys are folds again
    del written["version"]  # as alldetect wrote it before versions
    path.write_text(json.dumps(written))
    assert read_ensemble_record(path, "remake it") == record
    for change, refusal in (({"version": ENSEMBLE_VERSION + 1}, r"is a version 2 record, written by a newer"),
                            ({"images": "many"}, r"is not a record `alldetect ensemble` writes: images: Input should"),
                            ({"colour": "red"}, r"is not a record `alldetect ensemble` writes: colour: Extra inputs")):
        path.write_text(json.dumps({**written, **change}))
        with pytest.raises(UserError, match=rf"metrics.json {refusal}.*remake it"):
            read_ensemble_record(path, "remake it")


def test_members_that_chose_epochs_on_their_validation_folds_are_labelled_optimistic(workdir, capsys):
    honest = _member(workdir / "runs", "proposed", 0.3, 1)
    ensemble_command([str(honest)], oof=True, name=None)
    out = capsys.readouterr().out
    assert "OPTIMISTIC" not in out and re.search(r"^proposed .* last$", out, re.M)
    peeking = _member(workdir / "runs", "resnet50", 0.5, 2, select="outer")
    ensemble_command([str(honest), str(peeking)], oof=True, name=None)
    out = capsys.readouterr().out
    assert "OPTIMISTIC: resnet50 chose each fold's epoch on the images it is scored on" in out
    metrics = json.loads((workdir / "submissions/oof_proposed+resnet50/metrics.json").read_text())
    assert metrics["scores"]["proposed"]["selection"] == "last"
    assert metrics["scores"]["resnet50"]["selection"] == metrics["scores"]["ensemble"]["selection"] == \
        "outer (OPTIMISTIC)"


def test_oof_weights_and_threshold_are_cross_fitted_and_recorded(two_members, workdir, capsys):
    ensemble_command([str(m) for m in two_members], oof=True, name="cv", overrides=["weights=oof", "threshold=oof"])
    out = capsys.readouterr().out
    metrics = json.loads((workdir / "submissions/oof_cv/metrics.json").read_text())
    table = pd.read_csv(workdir / "submissions/oof_cv/oof.csv")
    assert "weights fitted on all out-of-fold predictions: proposed" in out and "threshold chosen" in out
    assert metrics["cross_fitted"] and list(metrics["scores"]) == ["proposed", "resnet50", "equal weights", "ensemble"]
    probs, labels, folds = table[["prob_proposed", "prob_resnet50"]].to_numpy(), table["label"].to_numpy(), table["fold"]
    for fold in range(3):  # each fold is scored with what the other two folds fitted
        rest = (folds != fold).to_numpy()
        w, _ = fit_weights(probs[rest], labels[rest], "oof")
        recorded = metrics["per_fold"][str(fold)]
        assert list(recorded["weights"].values()) == pytest.approx(w, abs=1e-6)
        assert recorded["threshold"] == pytest.approx(best_threshold(labels[rest], probs[rest] @ w))
        here = ~rest  # the fold's written probabilities and decisions are those weights and that threshold
        assert table.loc[here, "prob_all"].to_numpy() == pytest.approx(probs[here] @ w, abs=2e-6)
        assert (table.loc[here, "pred"].to_numpy() == (probs[here] @ w >= recorded["threshold"])).all()
    assert metrics["scores"]["ensemble"]["f1"] == pytest.approx(
        f1_score(labels, table["pred"], average="weighted"))  # scikit-learn on the decisions as written
    final, _ = fit_weights(probs, labels, "oof")
    assert list(metrics["weights"].values()) == pytest.approx(final, abs=1e-6)
    assert metrics["threshold"] == pytest.approx(best_threshold(labels, probs @ final))


def test_submission_averages_folds_then_members_and_writes_isbi_file(two_members, workdir, capsys):
    rng = np.random.default_rng(3)
    names = [f"{i}.bmp" for i in range(1, 12)]
    truth = rng.integers(0, 2, 11)
    member_means = []
    for member in two_members:
        fold_probs = rng.random((3, 11)).round(6)
        member_means.append(fold_probs.mean(0))
        for k in range(3):
            order = rng.permutation(11)  # row order must not matter
            write_predictions(member / f"fold{k}", "prelim", np.array(names)[order], fold_probs[k][order],
                              labels=truth[order])
    ensemble_command([str(m) for m in two_members], oof=False, name="prelim")
    out = capsys.readouterr().out
    sub = pd.read_csv(workdir / "submissions/prelim.csv").set_index("image").loc[names]
    expected = (member_means[0] + member_means[1]) / 2
    np.testing.assert_allclose(sub["prob_all"], expected, atol=2e-6)
    np.testing.assert_allclose(sub["prob_proposed"], member_means[0], atol=2e-6)
    assert list(sub["label"]) == list((expected >= 0.5).astype(int))
    lines = (workdir / "submissions/prelim/isbi_valid.predict").read_text().splitlines()
    assert lines == [str(v) for v in (expected >= 0.5).astype(int)]  # line i is i.bmp: 1, 2, ..., 10, 11
    with zipfile.ZipFile(workdir / "submissions/prelim/isbi_valid.zip") as z:
        assert z.namelist() == ["isbi_valid.predict"]
        assert z.read("isbi_valid.predict").decode().splitlines() == lines
    metrics = json.loads((workdir / "submissions/prelim/metrics.json").read_text())
    assert metrics["scores"]["ensemble"]["f1"] == pytest.approx(score(truth, expected)["f1"], abs=1e-5)
    assert "held-out scores" in out

    labels_file = workdir / "labels.csv"
    labels_file.write_text("Patient_ID,new_names,labels\n" + "\n".join(
        f"UID_{'1' if y else 'H1'}_{i}_1_{'all' if y else 'hem'}.bmp,{i}.bmp,{y}" for i, y in enumerate(truth, 1)))
    result = evaluate_command(str(workdir / "submissions/prelim.csv"), str(labels_file))
    assert result["scores"]["submission"]["f1"] == pytest.approx(metrics["scores"]["ensemble"]["f1"])
    assert result["scores"]["proposed"]["f1"] == pytest.approx(metrics["scores"]["proposed"]["f1"])
    assert (workdir / "submissions/prelim/evaluation.json").is_file()
    record = workdir / "submissions/prelim/ensemble.json"
    record.write_text(record.read_text()[:40])  # cut short: the members' thresholds are unknown, not 0.5
    with pytest.raises(UserError, match=r"ensemble.json is not valid JSON \(.*members' thresholds are "
                                        r"unknown: remake it"):
        evaluate_command(str(workdir / "submissions/prelim.csv"), str(labels_file))
    record.unlink()  # a submission made by other means: every member at 0.5, and the output says so
    assert evaluate_command(str(workdir / "submissions/prelim.csv"), str(labels_file))["scores"]["proposed"][
        "threshold"] == 0.5
    assert "each member is scored at threshold 0.5" in capsys.readouterr().out


def test_unlabelled_submission_has_no_metrics_and_class_folders_no_isbi_file(two_members, workdir, capsys):
    for member in two_members:
        for k in range(3):
            write_predictions(member / f"fold{k}", "final", [f"{i}.bmp" for i in range(1, 4)], [0.2, 0.6, 0.9])
            write_predictions(member / f"fold{k}", "cls", ["all/a.bmp", "hem/b.bmp"], [0.7, 0.1], labels=[1, 0])
    ensemble_command([str(m) for m in two_members], oof=False, name="final")
    assert (workdir / "submissions/final/isbi_valid.predict").read_text() == "0\n1\n1\n"
    assert not (workdir / "submissions/final/metrics.json").exists()
    ensemble_command([str(m) for m in two_members], oof=False, name="cls")
    assert not (workdir / "submissions/cls/isbi_valid.predict").exists()
    assert (workdir / "submissions/cls/metrics.json").is_file()
    assert "no isbi_valid.predict: the images are not a C-NMC test folder" in capsys.readouterr().out


def test_isbi_lines_are_in_numeric_order_and_only_for_numbered_folders():
    images = pd.Series(["C-NMC_test_final_phase_data/10.bmp", "C-NMC_test_final_phase_data/2.bmp",
                        "C-NMC_test_final_phase_data/1.bmp", "C-NMC_test_final_phase_data/11.bmp"]
                       + [f"C-NMC_test_final_phase_data/{i}.bmp" for i in range(3, 10)])
    labels = np.array([int(p.split("/")[1].split(".")[0]) % 2 for p in images])
    lines, _ = isbi_lines(images, labels)
    assert lines == [str(i % 2) for i in range(1, 12)]
    assert isbi_lines(pd.Series(["1.bmp", "3.bmp"]), np.array([0, 1]))[0] is None
    lines, why = isbi_lines(pd.Series(["all/a.bmp", "hem/b.bmp"]), np.array([0, 1]))
    assert lines is None and "not a C-NMC test folder" in why


def test_runs_of_different_data_or_fold_files_are_refused(workdir):
    a = _member(workdir / "runs", "proposed", 0.3, 1, fingerprint="aaa", fold_file="folds/x_k3_s42.csv")
    b = _member(workdir / "runs", "resnet50", 0.3, 2, fingerprint="bbb", fold_file="folds/y_k3_s42.csv")
    with pytest.raises(UserError, match=r"different data .*folds/x_k3_s42.csv \(data fingerprint aaa\).*"
                                        r"folds/y_k3_s42.csv \(data fingerprint bbb\)"):
        ensemble_command([str(a), str(b)], oof=True, name=None)
    c = _member(workdir / "runs", "vgg16", 0.3, 3, fingerprint="aaa", fold_file="folds/x_k3_s7.csv")
    oof = pd.read_csv(c / "fold0/oof.csv").assign(fold=1)
    oof.to_csv(c / "fold0/oof.csv", index=False)  # another split of the same data puts images in other folds
    with pytest.raises(UserError, match=r"vgg16 and proposed were trained on different fold files "
                                        r"\(folds/x_k3_s7.csv and folds/x_k3_s42.csv\): 8 image\(s\)"):
        ensemble_command([str(a), str(c)], oof=True, name=None)


def test_members_covering_different_images_are_refused(workdir):
    a = _member(workdir / "runs", "proposed", 0.3, 1)
    b = _member(workdir / "runs", "resnet50", 0.3, 2, folds=[0, 1])
    with pytest.raises(UserError, match=r"cover different images: resnet50 lacks 8 image\(s\) that proposed has"):
        ensemble_command([str(a), str(b)], oof=True, name=None)
    # a fold named on its own and again through its architecture folder counts once, in one member
    members = group_members(find_fold_runs([str(a / "fold1"), str(a), str(b / "fold0")]))
    assert [(m.name, [r.name for r in m.runs]) for m in members] == [("proposed", ["fold1", "fold0", "fold2"]),
                                                                      ("resnet50", ["fold0"])]


def test_prediction_files_that_do_not_match_are_refused(two_members, workdir):
    a, b = two_members
    names = [f"{i}.bmp" for i in range(1, 6)]
    for member in two_members:
        for k in range(3):
            write_predictions(member / f"fold{k}", "t", names, [0.4] * 5)
    write_predictions(b / "fold2", "t", names[:4], [0.4] * 4)
    with pytest.raises(UserError, match=r"resnet50/fold2/pred_t.csv does not cover the images of .*"
                                        r"proposed/fold0/pred_t.csv: it lacks 1 \(5.bmp\)"):
        ensemble_command([str(a), str(b)], oof=False, name="t")
    write_predictions(b / "fold2", "t", names, [0.4] * 5, fingerprint="other")
    with pytest.raises(UserError, match="predictions 't' were made of different images"):
        ensemble_command([str(a), str(b)], oof=False, name="t")
    (b / "fold1/pred_t.csv").unlink()
    with pytest.raises(UserError, match=r"no predictions named 't' in .*resnet50/fold1: run `alldetect predict"):
        ensemble_command([str(a), str(b)], oof=False, name="t")


def test_labels_file_that_does_not_match_is_refused(workdir):
    sub = workdir / "submissions/s.csv"
    sub.parent.mkdir()
    pd.DataFrame({"image": ["1.bmp", "2.bmp", "3.bmp"], "prob_all": [0.2, 0.7, 0.9], "label": [0, 1, 1]}).to_csv(
        sub, index=False)
    labels = workdir / "labels.csv"
    labels.write_text("Patient_ID,new_names,labels\nUID_1_1_1_all.bmp,1.bmp,1\nUID_H1_1_1_hem.bmp,2.bmp,0\n"
                      "UID_H1_2_1_hem.bmp,4.bmp,0\n")
    with pytest.raises(UserError, match=r"does not match the images of .*s.csv: 1 submitted image\(s\) have no label "
                                        r"\(3.bmp\) and 1 labelled image\(s\) are not in the submission \(4.bmp\)"):
        evaluate_command(str(sub), str(labels))
    labels.write_text("name,label\n1.bmp,1\n")
    with pytest.raises(UserError, match=r"lacks column\(s\)"):
        evaluate_command(str(sub), str(labels))


def test_cli_errors_and_option_order(two_members, workdir, capsys):
    a, b = (str(m.relative_to(workdir)) for m in two_members)
    assert main(["ensemble", a, b, "--oof", "weights=oof"]) == 0
    assert main(["ensemble", a, "weights=oof", b, "--oof"]) == 0
    capsys.readouterr()
    assert main(["ensemble", a, b]) == 2
    assert "--oof (out-of-fold predictions) or --name NAME" in capsys.readouterr().err
    assert main(["ensemble", a, b, "--oof", "threshold=2"]) == 2
    assert "threshold=2: the threshold must lie strictly between 0 and 1" in capsys.readouterr().err
    assert main(["ensemble", a, b, "--oof", "weight=oof"]) == 2
    assert "unknown option weight= for `alldetect ensemble`. Valid options: weights=, threshold=" in capsys.readouterr().err
    assert main(["ensemble", f"{a}/fold0", "--oof", "threshold=oof"]) == 2
    assert "needs out-of-fold predictions of two or more folds" in capsys.readouterr().err
    assert main(["ensemble", "runs/none", "--oof"]) == 2
    assert "run folder runs/none does not exist" in capsys.readouterr().err
    assert main(["evaluate", "submissions/none.csv", "--labels", "x.csv"]) == 2
    assert "submission submissions/none.csv does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_train_predict_ensemble_evaluate_end_to_end(tiny_demo, workdir, capsys, tmp_path_factory):
    """Two architectures trained on every fold (the proposed network and timm's tiny test network), then every step
    of the held-out pipeline through the CLI."""
    from alldetect.data.demo import make_demo_data

    for arch in ("proposed", TINY):
        assert main(["train", arch, "all", *FAST, f"data.root={tiny_demo}"]) == 0
    assert main(["ensemble", "runs/proposed", f"runs/{TINY}", "--oof"]) == 0
    out = capsys.readouterr().out
    assert "out-of-fold scores of 36 images" in out and TINY in out and "ensemble" in out

    # a labelled test folder of other (synthetic) subjects, numbered like C-NMC's preliminary test
    other = make_demo_data(tmp_path_factory.mktemp("other") / "d", subjects=6, per_subject=2, seed=9)
    test = workdir / "prelim/C-NMC_test_prelim_phase_data"
    test.mkdir(parents=True)
    rows = []
    for i, path in enumerate(sorted(other.glob("C-NMC_training_data/fold_*/*/*.bmp")), 1):
        (test / f"{i}.bmp").write_bytes(path.read_bytes())
        rows.append(f"{path.name},{i}.bmp,{int(path.parent.name == 'all')}")
    labels = workdir / "prelim/C-NMC_test_prelim_phase_data_labels.csv"
    labels.write_text("Patient_ID,new_names,labels\n" + "\n".join(rows) + "\n")
    assert main(["predict", "runs/proposed", f"runs/{TINY}", "--data", str(test), "--name", "prelim",
                 "tta=d8", "num_workers=0"]) == 0
    assert main(["ensemble", "runs/proposed", f"runs/{TINY}", "--name", "prelim", "weights=oof",
                 "threshold=oof"]) == 0
    assert main(["evaluate", "submissions/prelim.csv", "--labels", str(labels)]) == 0
    lines = (workdir / "submissions/prelim/isbi_valid.predict").read_text().splitlines()
    assert len(lines) == 12 and set(lines) <= {"0", "1"}
    metrics = json.loads((workdir / "submissions/prelim/metrics.json").read_text())
    evaluation = json.loads((workdir / "submissions/prelim/evaluation.json").read_text())
    assert evaluation["scores"]["submission"]["f1"] == pytest.approx(metrics["scores"]["ensemble"]["f1"])
    assert metrics["tta"] == "d8" and set(metrics["weights"]) == {"proposed", TINY}

    # The report of all of the above, and a look inside one network (tests/test_report.py checks the details).
    capsys.readouterr()
    assert main(["report", "--no-speed"]) == 0
    out = capsys.readouterr().out
    assert "subject-grouped 3-fold" in out and f"ensemble (proposed+{TINY})" in out
    readme = (workdir / f"reports/proposed+{TINY}/README.md").read_text()
    assert "SYNTHETIC demo data" in readme and "## Held-out sets" in readme and "submissions/prelim.csv" in readme
    assert "## Missing or left out\n\nNothing" in readme
    first = pd.read_csv(workdir / "runs" / TINY / "fold0/oof.csv").iloc[0]
    image = tiny_demo / first["path"]
    assert main(["visualize", f"runs/{TINY}/fold0", str(image)]) == 0
    assert f"p(all) {probability_text(first['prob_all'])}" in capsys.readouterr().out  # as validation saw it
    assert (workdir / f"reports/visualize/{TINY}_fold0/{image.stem}/gradcam.png").is_file()


def test_single_folds_never_replace_the_full_result_of_the_same_members(two_members, workdir, capsys):
    ensemble_command([str(m) for m in two_members], oof=True, name=None)
    full = (workdir / "submissions/oof_proposed+resnet50/metrics.json").read_text()
    ensemble_command(["runs/proposed/fold0", "runs/proposed/fold2", "runs/resnet50/fold0", "runs/resnet50/fold2"],
                     oof=True, name=None)
    assert (workdir / "submissions/oof_proposed+resnet50/metrics.json").read_text() == full
    assert json.loads((workdir / "submissions/oof_proposed-fold0.2+resnet50-fold0.2/metrics.json").read_text())[
        "images"] == 16


def test_a_prediction_whose_record_is_not_its_own_is_refused(two_members, workdir):
    """pred_<NAME>.csv and .json are a pair: a CSV beside another predict's JSON (a predict killed between the two
    writes, a file copied back) never reaches a submission; nor does a JSON that is not predict's record."""
    a, b = two_members
    names = [f"{i}.bmp" for i in range(1, 5)]
    for member in two_members:
        for k in range(3):
            write_predictions(member / f"fold{k}", "t", names, [0.4] * 4)
    ensemble_command([str(a), str(b)], oof=False, name="t")
    run = b / "fold1"
    old_json = (run / "pred_t.json").read_bytes()
    write_predictions(run, "t", names, [0.9] * 4, fingerprint="other data")  # a later predict of other images...
    (run / "pred_t.json").write_bytes(old_json)  # ...whose record did not get written: the old one is back
    with pytest.raises(UserError, match=r"fold1/pred_t.csv is not the file pred_t.json describes .*rerun "
                                        r"`alldetect predict .*fold1 --data DIR --name t`"):
        ensemble_command([str(a), str(b)], oof=False, name="t")
    (run / "pred_t.json").unlink()
    with pytest.raises(UserError, match=r"fold1/pred_t.json is missing .*stopped half-way"):
        ensemble_command([str(a), str(b)], oof=False, name="t")
    (run / "pred_t.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"fold1/pred_t.json holds a JSON list, not a record `alldetect predict` writes"):
        ensemble_command([str(a), str(b)], oof=False, name="t")
    (run / "pred_t.json").write_text(json.dumps({"name": "t", "data_fingerprint": "data1"}))  # an older alldetect's
    with pytest.raises(UserError, match=r"fold1/pred_t.json does not record the digest of pred_t.csv"):
        ensemble_command([str(a), str(b)], oof=False, name="t")


def test_prediction_records_are_typed_and_versioned(two_members, workdir):
    """pred_<NAME>.json round-trips through its model; a record from before versions reads as version 1; a newer
    version, a key it does not know and a value of the wrong type are refused, naming the file."""
    from alldetect.engine.rundir.files import PRED_VERSION, PredictionRecord, RunDir

    run = two_members[0] / "fold0"
    write_predictions(run, "t", ["1.bmp", "2.bmp"], [0.2, 0.9], tta="d8")
    files, path = RunDir(run), run / "pred_t.json"
    record = files.read_pred_meta("t")
    assert isinstance(record, PredictionRecord) and record.version == PRED_VERSION and record.tta == "d8"
    written = json.loads(path.read_text())
    assert PredictionRecord.model_validate(written) == record  # round trip
    del written["version"]  # as alldetect wrote it before versions
    path.write_text(json.dumps(written))
    assert files.read_pred_meta("t") == record
    for change, refusal in (({"version": PRED_VERSION + 1}, r"version 2 record, written by a newer alldetect"),
                            ({"images": "many"}, r"not a record `alldetect predict` writes: images: Input should be"),
                            ({"colour": "red"}, r"not a record `alldetect predict` writes: colour: Extra inputs")):
        path.write_text(json.dumps({**written, **change}))
        with pytest.raises(UserError, match=rf"fold0/pred_t.json is (a )?{refusal}.*rerun `alldetect predict"):
            files.read_pred_meta("t")


def test_predict_killed_between_its_files_leaves_nothing_an_ensemble_would_combine(two_members, workdir, monkeypatch):
    import alldetect.engine.rundir.files as runfiles

    a, b = two_members
    names = [f"{i}.bmp" for i in range(1, 5)]
    for member in two_members:
        for k in range(3):
            write_predictions(member / f"fold{k}", "t", names, [0.4] * 4)
    real = runfiles.write_text

    def killed(path, text):
        if str(path).endswith("pred_t.json"):
            raise KeyboardInterrupt  # the CSV is written, its record is not
        real(path, text)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(runfiles, "write_text", killed)
        write_predictions(b / "fold0", "t", names, [0.9] * 4, fingerprint="other data")
    assert (b / "fold0/pred_t.csv").is_file() and not (b / "fold0/pred_t.json").exists()
    with pytest.raises(UserError, match=r"fold0/pred_t.json is missing"):
        ensemble_command([str(a), str(b)], oof=False, name="t")


def test_a_rerun_submission_leaves_nothing_of_the_earlier_one(two_members, workdir, capsys):
    """A labelled C-NMC test folder, then unlabelled images of other names under the same --name: no stale
    isbi_valid.predict, zip, metrics.json or evaluation.json of the first beside the second; a user's file stays."""
    for member in two_members:
        for k in range(3):
            write_predictions(member / f"fold{k}", "s", [f"{i}.bmp" for i in range(1, 4)], [0.2, 0.6, 0.9],
                              labels=[0, 1, 1])
    ensemble_command([str(m) for m in two_members], oof=False, name="s")
    folder = workdir / "submissions/s"
    (folder / "evaluation.json").write_text("{}")  # as `alldetect evaluate` leaves it
    (folder / "notes.txt").write_text("mine")
    assert {p.name for p in folder.iterdir()} == {"ensemble.json", "isbi_valid.predict", "isbi_valid.zip",
                                                  "metrics.json", "evaluation.json", "notes.txt"}
    for member in two_members:
        for k in range(3):
            write_predictions(member / f"fold{k}", "s", ["a.bmp", "b.bmp"], [0.7, 0.1], fingerprint="data2")
    ensemble_command([str(m) for m in two_members], oof=False, name="s")
    assert "no isbi_valid.predict" in capsys.readouterr().out
    assert {p.name for p in folder.iterdir()} == {"ensemble.json", "notes.txt"}
    assert list(pd.read_csv(workdir / "submissions/s.csv")["image"]) == ["a.bmp", "b.bmp"]


def test_features_that_are_not_numbers_or_not_of_this_prediction_are_refused(two_members, workdir):
    from alldetect.engine.rundir.files import PredictionRecord, RunDir

    a, _ = two_members
    paths = [f"{i}.bmp" for i in range(1, 5)]
    for k in range(3):
        run = RunDir(a / f"fold{k}")
        features = np.ones((4, 3))
        if k == 1:
            features[2, 0] = np.nan
        record = PredictionRecord(name="t", run=str(run), data_root="/data", data_fingerprint="d", data_content="d",
                                  layout="unlabelled", checkpoint_saved_at=run.meta().saved_at)
        run.write_predictions("t", pd.DataFrame({"path": paths, "prob_all": 0.5}), record, (np.array(paths), features))
    with pytest.raises(UserError, match=r"fold1/feat_t.npz: the features of 1 image\(s\) are NaN or infinite "
                                        r"\(3.bmp\)"):
        ensemble_command([str(a)], oof=False, name="t", overrides=["correct=knn"])
    np.savez(a / "fold1/feat_t.npz", paths=np.array(paths), features=np.ones((4, 3)))  # not what predict wrote
    with pytest.raises(UserError, match=r"fold1/feat_t.npz is not the file pred_t.json describes"):
        ensemble_command([str(a)], oof=False, name="t", overrides=["correct=knn"])


def test_one_fold_out_of_fold_scores_with_default_options_leave_out_what_needs_two(two_members, workdir, capsys):
    a, _ = two_members
    assert main(["ensemble", f"{a.relative_to(workdir)}/fold0", "--oof"]) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err  # it named calibrate=temperature, an option never given, and stopped
    assert ("not compared: weights=equal calibrate=temperature, weights=equal calibrate=isotonic, weights=equal "
            "prior=em, weights=equal prior=bbse (they fit something "
            "on the out-of-fold predictions, so they need out-of-fold predictions of two or more folds)") in captured.out
    assert main(["ensemble", f"{a.relative_to(workdir)}/fold0", "--oof", "calibrate=platt"]) == 2
    assert "weights=equal calibrate=platt threshold=0.5 with --oof needs" in capsys.readouterr().err
