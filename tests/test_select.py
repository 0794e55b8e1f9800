"""select=: which weights a run keeps, and that by default nothing is chosen on the images a score is of."""

import dataclasses

import pandas as pd
import pytest
import torch

from alldetect.commands.train import train_command
from alldetect.config import load_config
from alldetect.data.prepare import resolve_folds
from alldetect.engine.fit import fit_fold
from alldetect.engine.rundir.files import load_checkpoint
from alldetect.engine.select import carve_inner
from alldetect.errors import UserError
from alldetect.metrics import score

from conftest import FAST, TINY


def _cfg(root, *extra, arch=TINY):
    return load_config(arch, [*FAST, f"data.root={root}", *extra])


def _poisoned(folds, fold):
    """The same fold file with every label of the validation fold flipped."""
    table = folds.table.copy()
    held = table["fold"] == fold
    table.loc[held, "label"] = 1 - table.loc[held, "label"]
    return dataclasses.replace(folds, table=table)


def _weights(run):
    return load_checkpoint(run / "best.pt").model


@pytest.mark.slow
@pytest.mark.parametrize("select", ["inner", "last", pytest.param("outer", marks=pytest.mark.xfail(
    strict=True, reason="select=outer picks its epoch on the validation fold: the poison changes the choice"))])
def test_poisoned_validation_labels_change_no_choice(tiny_demo, workdir, select):
    """Flipping every label of the validation fold changes its scores, and nothing else: not the kept epoch, not
    the early stop, not the weights in best.pt, not the inner split's predictions."""
    extra = ["epochs=4", "lr=0.003", "optimizer=adamw", "monitor=roc_auc", f"select={select}"]
    extra += ["patience=1", "select_share=0.3"] if select == "inner" else []
    arch = "proposed" if select == "outer" else TINY  # TINY's best validation epoch happens not to move with the poison
    folds = resolve_folds(_cfg(tiny_demo, *extra, arch=arch))
    clean = fit_fold(_cfg(tiny_demo, "runs_dir=clean", *extra, arch=arch), 0, folds)
    poisoned = fit_fold(_cfg(tiny_demo, "runs_dir=poisoned", *extra, arch=arch), 0, _poisoned(folds, 0))
    a, b = workdir / "clean" / arch / "fold0", workdir / "poisoned" / arch / "fold0"
    ha, hb = pd.read_csv(a / "history.csv"), pd.read_csv(b / "history.csv")
    assert (clean.best_epoch, clean.epochs_run) == (poisoned.best_epoch, poisoned.epochs_run)
    assert list(ha["selected"]) == list(hb["selected"])
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = pd.read_csv(a / "oof.csv"), pd.read_csv(b / "oof.csv")
    assert list(oa["prob_all"]) == list(ob["prob_all"]) and (oa["label"] != ob["label"]).all()
    assert not ha["f1"].equals(hb["f1"])  # the poison did reach the validation fold's scores
    if select == "inner":
        pd.testing.assert_frame_equal(pd.read_csv(a / "inner.csv"), pd.read_csv(b / "inner.csv"))
        assert {"inner_f1", "inner_loss"} <= set(ha.columns)
        assert ha["inner_f1"].equals(hb["inner_f1"])


@pytest.mark.slow
def test_select_outer_picks_the_best_validation_epoch_and_says_it_is_optimistic(tiny_demo, workdir, capsys):
    [result] = train_command(TINY, "fold0", [*FAST, f"data.root={tiny_demo}", "epochs=4", "lr=0.003",
                                                   "select=outer", "monitor=roc_auc"])
    history = pd.read_csv(workdir / "runs" / TINY / "fold0/history.csv")
    assert result.best_epoch == int(history["roc_auc"].idxmax())
    assert history["selected"].iloc[result.best_epoch] == 1
    out = capsys.readouterr().out
    assert "OPTIMISTIC" in out and "select=outer" in out


@pytest.mark.slow
def test_select_last_keeps_the_final_weights_and_scores_them(tiny_demo, workdir):
    [result] = train_command(TINY, "fold0", [*FAST, f"data.root={tiny_demo}", "epochs=3", "select=last",
                                                   "ema=false"])
    run = workdir / "runs" / TINY / "fold0"
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert result.best_epoch == 2 and best.meta.progress.epoch == 2
    assert all(torch.equal(last.model[k], best.model[k]) for k in last.model)
    oof = pd.read_csv(run / "oof.csv")
    history = pd.read_csv(run / "history.csv")
    assert score(oof["label"], oof["prob_all"])["f1"] == pytest.approx(history["f1"].iloc[-1], abs=1e-6)
    assert list(history["selected"]) == [0, 0, 1]


def test_inner_split_takes_whole_subjects_of_each_class_from_the_training_folds():
    rows = pd.DataFrame({
        "path": [f"{s}_{i}.bmp" for s in "ABCDEFG" for i in range(10)],
        "subject": [s for s in "ABCDEFG" for _ in range(10)],
        "label": [1 if s in "ABCD" else 0 for s in "ABCDEFG" for _ in range(10)],
    })
    fit, inner = carve_inner(rows, 0.3, seed=0, fold=1)
    assert set(fit["subject"]).isdisjoint(inner["subject"]) and len(fit) + len(inner) == len(rows)
    assert set(inner["label"]) == {0, 1} and set(fit["label"]) == {0, 1}
    assert inner.groupby("label")["subject"].nunique().to_dict() == {0: 1, 1: 2}  # 30 % of 3 and 4 subjects
    assert carve_inner(rows, 0.3, seed=0, fold=1)[1].equals(inner)  # seeded
    one_hem = rows[~rows["subject"].isin(["F", "G"])]
    with pytest.raises(UserError, match=r"select=inner needs two or more subjects of each class .* one 'hem' "
                                        r"subject \(E\).*select=last"):
        carve_inner(one_hem, 0.3, seed=0, fold=1)


@pytest.mark.slow
def test_select_last_with_the_moving_average_on_keeps_the_final_raw_weights(tiny_demo, workdir):
    [result] = train_command(TINY, "fold0", [*FAST, f"data.root={tiny_demo}", "epochs=2", "select=last",
                                                   "ema=true"])
    run = workdir / "runs" / TINY / "fold0"
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert all(torch.equal(last.model[k], best.model[k]) for k in last.model)
    first = next(iter(last.model))
    assert not torch.equal(last.ema[first], best.model[first])


def test_a_resume_must_count_updates_as_the_run_did(tiny_demo, workdir):
    """The schedule and the moving average follow the update count: max_batches= or another number of processes
    would move them."""
    from alldetect.data.prepare import resolve_folds
    from alldetect.engine.setup import check_same_updates

    folds = resolve_folds(_cfg(tiny_demo, "epochs=1"))
    fit_fold(_cfg(tiny_demo, "epochs=1", "max_batches=2"), 0, folds)
    with pytest.raises(UserError, match=r"cannot resume .* \(max_batches: 2 -> 0\)"):
        fit_fold(_cfg(tiny_demo, "epochs=2", "resume=true"), 0, folds)
    state = load_checkpoint(workdir / "runs" / TINY / "fold0/last.pt")
    assert (state.meta.world, state.meta.updates_per_epoch) == (1, 2)
    with pytest.raises(UserError, match=r"ran 2 updates per epoch on 1 process\(es\), this run would make 1 on 2"):
        check_same_updates(state.meta, 2, 1, workdir)
