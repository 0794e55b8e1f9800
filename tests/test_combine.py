"""Ways of combining members beyond equal averaging (alldetect.ensemble.combine), each checked against an expectation built
without it: brute force, a known generating process, or an invariance the method promises."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit
from sklearn.metrics import log_loss, roc_auc_score

from alldetect.commands.ensemble import ensemble_command
from alldetect.commands.predict import predict_command
from alldetect.ensemble.combine import Inputs, Method, cross_fitted, fit, greedy_weights
from alldetect.ensemble.neighbours import neighbour_means
from alldetect.errors import UserError
from alldetect.metrics import calibration_error, score

from conftest import write_image
from fake_runs import make_run, oof_frame


def _people(rng, n_people=12, per_person=30, shift=1.5):
    """Images grouped by person (a person is all one class): features cluster by person, and a member's
    probability is noisy around the person's class."""
    labels, features, probs, groups = [], [], [], []
    for person in range(n_people):
        cls = person % 2
        centre = rng.normal(0, 3, 8)
        features.append(centre + rng.normal(0, 0.5, (per_person, 8)))
        labels += [cls] * per_person
        probs.append(expit(shift * (cls - 0.5) * 2 + rng.normal(0, 2.0, per_person)))
        groups += [person % 3] * per_person
    return np.array(labels), np.vstack(features), np.concatenate(probs), np.array(groups)


def test_neighbour_means_match_a_brute_force_cosine_search():
    rng = np.random.default_rng(0)
    f, p = rng.normal(size=(30, 5)), rng.random(30)
    f[7] = f[3] * 2.0  # same direction: cosine distance 0, a tie with the image itself
    near = neighbour_means(f, p, ks=(1, 4, 50))
    unit = f / np.linalg.norm(f, axis=1, keepdims=True)
    for i in range(30):
        d = 1 - unit @ unit[i]
        d[i] = np.inf
        order = np.argsort(d, kind="stable")
        assert near[4][i] == pytest.approx(p[order[:4]].mean())
        assert near[50][i] == pytest.approx(p[order[:29]].mean())  # capped at the 29 other images
    assert near[1][3] == pytest.approx(p[7]) and near[1][7] == pytest.approx(p[3])


def test_neighbourhood_correction_helps_when_neighbours_share_a_person_and_is_off_when_they_do_not():
    rng = np.random.default_rng(1)
    labels, features, probs, groups = _people(rng)
    near = {}
    for g in np.unique(groups):  # neighbours within each fold's images, as for OOF predictions
        for k, v in neighbour_means(features[groups == g], probs[groups == g]).items():
            near.setdefault(k, np.zeros(len(probs)))[groups == g] = v
    inputs = Inputs(probs[:, None], {k: v[:, None] for k, v in near.items()})
    p, t, per_fold = cross_fitted(inputs, labels, groups, Method(correct="knn"))
    assert all(c.corrections[0][1] >= 0.5 for c in per_fold.values())  # each fold's fit leans on the neighbours
    assert score(labels, p, t)["f1"] > score(labels, probs)["f1"] + 0.1
    shuffled = {k: rng.permutation(v)[:, None] for k, v in near.items()}  # neighbours that say nothing
    c = fit(Method(correct="knn"), Inputs(probs[:, None], shuffled), labels)
    assert c.corrections[0][1] <= 0.25


@pytest.mark.slow
def test_greedy_selection_drops_a_useless_member_and_never_loses_to_the_best_single_one():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 400)
    good = np.clip(0.5 + 0.35 * (labels - 0.5) * 2 + rng.normal(0, 0.15, 400), 0.01, 0.99)
    noise = rng.random(400)
    w = greedy_weights(np.column_stack([good, noise, good ** 1.1]), labels)
    assert w[1] == 0 and w.sum() == pytest.approx(1)
    for seed in range(10):
        r = np.random.default_rng(seed)
        probs = np.clip(0.5 + r.uniform(0, 0.4, 4) * (labels[:, None] - 0.5) + r.normal(0, 0.25, (400, 4)), 0.01, 0.99)
        w = greedy_weights(probs, labels)
        best_single = min(log_loss(labels, probs[:, j]) for j in range(4))
        assert log_loss(labels, probs @ w) <= best_single + 1e-12
        assert any(np.allclose(w * r, np.round(w * r)) for r in range(1, 41))  # picks: shares of at most 40


def test_rank_averaging_ignores_how_a_member_spreads_its_probabilities():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    a = expit((labels - 0.5) * 2 + rng.normal(0, 1, 300))
    b = expit((labels - 0.5) * 2 + rng.normal(0, 1, 300))
    squashed = b ** 6  # the same order, another scale
    rank = Method(average="rank")
    same, other = (Inputs(np.column_stack([a, b])), Inputs(np.column_stack([a, squashed])))
    fit_same, fit_other = fit(rank, same, labels), fit(rank, other, labels)
    np.testing.assert_array_equal(fit_same.members(same), fit_other.members(other))  # the quantiles averaged
    assert roc_auc_score(labels, fit_same.probs(same)) == pytest.approx(roc_auc_score(labels, fit_other.probs(other)),
                                                                        abs=1e-3)  # mapped back: a few ties at most
    plain = fit(Method(), other, labels).probs(other)
    assert roc_auc_score(labels, plain) < roc_auc_score(labels, fit_other.probs(other)) - 0.005  # pulled by the squashed one


def test_stacking_turns_an_inverted_member_around():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 500)
    good = expit((labels - 0.5) * 3 + rng.normal(0, 1, 500))
    inverted = 1 - expit((labels - 0.5) * 3 + rng.normal(0, 1, 500))
    probs = np.column_stack([good, inverted])
    c = fit(Method(weights="stack"), Inputs(probs), labels)
    assert c.stacker.coef_[0][0] > 0 > c.stacker.coef_[0][1]
    assert roc_auc_score(labels, c.probs(probs)) > roc_auc_score(labels, probs.mean(1)) + 0.2


def test_temperature_scaling_recovers_a_known_overconfidence_and_keeps_every_decision():
    rng = np.random.default_rng(5)
    z = rng.normal(0, 1.5, 20000)
    labels = (rng.random(20000) < expit(z)).astype(int)  # the true probability is expit(z)
    overconfident = expit(3 * z)
    c = fit(Method(calibrate="temperature"), Inputs(overconfident[:, None]), labels)
    assert c.calibrator.t == pytest.approx(3, rel=0.05)
    calibrated = c.probs(overconfident[:, None])
    assert calibration_error(labels, calibrated) < 0.02 < calibration_error(labels, overconfident)
    assert np.array_equal(calibrated >= 0.5, overconfident >= 0.5)


def test_unknown_combination_options_are_clear_errors(workdir, capsys):
    from alldetect.cli import main

    assert main(["ensemble", "runs/x", "--oof", "weights=caruana"]) == 2
    assert "weights=caruana: choose one of equal, oof, greedy, stack" in capsys.readouterr().err


# ---------------------------------------------------------------- from the command line

def _member_with_images(root, data, arch, seed):
    """A member of three fold runs with real (random) weights over images on disk, so predict can run it."""
    rng = np.random.default_rng(seed)
    for fold in range(3):
        paths, labels, subjects = [], [], []
        for person in range(2):
            cls = ("all", "hem")[person]
            subject = f"{'H' if cls == 'hem' else ''}{fold * 2 + person + 1}"
            for i in range(5):
                rel = f"fold_0/{cls}/UID_{subject}_{i}_1_{cls}.bmp"
                write_image(data / rel, size=40)
                paths.append(rel), labels.append(int(cls == "all")), subjects.append(subject)
        run = root / arch / f"fold{fold}"
        make_run(run, arch, weights=True, seed=seed + fold, crop=0, overrides=(f"data.root={data}",))
        oof = oof_frame(paths, labels, rng.random(len(paths)).round(6), fold, subjects)
        oof.to_csv(run / "oof.csv", index=False)
    return root / arch


@pytest.mark.slow
def test_features_and_neighbourhood_correction_from_the_command_line(workdir, capsys):
    data = workdir / "data"
    member = _member_with_images(workdir / "runs", data, "proposed", 0)
    with pytest.raises(UserError, match=r"feat_oof.npz is missing: run `alldetect predict .*fold0 --oof features=true`"):
        ensemble_command([str(member)], oof=True, name=None, overrides=["correct=knn"])
    predict_command([str(member)], None, None, ["features=true", "num_workers=0"], oof=True)
    for fold in range(3):
        run = member / f"fold{fold}"
        oof, pred = pd.read_csv(run / "oof.csv"), pd.read_csv(run / "pred_oof.csv")
        assert list(pred["path"]) == list(oof["path"]) and list(pred["label"]) == list(oof["label"])
        with np.load(run / "feat_oof.npz") as z:
            assert list(z["paths"]) == list(oof["path"]) and z["features"].shape == (10, 1000)  # proposed: 1000
    capsys.readouterr()
    result = ensemble_command([str(member)], oof=True, name="knn", overrides=["correct=knn"])
    out = capsys.readouterr().out
    assert "uses the images jointly" in out and "transductive" in result
    assert set(result["per_fold"][0]["knn"]["proposed"]) == {"k", "mix"}
    # held-out: the test images' own features; the record says the images were used jointly
    test = workdir / "test"
    for i in range(1, 9):
        write_image(test / f"{i}.bmp", size=40)
    predict_command([str(member)], str(test), "prelim", ["features=true", "num_workers=0"])
    record = ensemble_command([str(member)], oof=False, name="prelim", overrides=["correct=knn"])
    assert "transductive" in record and len(pd.read_csv(workdir / "submissions/prelim.csv")) == 8
    saved = json.loads((workdir / "submissions/prelim/ensemble.json").read_text())
    assert saved["method"] == "weights=equal correct=knn" and "knn" in saved
    predict_command([str(member)], str(test), "prelim", ["num_workers=0"])  # again, without features
    assert not (member / "fold0/feat_prelim.npz").exists()  # the old ones may be of other images
    with pytest.raises(UserError, match="feat_prelim.npz is missing"):
        ensemble_command([str(member)], oof=False, name="prelim", overrides=["correct=knn"])


def test_predict_oof_and_name_are_told_apart(workdir):
    data = workdir / "data"
    member = _member_with_images(workdir / "runs", data, "proposed", 1)
    with pytest.raises(UserError, match="--oof"):
        predict_command([str(member)], None, None, [])
    with pytest.raises(UserError, match="choose one"):
        predict_command([str(member)], None, "y", [], oof=True)
    with pytest.raises(UserError, match="kept for --oof"):
        predict_command([str(member)], str(data), "oof", [])
    (member / "fold1/oof.csv").unlink()
    with pytest.raises(UserError, match="fold1 has no oof.csv"):
        predict_command([str(member)], None, None, [], oof=True)
    assert not (member / "fold0/pred_oof.csv").exists()  # checked before anything was written


def test_every_combination_is_compared_with_equal_averaging_in_the_oof_report(workdir, capsys):
    from test_ensemble import _member

    a, b = _member(workdir / "runs", "proposed", 0.3, 1), _member(workdir / "runs", "resnet50", 0.5, 2)
    result = ensemble_command([str(a), str(b)], oof=True, name=None, overrides=["weights=greedy"])
    out = capsys.readouterr().out
    assert "the ensemble made other ways" in out
    assert set(result["alternatives"]) == {"weights=equal", "weights=oof", "weights=stack", "weights=equal average=rank",
                                           "weights=equal calibrate=temperature", "weights=equal calibrate=isotonic",
                                           "weights=equal prior=em", "weights=equal prior=bbse"}
    equal = result["alternatives"]["weights=equal"]
    table = pd.read_csv(workdir / "submissions/oof_proposed+resnet50/oof.csv")
    plain = score(table["label"], (table["prob_proposed"] + table["prob_resnet50"]) / 2)
    assert equal["f1"] == pytest.approx(plain["f1"]) and equal["ece"] == pytest.approx(plain["ece"])
