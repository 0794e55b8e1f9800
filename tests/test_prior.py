"""Label shift (alldetect.ensemble.prior, `ensemble ... prior=`) and the per-person view: each checked against a known
generating process (a test set drawn with a known class mix) or Bayes' rule written out by hand."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit

from alldetect.cli import main
from alldetect.commands.ensemble import ensemble_command
from alldetect.ensemble.combine import Inputs, Method, cross_fitted, fit
from alldetect.ensemble.prior import adjust, bbse_prior, em_prior, joint_confusion
from alldetect.errors import UserError
from alldetect.metrics import per_person

from fake_runs import make_run, oof_frame, write_predictions

TRAIN_MIX = 0.7  # about C-NMC's share of `all`


def _draw(rng, n: int, share: float, train_mix: float = TRAIN_MIX):
    """n images, exactly round(share * n) of them `all`, with the calibrated probabilities of a model trained at
    `train_mix` whose log-odds evidence is N(+-2, 2) (ROC-AUC about 0.92, like a good out-of-fold member)."""
    labels = (np.arange(n) < round(share * n)).astype(int)
    evidence = rng.normal(np.where(labels == 1, 2.0, -2.0), 2.0)  # log-likelihood ratio of each image
    return labels, expit(evidence + logit(train_mix))


@pytest.mark.parametrize("share", [0.2, 0.8])
def test_em_and_bbse_estimate_a_known_shifted_mix(share):
    """Out-of-fold-like predictions of 2,000 labelled images at the training mix 0.7, and test sets of 1,000 at
    another mix: EM is within 0.05 of it, BBSE (noisier: it sees only the decisions) within 0.10, on 5 draws."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        labels, p = _draw(rng, 2000, TRAIN_MIX)
        _, test = _draw(rng, 1000, share)
        em = em_prior(test, labels.mean())
        assert em.converged and em.prior == pytest.approx(share, abs=0.05)
        assert bbse_prior(test, joint_confusion(labels, p)).prior == pytest.approx(share, abs=0.10)
        # on images of the training mix itself, both find about the training mix
        _, same = _draw(rng, 1000, TRAIN_MIX)
        assert em_prior(same, labels.mean()).prior == pytest.approx(TRAIN_MIX, abs=0.05)


def test_overconfident_probabilities_mislead_em_unless_calibrated_first():
    """Networks are overconfident; with every log-odds doubled, EM stays far from a mix of 0.2 (it trusts the
    probabilities), calibrate=temperature before it (fitted on the OOF images) brings it back within 0.05, and
    BBSE, which uses only the decisions, is unaffected."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        labels, p = _draw(rng, 2000, TRAIN_MIX)
        _, test = _draw(rng, 1000, 0.2)
        p, test = expit(2 * logit(p)), expit(2 * logit(test))
        assert em_prior(test, labels.mean()).prior > 0.2 + 0.07
        combiner = fit(Method(calibrate="temperature", prior="em"), Inputs(p[:, None]), labels)
        combiner.probs(test[:, None])
        assert combiner.estimate is not None and combiner.estimate.prior == pytest.approx(0.2, abs=0.05)
        assert bbse_prior(test, joint_confusion(labels, p)).prior == pytest.approx(0.2, abs=0.10)


def test_weights_count_an_image_as_that_many_copies():
    """bench/shift.py re-weights a fold to another mix instead of resampling it: the same as repeating images."""
    rng = np.random.default_rng(2)
    labels, p = _draw(rng, 300, TRAIN_MIX)
    _, test = _draw(rng, 200, 0.5)
    copies = np.where(test > 0.5, 3, 1)
    repeated = np.repeat(test, copies)
    confusion = joint_confusion(labels, p)
    assert em_prior(test, 0.7, weights=copies).prior == pytest.approx(em_prior(repeated, 0.7).prior)
    assert bbse_prior(test, confusion, weights=copies).prior == pytest.approx(bbse_prior(repeated, confusion).prior)


def test_corrected_probabilities_decide_better_at_the_shifted_mix():
    rng = np.random.default_rng(7)
    labels, p = _draw(rng, 2000, TRAIN_MIX)
    truth, test = _draw(rng, 1000, 0.2)
    plain = ((test >= 0.5) == truth).mean()
    for q in (em_prior(test, labels.mean()).prior, bbse_prior(test, joint_confusion(labels, p)).prior):
        assert ((adjust(test, labels.mean(), q) >= 0.5) == truth).mean() > plain + 0.03


def test_a_known_prior_moves_probabilities_as_bayes_says():
    p = np.array([0.01, 0.2, 0.5, 0.7, 0.99])
    # Bayes by hand: posterior odds = likelihood ratio x prior odds, and the likelihood ratio is the model's odds
    # divided by its training prior odds
    ratio = (p / (1 - p)) / (0.7 / 0.3)
    expected = ratio * (0.2 / 0.8) / (1 + ratio * (0.2 / 0.8))
    np.testing.assert_allclose(adjust(p, 0.7, 0.2), expected)
    np.testing.assert_allclose(adjust(p, 0.7, 0.7), p)  # the same mix: nothing moves
    assert (np.diff(adjust(p, 0.7, 0.2)) > 0).all()  # the ranking (and so ROC-AUC) is kept
    # through the ensemble's combiner: the training mix is the labels' share of `all`
    labels = np.array([1] * 7 + [0] * 3)
    combiner = fit(Method(prior=0.2), Inputs(np.linspace(0.05, 0.95, 10)[:, None]), labels)
    np.testing.assert_allclose(combiner.probs(p[:, None]), expected)
    assert combiner.estimate is not None and combiner.estimate.method == "known"


def test_em_prior_is_cross_fitted_on_each_folds_own_probabilities():
    rng = np.random.default_rng(3)
    shares = (0.8, 0.5, 0.2)  # each fold's model trained on the other two, at their mix
    parts = [_draw(rng, 300, share, train_mix=(sum(shares) - share) / 2) for share in shares]
    labels = np.concatenate([y for y, _ in parts])
    probs = np.concatenate([p for _, p in parts])
    folds = np.repeat([0, 1, 2], 300)
    out, _, per_fold = cross_fitted(Inputs(probs[:, None]), labels, folds, Method(prior="em"))
    for f in range(3):
        held = folds == f
        train = labels[~held].mean()  # the other folds' mix, not this fold's
        expected = em_prior(probs[held], train)
        assert per_fold[f].estimate == expected
        assert expected.prior == pytest.approx(labels[held].mean(), abs=0.06)
        np.testing.assert_allclose(out[held], adjust(probs[held], train, expected.prior))


def _shifted_member(root, arch: str, seed: int):
    """runs/<arch>/fold0..2 whose folds hold 80 %, 50 % and 20 % `all`, one person per class and fold with 20 to
    80 images, each fold predicted by a model of the other two folds' mix; subject '3' (fold 2's blasts) is
    called `hem` as a whole."""
    rng = np.random.default_rng(seed)
    shares = (0.8, 0.5, 0.2)
    for fold, share in enumerate(shares):
        labels, probs = _draw(rng, 100, share, train_mix=(sum(shares) - share) / 2)
        subjects = np.where(labels == 1, str(fold + 1), f"H{fold + 1}")
        if fold == 2:
            probs[labels == 1] = 0.1 + 0.2 * rng.random(int(labels.sum()))
        cls = np.where(labels == 1, "all", "hem")
        paths = [f"fold_{fold}/{c}/UID_{s}_{i}_1_{c}.bmp" for i, (s, c) in enumerate(zip(subjects, cls))]
        make_run(root / arch / f"fold{fold}", arch, oof=oof_frame(paths, labels, probs.round(6), fold, subjects))
    return root / arch


@pytest.mark.slow
def test_prior_through_the_command_line_oof_and_submission(workdir, capsys):
    member = _shifted_member(workdir / "runs", "proposed", 1)
    result = ensemble_command([str(member)], oof=True, name=None, overrides=["prior=em"])
    out = capsys.readouterr().out
    assert "prior=em: each fold's share of `all` taken from its own images' probabilities" in out
    metrics = json.loads((workdir / "submissions/oof_proposed/metrics.json").read_text())
    assert metrics["method"] == "weights=equal prior=em" and metrics["cross_fitted"]
    table = pd.read_csv(workdir / "submissions/oof_proposed/oof.csv")
    for f, recorded in metrics["prior"]["per_fold"].items():
        held = table["fold"] == int(f)
        train = table.loc[~held, "label"].mean()
        expected = em_prior(table.loc[held, "prob_proposed"].to_numpy(), train)
        assert recorded["estimate"] == pytest.approx(expected.prior) and recorded["training"] == pytest.approx(train)
        assert recorded["true"] == pytest.approx(table.loc[held, "label"].mean())
        assert f"fold {f} {expected.prior:.3f}" in out
        np.testing.assert_allclose(table.loc[held, "prob_all"],
                                   adjust(table.loc[held, "prob_proposed"], train, expected.prior), atol=2e-6)
    assert {"weights=equal prior=em", "weights=equal prior=bbse"} & set(result["alternatives"]) == \
        {"weights=equal prior=bbse"}  # printed beside the chosen one
    assert "weights=equal prior=bbse" in out

    # a submission: the prior estimated on the held-out images, applied, printed and written down
    rng = np.random.default_rng(5)
    truth, probs = _draw(rng, 40, 0.25, train_mix=0.5)
    names = [f"{i}.bmp" for i in range(1, 41)]
    for k in range(3):
        write_predictions(member / f"fold{k}", "prelim", names, probs.round(6))
    ensemble_command([str(member)], oof=False, name="prelim", overrides=["prior=em"])
    out = capsys.readouterr().out
    train = table["label"].mean()
    expected = em_prior(probs.round(6), train)
    record = json.loads((workdir / "submissions/prelim/ensemble.json").read_text())
    assert record["prior"]["mode"] == "em" and record["prior"]["method"] == "em"
    assert record["prior"]["estimate"] == pytest.approx(expected.prior)
    assert record["prior"]["training"] == pytest.approx(train) and "estimated from all of them" in \
        record["prior_transductive"]
    assert f"share of `all` among the 40 held-out images {expected.prior:.3f}, estimated by EM" in out
    sub = pd.read_csv(workdir / "submissions/prelim.csv")
    np.testing.assert_allclose(sub["prob_all"], adjust(probs.round(6), train, expected.prior), atol=2e-6)
    assert (sub["label"] == (sub["prob_all"] >= 0.5)).all()
    # a known prior is applied as given
    ensemble_command([str(member)], oof=False, name="prelim", overrides=["prior=0.3"])
    record = json.loads((workdir / "submissions/prelim/ensemble.json").read_text())
    assert record["prior"]["estimate"] == 0.3 and record["prior"]["method"] == "known"
    sub = pd.read_csv(workdir / "submissions/prelim.csv")
    np.testing.assert_allclose(sub["prob_all"], adjust(probs.round(6), train, 0.3), atol=2e-6)


@pytest.mark.parametrize("value, message", [("1.5", "strictly between 0 and 1"), ("0", "strictly between 0 and 1"),
                                            ("foo", "use em or bbse")])
def test_bad_prior_values_are_clear_errors(workdir, capsys, value, message):
    _shifted_member(workdir / "runs", "proposed", 1)
    assert main(["ensemble", "runs/proposed", "--oof", f"prior={value}"]) == 2
    assert re.search(f"prior={value}: .*{message}", capsys.readouterr().err)
    assert not (workdir / "submissions").exists()  # refused before anything was written


def test_prior_from_the_command_line_and_one_class_oof_refused(workdir, capsys):
    _shifted_member(workdir / "runs", "proposed", 1)
    assert main(["ensemble", "runs/proposed", "--oof", "prior=bbse"]) == 0  # the command line's own parsing
    out = capsys.readouterr().out
    assert "weights=equal prior=bbse" in out and "prior=bbse: each fold's share of `all`" in out
    with pytest.raises(UserError, match="prior=0.5 needs out-of-fold predictions of both classes"):
        fit(Method(prior=0.5), Inputs(np.full((4, 1), 0.9)), np.ones(4, dtype=int))


def test_per_person_puts_a_person_wrong_as_a_whole_first():
    subjects = ["H1"] * 4 + ["1"] * 4 + ["H2"] * 2
    labels = [0] * 4 + [1] * 4 + [0] * 2
    probs = [0.9, 0.8, 0.7, 0.2, 0.9, 0.6, 0.4, 0.9, 0.1, 0.3]
    view = per_person(labels, probs, (np.array(probs) >= 0.5).astype(int), subjects)
    assert list(view.index) == ["H1", "1", "H2"]
    assert view.loc["H1", "wrong"] and not view.loc["1", "wrong"] and not view.loc["H2", "wrong"]
    assert view.loc["H1", "called_all"] == 0.75 and view.loc["H1", "mean_prob_all"] == pytest.approx(0.65)
    assert view.loc["1", "images"] == 4 and view.loc["1", "class"] == "all" and view.loc["1", "right"] == 0.75


def test_oof_report_shows_each_person_and_flags_one_wrong_as_a_whole(workdir, capsys):
    member = _shifted_member(workdir / "runs", "proposed", 1)
    ensemble_command([str(member)], oof=True, name=None)
    out = capsys.readouterr().out
    assert "per-subject accuracy, worst first" in out and "1 of 6 people):" in out
    rows = out.split("per-subject accuracy, worst first")[1].splitlines()[2:]
    assert rows[0].split()[0] == "3" and rows[0].split()[-1] == "WRONG"  # the worst person on the first row
    assert all(r.split()[-1] == "right" for r in rows[1:6])
    metrics = json.loads((workdir / "submissions/oof_proposed/metrics.json").read_text())
    first = metrics["persons"][0]
    assert first["subject"] == "3" and first["wrong"] and first["class"] == "all" and first["images"] == 20
    assert first["called_all"] == 0.0 and 0.1 <= first["mean_prob_all"] <= 0.3


def test_bench_shift_reweights_each_fold_to_the_target_mix(workdir, capsys, monkeypatch):
    """bench/shift.py on fake runs: each fold's weights give the target share of `all`, the correction's training
    mix is the other folds', and the tables come out (a smoke test: the bench reads runs as the package does)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / "shift.py"
    spec = importlib.util.spec_from_file_location("bench_shift", path)
    assert spec is not None and spec.loader is not None
    shift = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shift)
    _shifted_member(workdir / "runs", "proposed", 1)
    monkeypatch.setattr("sys.argv", ["shift.py", "runs/proposed", "--out", "shift.csv"])
    shift.main()
    out = capsys.readouterr().out
    table = pd.read_csv("shift.csv")
    assert len(table) == 3 * len(shift.MIXES) * len(shift.CORRECTIONS) and "pooled over folds" in out
    assert table.groupby("fold")["train"].first().tolist() == pytest.approx([0.35, 0.5, 0.65])
    known = table[table["correction"] == "known"]
    assert (known["estimate"] == known["target"]).all()
    assert set(table.loc[table["mix"] == "balanced", "target"]) == {0.5}
    w = shift.mix_weights(np.array([1, 1, 1, 0]), 0.5)
    assert w.sum() == pytest.approx(4) and w[:3].sum() == pytest.approx(2)
